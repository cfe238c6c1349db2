"""Job configuration: defaults live in ``conf/default.yaml``; this module is their schema."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# CLI flag names (snake_case) that differ from the config keys they set.
ALIASES = {
    "threshold": "score_threshold",
    "batch_size": "model_inference_batch_size",
    # Before the decode pool, images were decoded by threads; the knob is now the pool's size.
    "decode_threads": "decode_processes",
}




@dataclass(frozen=True)
class Config:
    """All options of a job. Build it with :func:`load_config`; the defaults are in conf/default.yaml."""

    score_threshold: float
    model_inference_batch_size: int
    num_gpus_per_worker: float
    model_dir: str | None
    verbose: bool
    aesthetic_weights: str
    embedding_column: str
    keep_embeddings: bool
    keep_rejected: bool
    partition_rows: int
    scheduler: str | None
    scheduler_file: str | None
    n_workers: int | None
    threads_per_worker: int | None
    clip_model: str
    clip_pretrained: str
    clip_model_config: str | None
    image_column: str
    json_fields: list[str]
    write_shards: str | None
    max_image_pixels: int
    max_sidecar_bytes: int
    decode_processes: int | None
    clip_compile: str
    clip_precision: str
    image_decoder: str
    extra_scores: dict[str, str]
    report: bool
    report_samples: bool
    storage_options: dict[str, Any]
    dashboard: str

    @property
    def resolved_model_dir(self) -> Path:
        """``model_dir``, or the per-user cache directory when it is unset."""
        return Path(self.model_dir).expanduser() if self.model_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        """All options, as the manifest records them (secrets in storage_options masked)."""
        from .storage import redact

        return dataclasses.asdict(self) | {"storage_options": redact(self.storage_options)}


# The options that change what a job writes, per job. They (with the inputs, the weights' sha256 and
# what the job derives from them) make the job's fingerprint: re-running into the same OUT with any
# of them changed is refused unless --overwrite is given. Cluster shape, logging and the like are
# left out on purpose: they change how a job runs, never what it writes.
OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "score": (
        "score_threshold", "embedding_column", "keep_embeddings", "keep_rejected", "partition_rows",
        "extra_scores",
    ),
    "run": (
        "score_threshold", "keep_embeddings", "keep_rejected", "partition_rows", "clip_model",
        "clip_pretrained", "clip_model_config", "clip_precision", "image_column", "json_fields",
        "max_image_pixels", "max_sidecar_bytes", "write_shards", "extra_scores",
    ),
}


# Options that change how a job runs, never what it writes (checked by the tests: every option is
# in OUTPUT_OPTIONS of a job or here, so a new option needs a decision).
RUNTIME_OPTIONS = (
    "model_inference_batch_size", "num_gpus_per_worker", "model_dir", "verbose", "aesthetic_weights",
    "scheduler", "scheduler_file", "n_workers", "threads_per_worker", "decode_processes", "report",
    "report_samples", "storage_options", "dashboard", "image_decoder", "clip_compile",
)
# aesthetic_weights is listed as runtime because the fingerprint holds the weights' sha256 instead:
# the same file under another name or path writes the same output. Likewise image_decoder: the
# fingerprint holds the decoder it resolves to (`auto` is torch on CUDA), not the name given.


def output_settings(config: Config, job: str, **derived: Any) -> dict[str, Any]:
    """What one job's output depends on: its :data:`OUTPUT_OPTIONS` plus ``derived`` values
    (inputs, weights sha256, file digests, the precision actually used)."""
    return {name: getattr(config, name) for name in OUTPUT_OPTIONS[job]} | derived


def default_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/aesthetic-dask`` (usually ~/.cache/aesthetic-dask)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "aesthetic-dask"


def default_config_text() -> str:
    """The text of the packaged ``conf/default.yaml``."""
    return resources.files("aesthetic_dask.conf").joinpath("default.yaml").read_text()


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check one value against the field's declared type (int accepted where float is declared)."""
    declared = {f.name: f.type for f in fields(Config)}[name]
    if name in ("dashboard", "clip_compile") and isinstance(value, bool):  # YAML reads `true` as a bool
        value = "true" if value else "false"
    if value is None:
        if "None" in declared:
            return None
        raise ConfigError(f"{origin}: option {name!r} may not be null")
    if declared.startswith("bool"):
        ok = isinstance(value, bool)
    elif declared.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif declared.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif declared == "dict[str, Any]":
        if isinstance(value, str):  # CLI form: a JSON object
            import json

            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{origin}: option {name!r} expects a JSON object: {exc}") from None
        ok = isinstance(value, dict)
    elif declared.startswith("dict"):
        if isinstance(value, str):  # CLI form: name=weights,name=weights
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            if any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
                raise ConfigError(f"{origin}: option {name!r} expects NAME=VALUE[,NAME=VALUE...], got {value!r}")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        value = dict(value) if ok else value
    elif declared.startswith("list"):
        if isinstance(value, str):  # CLI form: a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{origin}: option {name!r} expects {declared}, got {value!r}")
    return value


def _merge(target: dict[str, Any], updates: dict[str, Any], origin: str) -> None:
    known = {f.name for f in fields(Config)}
    for key, value in updates.items():
        name = ALIASES.get(key, key)
        if name not in known:
            raise ConfigError(
                f"{origin}: unknown option {key!r}; known options: {', '.join(sorted(known))}"
            )
        target[name] = _coerce(name, value, origin)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (config keys or CLI names).

    ``None`` overrides are ignored so CLI flags that were not given keep the file's value.
    """
    values: dict[str, Any] = {}
    _merge(values, _read_yaml(default_config_text(), "conf/default.yaml"), "conf/default.yaml")
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
        _merge(values, _read_yaml(text, str(p)), str(p))
    _merge(values, {k: v for k, v in overrides.items() if v is not None}, "override")
    config = Config(**values)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    import math

    if not math.isfinite(config.score_threshold):
        raise ConfigError(f"score_threshold (--threshold) must be a finite number, got {config.score_threshold}")
    for name, flag in (("n_workers", "--n-workers"), ("threads_per_worker", "--threads-per-worker"),
                       ("decode_processes", "--decode-processes")):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} ({flag}) must be >= 1, got {value}")
    if config.model_inference_batch_size < 1:
        raise ConfigError("model_inference_batch_size (--batch-size) must be >= 1")
    if not 0 < config.num_gpus_per_worker <= 1:
        raise ConfigError("num_gpus_per_worker must be in (0, 1]")
    if config.partition_rows < 1:
        raise ConfigError("partition_rows (--partition-rows) must be >= 1")
    if config.clip_precision not in ("auto", "fp32", "fp16"):
        raise ConfigError("clip_precision must be auto, fp32 or fp16")
    if config.clip_compile not in ("auto", "true", "false"):
        raise ConfigError(f"clip_compile must be auto, true or false, got {config.clip_compile!r}")
    if config.image_decoder not in ("auto", "pil", "torch"):
        raise ConfigError(f"image_decoder (--image-decoder) must be auto, pil or torch, got {config.image_decoder!r}")
    if config.max_image_pixels < 1:
        raise ConfigError("max_image_pixels (--max-image-pixels) must be >= 1")
    if config.max_sidecar_bytes < 0:
        raise ConfigError("max_sidecar_bytes (--max-sidecar-bytes) must be >= 0")
    if config.dashboard not in ("auto", "true", "false"):
        raise ConfigError("dashboard must be auto, true or false")
    if config.scheduler and config.scheduler_file:
        raise ConfigError("give either scheduler or scheduler_file, not both")
