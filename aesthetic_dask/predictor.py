"""The improved aesthetic predictor as array math: score = MLP(e / ||e||_2).

The linearMSE weights have no activations, so the MLP is one affine map; it is folded exactly (in
float64) to a 768-vector and a bias, and scoring is one matrix-vector product. Weights with
activations keep the layered path. All math takes an array module ``xp`` (numpy or cupy), so the
CPU and GPU paths share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .weights import PredictorSpec, ResolvedWeights, infer_spec, load_state_dict, param_key, resolve_weights

# Rows per matmul on the layered path: bounds the (rows x 1024) hidden activations.
_LAYER_CHUNK = 65536


def fold_affine(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """Compose linear layers ``h = W h + b`` into one ``(w, b)`` in float64."""
    first_w, first_b = layers[0]
    a = first_w.astype(np.float64)
    c = first_b.astype(np.float64)
    for w, b in layers[1:]:
        a = w.astype(np.float64) @ a
        c = w.astype(np.float64) @ c + b.astype(np.float64)
    if a.shape[0] != 1:
        raise ValueError(f"folded map has {a.shape[0]} outputs, expected 1")
    return a[0], float(c[0])


class AestheticPredictor:
    """Aesthetic scores for batches of CLIP embeddings (numpy or cupy arrays).

    Pickles small: a folded predictor carries one vector and a bias.
    """

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]],
        activation: str | None = None,
        source: str = "",
        sha256: str = "",
    ) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.embed_dim = int(layers[0][0].shape[1])
        self.activation = activation
        self.source = source
        self.sha256 = sha256
        self.layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.weight: np.ndarray | None = None
        self.bias = 0.0
        if activation is None:
            w, b = fold_affine(layers)
            self.weight = w.astype(np.float32)
            self.bias = b
        else:
            self.layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]
        self._device_cache: dict[str, Any] = {}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, np.ndarray], spec: PredictorSpec, source: str = "", sha256: str = ""
    ) -> AestheticPredictor:
        layers = [(state[param_key(k, "weight")], state[param_key(k, "bias")]) for k in spec.layer_keys]
        return cls(layers, spec.activation, source=source, sha256=sha256)

    @property
    def folded(self) -> bool:
        return self.weight is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device_cache"] = {}  # device arrays never travel
        return state

    def _on(self, xp: Any) -> Any:
        """Parameters as arrays of module ``xp``, converted once per process."""
        key = xp.__name__
        if key not in self._device_cache:
            if self.folded:
                self._device_cache[key] = xp.asarray(self.weight)
            else:
                self._device_cache[key] = [(xp.asarray(w.T), xp.asarray(b)) for w, b in self.layers]
        return self._device_cache[key]

    def score_unit(self, unit: Any, xp: Any = np) -> Any:
        """Scores (float32) of already L2-normalised embeddings ``unit`` (rows x embed_dim)."""
        if self.folded:
            return (unit @ self._on(xp) + np.float32(self.bias)).astype(xp.float32)
        return self._layered(unit, xp)

    def score_raw(self, emb: Any, sq_norm: Any, xp: Any = np) -> Any:
        """Scores of raw embeddings given their squared norms (all rows finite, non-zero).

        Folded path: ``w.e / ||e|| + b``, so the normalised copy of the matrix is never made.
        """
        norm = xp.sqrt(sq_norm.astype(xp.float32))
        if self.folded:
            return ((emb @ self._on(xp)) / norm + np.float32(self.bias)).astype(xp.float32)
        return self._layered(emb / norm[:, None], xp)

    def _layered(self, unit: Any, xp: Any) -> Any:
        params = self._on(xp)
        out = xp.empty(unit.shape[0], dtype=xp.float32)
        for start in range(0, unit.shape[0], _LAYER_CHUNK):
            h = unit[start : start + _LAYER_CHUNK].astype(xp.float32)
            for i, (wt, b) in enumerate(params):
                h = h @ wt + b
                if self.activation == "relu" and i < len(params) - 1:
                    h = xp.maximum(h, 0)
            out[start : start + h.shape[0]] = h[:, 0]
        return out


def load_predictor(
    weights: str | ResolvedWeights, model_dir: str | Path | None = None
) -> AestheticPredictor:
    """The predictor for a registry name or local file (downloading into ``model_dir`` if needed)."""
    from .config import load_config

    directory = Path(model_dir) if model_dir is not None else load_config().resolved_model_dir
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(weights, directory)
    state = load_state_dict(resolved, directory)
    return AestheticPredictor.from_state_dict(state, resolved.spec or infer_spec(state), resolved.source, resolved.sha256)


def load_job_predictor(config: Any) -> tuple[AestheticPredictor, dict[str, Any]]:
    """The predictor of ``config.aesthetic_weights`` and its manifest entry (loaded in the client)."""
    return load_head(config.aesthetic_weights, config.resolved_model_dir)


def load_head(name_or_path: str, model_dir: Path) -> tuple[AestheticPredictor, dict[str, Any]]:
    """A head by registry name or local file, and what the manifest records of it."""
    weights = resolve_weights(name_or_path, model_dir)
    predictor = load_predictor(weights, model_dir)
    entry = weights.entry
    info = {
        "name": weights.name,
        "source": weights.source,
        "path": str(weights.path),
        "sha256": weights.sha256,
        "folded": predictor.folded,
        "activation": predictor.activation,
        "embed_dim": predictor.embed_dim,
        "license": entry.license if entry else None,
        "expected_clip": {"model": entry.clip.model, "pretrained": entry.clip.pretrained} if entry else None,
    }
    return predictor, info


def load_extra_heads(config: Any, embed_dim: int) -> tuple[dict[str, AestheticPredictor], dict[str, dict[str, Any]]]:
    """The ``extra_scores`` heads (column name -> predictor) and their manifest entries.

    Every extra head must read the same embedding as the main one (same width).
    """
    from .errors import InputError

    heads, infos = {}, {}
    for column, weights in config.extra_scores.items():
        predictor, info = load_head(weights, config.resolved_model_dir)
        if predictor.embed_dim != embed_dim:
            raise InputError(
                f"--extra-scores {column}={weights}: the head reads {predictor.embed_dim}-d embeddings, "
                f"the main head {embed_dim}-d"
            )
        heads[column], infos[column] = predictor, info
    return heads, infos
