"""The CLIP model as the client decides it: which weights, whether they fit the heads, where they are.

Client-side only: :class:`ClipSpec` is a plain value the workers get; the model itself is loaded
by the worker-side pipeline (:mod:`aesthetic_dask.pipeline.encoder`). Everything here goes
through open_clip's own registry (model configs, pretrained tags, ``download_pretrained``), read
as data by :mod:`.open_clip_files`: the client never imports torch or open_clip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import InputError
from . import open_clip_files


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP model to load: open_clip name, pretrained tag or checkpoint path, optional config JSON."""

    model: str
    pretrained: str | None
    model_config: str | None
    cache_dir: str
    precision: str = "auto"
    hub_offline: bool = False  # the client found the weights cached: workers load them without the network
    demo: bool = False  # the demo CLIP (random weights): scores mean nothing

    @classmethod
    def from_config(cls, config: Config) -> ClipSpec:
        """The spec of ``config``'s CLIP; with ``demo_clip``, of the demo CLIP (built in model_dir if absent)."""
        cache_dir = str(config.resolved_model_dir.resolve() / "open_clip")
        if config.demo_clip:
            from .demo import DEMO_MODEL, demo_clip_config

            model_config, checkpoint = demo_clip_config(config.resolved_model_dir.resolve())
            return cls(DEMO_MODEL, str(checkpoint), str(model_config), cache_dir, config.clip_precision, demo=True)
        model, model_config = config.clip_model, config.clip_model_config
        if model_config:
            model, model_config = Path(model_config).stem, str(Path(model_config).resolve())
        pretrained = config.clip_pretrained or None
        if pretrained and Path(pretrained).exists():
            pretrained = str(Path(pretrained).resolve())  # workers may run elsewhere than the client's cwd
        return cls(model, pretrained, model_config, cache_dir, config.clip_precision)

    @property
    def schema(self) -> str | None:
        """open_clip's own reading of the model name: None (built-in), ``hf-hub`` or ``local-dir``."""
        try:
            return open_clip_files.parse_model_name(self.model)[0]
        except ValueError as exc:
            raise InputError(f"--clip-model {self.model}: {exc}") from None

    def embed_dim(self) -> int:
        """The width of the embeddings, from open_clip's model config (no weights loaded); 768 where
        the config is not at hand (a hub model not cached)."""
        self.schema  # a malformed name is refused here too
        cfg = open_clip_files.model_config(self.model, self.model_config)
        return int((cfg or {}).get("embed_dim", 768))

    def check(self, embed_dim: int | None = None, heads: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fail early, in the client and before any download, on a spec that cannot load, gives the
        wrong width, or reads another embedding space than a head was trained on.

        ``heads``: column -> registry entry (None for a local head file). Returns the manifest's
        record of the compatibility check.
        """
        schema = self.schema
        if self.model_config and not Path(self.model_config).is_file():
            raise InputError(f"--clip-model-config {self.model_config}: no such file")
        if schema is None:
            model_config = open_clip_files.model_config(self.model, self.model_config)
            if model_config is None:
                raise InputError(f"--clip-model {self.model}: not an open_clip model (see open_clip.list_models())")
            if embed_dim is not None and model_config.get("embed_dim") != embed_dim:
                raise InputError(
                    f"--clip-model {self.model} gives {model_config.get('embed_dim')}-d embeddings; "
                    f"the aesthetic predictor expects {embed_dim}"
                )
            if not self.demo:  # its checkpoint is built where the model loads
                self._check_pretrained()
        elif schema == "local-dir" and not Path(self.model.split(":", 1)[1]).is_dir():
            raise InputError(f"--clip-model {self.model}: no such directory")
        return self._check_heads(heads or {})

    def _check_pretrained(self) -> None:
        registry = open_clip_files.pretrained()
        pretrained = self.pretrained
        if not pretrained:
            raise InputError(
                f"--clip-pretrained is empty: {self.model} would be randomly initialised and its scores "
                "meaningless; give an open_clip pretrained tag or a checkpoint file"
            )
        if not Path(pretrained).exists():
            if "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise InputError(f"--clip-pretrained {pretrained}: no such file")
            if not registry.get_pretrained_cfg(self.model, pretrained):
                tags = ", ".join(registry.list_pretrained_tags_by_model(self.model)) or "none"
                raise InputError(f"--clip-pretrained {pretrained}: open_clip has no such tag for {self.model} (tags: {tags})")

    def _check_heads(self, heads: dict[str, Any]) -> dict[str, Any]:
        """Each registered head's CLIP against this spec, by the weights open_clip would load."""
        if self.demo:
            from .demo import DEMO_NOTE

            return {column: DEMO_NOTE for column in heads}
        mine = clip_weights_id(self.model, self.pretrained)
        result: dict[str, Any] = {}
        for column, entry in heads.items():
            if entry is None:
                result[column] = "vouched: a local head file; its CLIP is not known"
            elif mine is None:
                result[column] = "vouched: a local CLIP checkpoint; the head expects " + str(entry.clip)
            elif mine != clip_weights_id(entry.clip.model, entry.clip.pretrained):
                flag = "--aesthetic-weights " if column == "aesthetic_score" else f"--extra-scores {column}="
                raise InputError(
                    f"{flag}{entry.name} was trained on the embeddings of CLIP {entry.clip}; "
                    f"--clip-model {self.model} --clip-pretrained {self.pretrained} gives another embedding space "
                    "and its scores would be meaningless (a local --clip-pretrained checkpoint is accepted as vouched for)"
                )
            else:
                result[column] = f"matches: {entry.clip}"
        return result


def clip_weights_id(model: str, pretrained: str | None) -> str | None:
    """What CLIP weights ``(model, pretrained)`` loads, by open_clip's own registry: the hub repo
    (or URL) of the pretrained tag, or the ``hf-hub:`` repo itself. ``None`` for a local
    checkpoint or directory, whose weights only the user knows."""
    schema, ident = open_clip_files.parse_model_name(model)
    if schema == "hf-hub":
        return "hf-hub:" + ident.strip("/")
    if schema == "local-dir" or not pretrained or Path(pretrained).exists():
        return None
    cfg = open_clip_files.pretrained().get_pretrained_cfg(model, pretrained) or {}
    if cfg.get("hf_hub"):
        return "hf-hub:" + cfg["hf_hub"].strip("/")
    return cfg.get("url") or f"{model}/{pretrained}"


def clip_cache_status(spec: ClipSpec) -> str:
    """``local`` (a checkpoint file or directory), ``cached`` (in ``cache_dir``) or ``missing``,
    by open_clip's own pretrained config and huggingface_hub's cache layout (no network)."""
    from huggingface_hub import try_to_load_from_cache

    schema = spec.schema
    if spec.demo or schema == "local-dir" or (spec.pretrained and Path(spec.pretrained).exists()):
        return "local"
    if schema == "hf-hub":
        repo, files = spec.model.split(":", 1)[1], ["open_clip_config.json"]
    else:
        cfg = open_clip_files.pretrained().get_pretrained_cfg(spec.model, spec.pretrained or "") or {}
        if cfg.get("file"):
            return "local"
        if not cfg.get("hf_hub"):
            url = cfg.get("url", "")
            return "cached" if url and (Path(spec.cache_dir) / os.path.basename(url)).is_file() else "missing"
        repo, filename = os.path.split(cfg["hf_hub"])
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in files:
        if isinstance(try_to_load_from_cache(repo, name, cache_dir=spec.cache_dir), str):
            return "cached"
    return "missing"


def prepare_clip_weights(spec: ClipSpec) -> tuple[ClipSpec, str]:
    """Make sure the workers can load the CLIP weights, before any task is submitted.

    Cached: workers load them from the cache, without the network (no probe here either: a
    nightly re-run costs no network round trip, and what the cache holds is what loads). Missing:
    downloaded here once with open_clip's own mechanism if the hub is reachable, else one clear
    error in seconds. Returns the spec the workers get and what was found.
    """
    status = clip_cache_status(spec)
    if status == "local":
        return spec, status
    if status == "cached":
        return replace(spec, hub_offline=True), status
    why = hub_unreachable()
    if why:
        raise InputError(
            f"CLIP weights {spec.model} / {spec.pretrained} are not in {spec.cache_dir} and {why}; run "
            "`aesthetic-dask download --model-dir DIR` where the hub is reachable, pass --clip-pretrained FILE, "
            "or --demo-clip to see the pipeline work on a random CLIP"
        )
    if spec.schema is None:
        registry = open_clip_files.pretrained()
        registry.download_pretrained(registry.get_pretrained_cfg(spec.model, spec.pretrained), cache_dir=spec.cache_dir)
    return spec, "downloaded"


def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (in seconds, one probe), or None where it can."""
    from ..network import hub_endpoint, offline, reachable

    if offline():
        return "HF_HUB_OFFLINE is set"
    return None if reachable(hub_endpoint()) else "the hub is unreachable (no network?)"


def clip_weights_unavailable(spec: ClipSpec) -> str | None:
    """Why ``spec``'s weights cannot be had here (neither local, cached nor fetchable), or None."""
    return None if clip_cache_status(spec) != "missing" else hub_unreachable()


def download_clip(config: Config) -> str:
    """Fetch the configured CLIP weights with open_clip's own pretrained mechanism into model_dir."""
    spec = ClipSpec.from_config(config)
    if spec.pretrained and Path(spec.pretrained).exists():
        return spec.pretrained
    registry = open_clip_files.pretrained()
    cfg = registry.get_pretrained_cfg(spec.model, spec.pretrained or "")
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.model}")
    return registry.download_pretrained(cfg, cache_dir=spec.cache_dir)


def compute_precision(precision: str, device: str) -> str:
    """What the model really computes in, e.g. ``cuda-fp16`` or ``cpu-fp32``: ``auto`` is fp16 on
    CUDA and fp32 on a CPU; ``fp16``, ``bf16`` and ``fp32`` are taken as asked (a CPU runs fp16 and
    bf16 too, slowly: for checking their error)."""
    name = ("fp16" if device == "cuda" else "fp32") if precision == "auto" else precision
    return f"{device}-{name}"
