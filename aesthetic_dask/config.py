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
from .filters import parse_all
from .storage import redact, with_bound, without_bound

# The values an option may take, where they are few (the CLI's choices are these).
CHOICES: dict[str, tuple[str, ...]] = {
    "image_decoder": ("auto", "pil", "torch"),
    "clip_compile": ("auto", "true", "false"),
    "clip_cuda_graph": ("auto", "true", "false"),
    "clip_precision": ("auto", "fp32", "fp16", "bf16"),
    "dashboard": ("auto", "true", "false"),
}
BOTH = ("score", "run")


def option(flag: str | None = None, help: str = "", jobs: tuple[str, ...] = BOTH, output: tuple[str, ...] = (),
           metavar: str | None = None, aliases: tuple[str, ...] = (), repeat: bool = False,
           required_by: tuple[str, ...] = ()) -> Any:
    """A :class:`Config` field's schema: its CLI ``flag`` (None: config file and API only) for the
    ``jobs`` (subcommands: the jobs, and refilter, report, download) that take it, its ``help``, the
    jobs whose output it changes (``output``: in their fingerprint, so a re-run with it changed is
    refused), former names (``aliases``), whether the flag is given once per value (``repeat``: a
    list option), and the subcommands that need it given (``required_by``)."""
    return dataclasses.field(metadata={"flag": flag, "help": help, "jobs": jobs, "output": output, "metavar": metavar,
                                       "aliases": aliases, "repeat": repeat, "required_by": required_by})


@dataclass(frozen=True)
class Config:
    """All options of a job. Build it with :func:`load_config`; the defaults are in conf/default.yaml.
    Each field's :func:`option` is the one place that says its flag, its help and what it changes."""

    score_threshold: float = option("--threshold", "keep rows with aesthetic_score >= T (default 0.5; refilter: "
                                    "the threshold to re-split at)", jobs=(*BOTH, "refilter"), output=BOTH,
                                    metavar="T", required_by=("refilter",))
    model_inference_batch_size: int = option("--batch-size", "images (run) or embeddings (score) per model call "
                                             "(default 32, NeMo's)", metavar="N")
    num_gpus_per_worker: float = option()
    model_dir: str | None = option("--model-dir", "weights download/cache directory", jobs=(*BOTH, "download"),
                                   metavar="D")
    verbose: bool = option("--verbose", "log per-partition progress")
    aesthetic_weights: str = option("--aesthetic-weights", "registry name or local .pth/.safetensors",
                                    jobs=(*BOTH, "download"), metavar="W")
    embedding_column: str = option("--embedding-column", "embedding column (default: embedding)", jobs=("score",),
                                   output=("score",), metavar="NAME")
    filters: list[str] = option("--filter", "also keep only rows with NAME>=T (or >, <, <=) on a score column: "
                                "aesthetic_score or an --extra-scores NAME; repeatable, each ANDed with --threshold",
                                output=BOTH, metavar="NAME>=T", repeat=True)
    keep_embeddings: bool = option("--keep-embeddings", "write the embedding column", output=BOTH)
    keep_rejected: bool = option("--keep-rejected", "write below-threshold rows to OUT/rejected/", output=BOTH)
    partition_rows: int = option("--partition-rows", "rows per partition (a Parquet row group is split only when over twice this)",
                                 output=BOTH, metavar="N")
    scheduler: str | None = option("--scheduler", "existing Dask scheduler, e.g. tcp://host:8786", metavar="ADDRESS")
    scheduler_file: str | None = option("--scheduler-file", "existing Dask cluster's scheduler file", metavar="FILE")
    n_workers: int | None = option("--n-workers", "local cluster: worker count", metavar="N")
    threads_per_worker: int | None = option("--threads-per-worker", "local cluster: threads per worker", metavar="N")
    clip_model: str = option("--clip-model", "open_clip model name (default ViT-L-14-quickgelu)", jobs=("run", "download"),
                             output=("run",), metavar="NAME")
    clip_pretrained: str = option("--clip-pretrained", "open_clip pretrained tag or local checkpoint (default openai)",
                                  jobs=("run", "download"), output=("run",), metavar="TAG_OR_PATH")
    clip_model_config: str | None = option("--clip-model-config", "open_clip model-config JSON; its file stem is the "
                                           "model name", jobs=("run",), output=("run",), metavar="JSON")
    demo_clip: bool = option("--demo-clip", "a small randomly initialised CLIP built in model_dir instead of the "
                             "--clip-* one: shows the pipeline working offline; its scores mean nothing", jobs=("run",),
                             output=("run",))
    image_column: str = option("--image-column", "image bytes column of Parquet inputs (default image)", jobs=("run",),
                               output=("run",), metavar="NAME")
    json_fields: list[str] = option("--json-fields", "sidecar .json fields to add as typed columns", jobs=("run",),
                                    output=("run",), metavar="A,B:int64")
    write_shards: str | None = option("--write-shards", "also write kept samples as WebDataset tars into DIR",
                                      jobs=("run",), output=("run",), metavar="DIR")
    max_image_pixels: int = option("--max-image-pixels", "larger images are errors, never decoded", jobs=("run",),
                                   output=("run",), metavar="N")
    max_sidecar_bytes: int = option("--max-sidecar-bytes", "larger .txt/.json sidecars make an error row "
                                    "(default 65536)", jobs=("run",), output=("run",), metavar="N")
    # Before the decode pool, images were decoded by threads; the knob is now the pool's size.
    decode_processes: int | None = option("--decode-processes", "host processes decoding images per model worker "
                                          "(default: from the cores)", jobs=("run",), metavar="N",
                                          aliases=("decode_threads",))
    clip_compile: str = option()
    clip_cuda_graph: str = option()
    # The fingerprint holds the precision actually used (`auto` is fp16 on CUDA), not the name given.
    clip_precision: str = option(output=("run",))
    # Likewise the decoder `auto` resolves to, not the name given.
    image_decoder: str = option("--image-decoder", "pil (Pillow), torch (torchvision) or auto (default: torch)",
                                jobs=("run",))
    extra_scores: dict[str, str] = option("--extra-scores", "more heads scored from the same embedding, one float32 "
                                          "column NAME each", jobs=(*BOTH, "download"), output=BOTH,
                                          metavar="NAME=W[,NAME=W...]")
    report: bool = option("--report", "write OUT/report.html at the end (default: on)", jobs=(*BOTH, "refilter"))
    report_samples: bool = option()
    storage_options: dict[str, Any] = option("--storage-options", "fsspec options for URLs, e.g. '{\"anon\": true}'",
                                             jobs=(*BOTH, "refilter", "report"), metavar="JSON")
    dashboard: str = option()
    storage_timeout: float = option("--storage-timeout", "seconds an object-store request may go unanswered before "
                                    "it is tried again (default 20)", metavar="S")
    storage_attempts: int = option("--storage-attempts", "tries of one object-store request before its partition "
                                   "fails with the reason (default 8)", metavar="N")

    @property
    def resolved_model_dir(self) -> Path:
        """``model_dir``, or the per-user cache directory when it is unset."""
        return Path(self.model_dir).expanduser() if self.model_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        """All options, as the manifest records them (secrets in storage_options masked)."""
        return dataclasses.asdict(self) | {"storage_options": redact(without_bound(self.storage_options))}


def cli_options(job: str) -> list[dataclasses.Field]:
    """The options that ``aesthetic-dask JOB`` takes as flags, in declaration order."""
    return [f for f in fields(Config) if f.metadata["flag"] and job in f.metadata["jobs"]]


# The options that change what a job writes, per job. They (with the inputs, the weights' sha256 and
# what the job derives from them) make the job's fingerprint: re-running into the same OUT with any
# of them changed is refused unless --overwrite is given. Cluster shape, logging and the like are
# left out on purpose: they change how a job runs, never what it writes. aesthetic_weights is not
# among them because the fingerprint holds the weights' sha256 instead: the same file under another
# name or path writes the same output.
OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {job: tuple(f.name for f in fields(Config) if job in f.metadata["output"])
                                              for job in BOTH}
# Options that change how a job runs, never what it writes.
RUNTIME_OPTIONS = tuple(f.name for f in fields(Config) if not f.metadata["output"])
# Names load_config also takes for an option: its CLI flag in snake_case (`threshold`) and former names.
ALIASES = {alias: f.name for f in fields(Config)
           for alias in ((f.metadata["flag"] or "--").removeprefix("--").replace("-", "_"), *f.metadata["aliases"])
           if alias and alias != f.name}


# Output options added after OUTs were written, at a default that writes what those OUTs hold:
# left out of the settings (and so the fingerprint) at that default, so those OUTs still resume.
ADDED_AT_DEFAULT = {"filters": []}


def output_settings(config: Config, job: str, **derived: Any) -> dict[str, Any]:
    """What one job's output depends on: its :data:`OUTPUT_OPTIONS` plus ``derived`` values
    (inputs, weights sha256, file digests, the precision actually used)."""
    return {name: getattr(config, name) for name in OUTPUT_OPTIONS[job]
            if ADDED_AT_DEFAULT.get(name, ...) != getattr(config, name)} | derived


def fingerprint(settings: dict[str, Any]) -> str:
    """The job's fingerprint: a digest of its :func:`output_settings` (an OUT is this job's when equal)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/aesthetic-dask`` (usually ~/.cache/aesthetic-dask)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "aesthetic-dask"


def default_config_text() -> str:
    """The text of the packaged ``conf/default.yaml``."""
    return resources.files("aesthetic_dask.conf").joinpath("default.yaml").read_text()


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: nine levels of ``*a`` in 864 bytes expand to billions
    of values (an alias bomb), and a config never needs one."""

    origin = "config"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.origin}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                              "are not accepted in a config; write the value out")
        return super().compose_node(parent, index)


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    loader = type("Loader", (_NoAliasLoader,), {"origin": origin})
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader
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
    if name in ("dashboard", "clip_compile", "clip_cuda_graph") and isinstance(value, bool):  # YAML reads `true` as a bool
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
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); "
                              "a config file is YAML in UTF-8") from None
        _merge(values, _read_yaml(text, str(p)), str(p))
    _merge(values, {k: v for k, v in overrides.items() if v is not None}, "override")
    config = Config(**values)
    _validate(config)
    # What every filesystem of the job is built with (storage.split): the bound travels with the options.
    return dataclasses.replace(config, storage_options=with_bound(config.storage_options, config.storage_timeout,
                                                                  config.storage_attempts))


def _validate(config: Config) -> None:
    import math

    if not math.isfinite(config.score_threshold):
        raise ConfigError(f"score_threshold (--threshold) must be a finite number, got {config.score_threshold}")
    parse_all(config.filters, config.extra_scores)
    for name, flag in (("n_workers", "--n-workers"), ("threads_per_worker", "--threads-per-worker"),
                       ("decode_processes", "--decode-processes")):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} ({flag}) must be >= 1, got {value}")
    if config.model_inference_batch_size < 1:
        raise ConfigError("model_inference_batch_size (--batch-size) must be >= 1")
    if not 0 < config.num_gpus_per_worker <= 1:
        raise ConfigError("num_gpus_per_worker must be in (0, 1]")
    if not config.storage_timeout > 0 or config.storage_attempts < 1:
        raise ConfigError("storage_timeout (--storage-timeout) must be > 0 and storage_attempts (--storage-attempts) >= 1")
    if config.partition_rows < 1:
        raise ConfigError("partition_rows (--partition-rows) must be >= 1")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            flag = f" (--{name.replace('_', '-')})" if name == "image_decoder" else ""
            raise ConfigError(f"{name}{flag} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {getattr(config, name)!r}")
    if config.max_image_pixels < 1:
        raise ConfigError("max_image_pixels (--max-image-pixels) must be >= 1")
    if config.max_sidecar_bytes < 0:
        raise ConfigError("max_sidecar_bytes (--max-sidecar-bytes) must be >= 0")
    if config.scheduler and config.scheduler_file:
        raise ConfigError("give either scheduler or scheduler_file, not both")
