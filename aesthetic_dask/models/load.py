"""Heads as the client loads them: by registry name or local file, into a predictor and the
manifest's record of it. The heads travel to the workers from here, folded to a few KB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from .checkpoint import load_state_dict, served_path
from .fetch import ResolvedWeights, resolve_weights
from .heads import AestheticPredictor, infer_spec
from ..config import default_cache_dir


def load_predictor(weights: str | ResolvedWeights, model_dir: str | Path | None = None) -> AestheticPredictor:
    """The predictor for a registry name or local file (fetched into ``model_dir``, by default the
    per-user cache, if needed)."""
    directory = Path(model_dir).expanduser() if model_dir is not None else default_cache_dir()
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(weights, directory)
    state = load_state_dict(resolved.path, resolved.sha256, resolved.spec, directory)
    return AestheticPredictor.from_state_dict(state, resolved.spec or infer_spec(state), resolved.source, resolved.sha256)


def load_head(name_or_path: str, model_dir: Path) -> tuple[AestheticPredictor, dict[str, Any]]:
    """A head by registry name or local file, and what the manifest records of it."""
    weights = resolve_weights(name_or_path, model_dir)
    predictor = load_predictor(weights, model_dir)
    entry = weights.entry
    info = {
        "name": weights.name,
        "source": weights.source,
        "path": str(served_path(weights.path, weights.sha256, model_dir)),  # the file that was read
        "sha256": weights.sha256,
        "folded": predictor.folded,
        "activation": predictor.activation,
        "embed_dim": predictor.embed_dim,
        "license": entry.license if entry else None,
        "expected_clip": {"model": entry.clip.model, "pretrained": entry.clip.pretrained} if entry else None,
    }
    return predictor, info


def load_extra_heads(extra_scores: dict[str, str], model_dir: Path,
                     embed_dim: int) -> tuple[dict[str, AestheticPredictor], dict[str, dict[str, Any]]]:
    """The ``extra_scores`` heads (column name -> predictor) and their manifest entries. Every
    extra head must read the same embedding as the main one (same width)."""
    heads, infos = {}, {}
    for column, weights in extra_scores.items():
        predictor, info = load_head(weights, model_dir)
        if predictor.embed_dim != embed_dim:
            raise InputError(
                f"--extra-scores {column}={weights}: the head reads {predictor.embed_dim}-d embeddings, "
                f"the main head {embed_dim}-d"
            )
        heads[column], infos[column] = predictor, info
    return heads, infos
