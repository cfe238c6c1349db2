"""The ``run`` job: WebDataset shards or image Parquet -> CLIP embeddings -> scores -> filtered Parquet.

Each partition (a shard, or a row range of an image Parquet file) is one Dask task of the one
partition pipeline (:func:`partition.process`): its samples streamed, decoded by the worker's pool,
embedded and scored where the model runs (the input kinds' readers, :mod:`.sources`;
image bytes are let go as soon as they are embedded, so memory per task does not grow with image
sizes), then the Parquet sink and, with ``--write-shards``, the shard sink. The notebook API runs
the same stage functions.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import storage
from .columns import EMBEDDING_COLUMN, SCORE_COLUMN, written_by
from .config import Config
from .errors import InputError
from .image_reader import parse_json_fields
from .launch import Planned, run_planned
from .models.clip import ClipSpec, compute_precision, prepare_clip_weights
from .models.fetch import registered_entry
from .output import OutputLayout
from .parquet_sink import ParquetSink
from .pipeline.decode import resolve_decoder
from .pipeline.stage import EmbedOptions, ModelPlugin
from .preparation import Heads, kind_work
from .records import read_footers
from .samples import SamplesSink
from .score import check_extra_score_names
from .shard_sink import ShardSink, shard_names
from .sources.image_parquet import IMAGE_PARQUET_ROWS
from .sources.kind import InputOptions
from .sources.registry import for_job, plan_inputs

# The `clip` extra (pyproject.toml): import name -> distribution. The job checks the first before
# any work and records the versions of the second in its manifest.
CLIP_EXTRA = {"torch": "torch", "torchvision": "torchvision", "open_clip": "open_clip_torch", "PIL": "pillow"}


def run_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True,
            started: float | None = None, prune_missing: bool = False) -> tuple[dict[str, Any], int]:
    """Run the image job over shards and image Parquet; return (manifest, exit code)."""
    started, t0 = started or time.time(), time.perf_counter()
    require_clip_extra()
    so = config.storage_options
    layout = OutputLayout(out, so)
    shards_dir = _absolute(config.write_shards) if config.write_shards else None
    exclude = (layout.url(),) + ((shards_dir,) if shards_dir else ())
    clip_spec = ClipSpec.from_config(config)
    cached = read_footers(layout)  # a re-run reads the footers of new and changed inputs only
    # Image Parquet partitions hold all their image bytes at once (IMAGE_PARQUET_ROWS at most); their
    # image column, never written, is binary across inputs (struct<bytes, path> files beside binary ones).
    reading = InputOptions(config.image_column, min(config.partition_rows, IMAGE_PARQUET_ROWS), exclude=exclude,
                           storage_options=so, footer_cache=cached, reserved=written_by("run"), canonical=pa.binary(),
                           json_fields=parse_json_fields(config.json_fields), max_sidecar_bytes=config.max_sidecar_bytes)
    inputs_plan = plan_inputs(for_job("run"), inputs, reading)

    # Compatibility first: a head trained on another CLIP (by name, or a file that is a registered
    # head by its sha256) is refused before any availability check or download.
    named_heads = {SCORE_COLUMN: config.aesthetic_weights, **config.extra_scores}
    compatibility = clip_spec.check(heads={column: registered_entry(w) for column, w in named_heads.items()})
    heads = Heads.load(config)
    clip_spec.check(heads.predictor.embed_dim)
    clip_spec, clip_weights = prepare_clip_weights(clip_spec)  # present or fetchable, before any task
    plans = inputs_plan.plans
    columns = [plan.kind.columns(plan, reading) for plan in plans]
    check_extra_score_names(heads.extras, [name for plan in plans for name in plan.schema.names])
    written = pa.unify_schemas(columns, promote_options="permissive") if columns else None
    opts = heads.write_options(config, EMBEDDING_COLUMN, written)
    embed = EmbedOptions.from_config(config)
    sinks: tuple = (ParquetSink(), SamplesSink())
    if shards_dir:
        sinks += (ShardSink(shards_dir, shard_names(inputs_plan.parts), config.image_column, so),)
    scoring = dict(clip_spec=clip_spec, embed=embed, predictor=heads.predictor, extras=heads.extras,
                   thumbnails=opts.samples, keep_embeddings=opts.keep_embeddings)
    common = dict(out=layout.url(), opts=opts, sinks=sinks, storage_options=so)
    work = kind_work(plans, reading, scoring, common)
    failed_inputs = inputs_plan.failed
    if not work and not failed_inputs:
        raise InputError(f"no shards or image Parquet files found in {', '.join(map(str, inputs))}")
    clip_info = {"model": clip_spec.model, "pretrained": clip_spec.pretrained, "model_config": clip_spec.model_config,
                 "compatibility": compatibility, "weights": clip_weights, "demo": clip_spec.demo}
    planned = Planned(
        "run", work, sorted(inputs_plan.files), failed_inputs, inputs_plan.duplicates, inputs_plan.notes,
        inputs_plan.footers, cached, model_work=True,
        # What the workers will compute in (``auto`` is fp16 on CUDA) is known once the device is.
        derived=lambda device: dict(write_shards=shards_dir, clip_model_config_sha256=_file_digest(clip_spec.model_config),
                                    clip_compute=compute_precision(config.clip_precision, device),
                                    image_decoder=resolve_decoder(config.image_decoder)),
        info={"clip": clip_info}, clip=clip_info, versions=tuple(CLIP_EXTRA.values()),
        # Once OUT is this job's: each worker starts its model and decode pool.
        start_workers=lambda client: client.register_plugin(ModelPlugin(clip_spec, embed)))
    return run_planned(planned, config, layout, heads, started, t0, overwrite, prune_missing, progress)


def require_clip_extra() -> None:
    """The ``run`` job needs torch, torchvision, open_clip and Pillow: say so in one line if absent."""
    import importlib.util

    missing = [m for m in CLIP_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"aesthetic-dask run needs the clip extra ({', '.join(missing)} missing): "
                         "pip install 'aesthetic-dask[clip]'")


def _absolute(url: str) -> str:
    """A local path made absolute in the client (workers may run elsewhere); URLs as given."""
    return url if storage.is_url(url) else storage.local_path(url)


def _file_digest(path: str | None) -> str | None:
    """sha256 of a small file's content (an open_clip model config), so an edit changes the fingerprint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
