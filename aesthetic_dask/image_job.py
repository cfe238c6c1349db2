"""The ``run`` job: WebDataset shards or image Parquet -> CLIP embeddings -> scores -> filtered Parquet.

Per partition (a shard, or a row range of an image Parquet file): stream the samples, embed and
score them where the model runs (:func:`embed.embed_stream`; image bytes are let go as soon as they
are embedded, so memory per task does not grow with image sizes), and write
kept/rejected/errors, plus WebDataset tars of the kept samples with ``--write-shards``. The
notebook API runs the same stage functions.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .config import Config, output_settings
from .embed import ClipSpec, EmbedOptions, attach_embedded, compute_precision, embed_stream, prepare_clip_weights
from .decode import resolve_decoder
from .embeddings_reader import EmbeddingPart, plan_parquet
from .errors import InputError
from .image_reader import (SHARD_SUFFIXES, ShardPart, ShardReader, check_image_type, image_values, iter_members,
                           parse_json_fields, samples_table, shard_schema)
from .job import Job, Work, package_versions, run_parts
from .output import OutputLayout, WriteOptions, split_and_write
from .partition import finish_record, new_record, process_parquet_part
from .predictor import AestheticPredictor, load_extra_heads, load_job_predictor
from .samples import wants_thumbnail
from .score import SCORE_COLUMN, check_extra_score_names, table_keep_mask
from .sources import list_inputs
from .weights import REGISTRY

# Rows per partition of image Parquet: all their image bytes are in memory at once.
IMAGE_PARQUET_ROWS = 4096
PARQUET_SUFFIXES = (".parquet", ".pq")
VERSIONED_PACKAGES = ("aesthetic-dask", "dask", "distributed", "pandas", "pyarrow", "numpy", "torch", "torchvision", "open_clip_torch", "pillow")


def process_shard(part: ShardPart, fields: dict, clip_spec: ClipSpec, predictor: AestheticPredictor, out: str,
                  opts: WriteOptions, embed: EmbedOptions, write_shards: str | None,
                  extras: dict[str, AestheticPredictor] | None = None, max_sidecar_bytes: int = 65536,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, embed, score and write one WebDataset shard; return its record."""
    t0 = time.perf_counter()
    layout = OutputLayout(out, storage_options)
    reader = ShardReader(part.source, max_sidecar_bytes=max_sidecar_bytes, storage_options=storage_options)
    samples = []

    def images():
        for sample in reader:
            samples.append(sample)
            data, sample.image = sample.image, None  # bytes live only until embedded
            yield None if sample.error else data

    thumbnail_for = report_thumbnails(lambda i: samples[i].key) if opts.samples else None
    embedded = embed_stream(images(), clip_spec, embed, predictor.embed_dim, thumbnail_for,
                            heads=[predictor, *(extras or {}).values()], keep_embeddings=opts.keep_embeddings)
    base = samples_table(samples, part.source, fields, with_images=False).drop_columns(["image", "image_ext"])
    table = attach_embedded(base, embedded, extras or {})
    record = new_record(part) | {"clip_compute": embedded.compute, "image_decoder": embedded.decoder}
    rows = np.array([s.index for s in samples], dtype=np.int64)
    t_write = time.perf_counter()
    record |= split_and_write(table, rows, part.name, part.source, layout, opts, embedded.thumbnails)
    record["stage_s"] = embedded.timings | {"write_s": round(time.perf_counter() - t_write, 4)}
    if reader.failure:
        record["failure"] = f"{part.source}: {reader.failure}"
    elif not samples:
        record["note"] = f"{part.source}: empty shard: no samples"
    if write_shards and record["rows_kept"]:
        keep, _ = table_keep_mask(table, opts.threshold)
        kept = {s.index for s, k in zip(samples, keep) if k}
        target = storage.join(write_shards, f"{part.name}.tar")
        write_kept_shard(part.source, kept, target, layout.tmp, storage_options)
        record["files"].append(target)  # a full path or URL: checked on resume like the rest
    return finish_record(layout, record, t0)


def write_kept_shard(source: str, kept: set[int], target: str, tmp_dir: str | None,
                     storage_options: dict[str, Any] | None = None) -> None:
    """Copy the regular-file members of the kept samples (by sample index: a key may repeat
    non-consecutively in a tar) with their original bytes and names into a new tar, streamed and
    written whole or not at all (:func:`storage.atomic_open`)."""
    from .image_reader import _TailStream

    src_fs, src_path = storage.split(source, storage_options)
    dst_fs, dst_path = storage.split(target, storage_options)
    with src_fs.open(src_path, "rb") as raw, tarfile.open(fileobj=_TailStream(raw), mode="r|") as src, \
            storage.atomic_open(dst_fs, dst_path, tmp_dir) as out, tarfile.open(fileobj=out, mode="w|") as dst:
        try:
            for index, _, _, member in iter_members(src):
                if index in kept and member.isfile():
                    dst.addfile(member, src.extractfile(member))
        except (tarfile.TarError, EOFError, OSError):
            pass  # a truncated source: its readable part was what got scored


def report_thumbnails(key_of: Any) -> Any:
    """``thumbnail_for(i)`` of :func:`embed.embed_stream`: which samples of a partition get a thumbnail."""
    made = 0

    def thumbnail_for(i: int) -> bool:
        nonlocal made
        wanted = wants_thumbnail(i, key_of(i), made)
        made += wanted
        return wanted

    return thumbnail_for


def score_image_table(table: pa.Table, column: str, clip_spec: ClipSpec, predictor: AestheticPredictor,
                      embed: EmbedOptions, extras: dict[str, AestheticPredictor] | None = None,
                      thumbnails: bool = True, keep_embeddings: bool = True) -> tuple[pa.Table, dict[int, bytes] | None]:
    """Rows of an image Parquet file, with the image column replaced by embedding, score and error;
    and the report's thumbnails by row."""
    keys = table.column("key").cast(pa.string()).to_pylist() if "key" in table.column_names else None
    thumbnail_for = report_thumbnails(lambda i: keys[i] if keys else None) if thumbnails else None
    embedded = embed_stream(image_values(table.column(column)), clip_spec, embed, predictor.embed_dim, thumbnail_for,
                            heads=[predictor, *(extras or {}).values()], keep_embeddings=keep_embeddings)
    scored = attach_embedded(table.drop_columns([column]), embedded, extras or {})
    return scored, embedded.thumbnails if thumbnails else None


def process_image_parquet_part(part: EmbeddingPart, schema: pa.Schema, column: str, clip_spec: ClipSpec,
                               predictor: AestheticPredictor, out: str, opts: WriteOptions, embed: EmbedOptions,
                               extras: dict[str, AestheticPredictor] | None = None,
                               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, embed, score and write rows of an image Parquet file; return its record."""
    scorer = partial(score_image_table, column=column, clip_spec=clip_spec, predictor=predictor, embed=embed, extras=extras,
                     thumbnails=opts.samples, keep_embeddings=opts.keep_embeddings)
    return process_parquet_part(part, schema, column, out, opts, scorer, storage_options)


def run_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True,
           started: float | None = None) -> tuple[dict[str, Any], int]:
    """Run the image job over shards and image Parquet; return (manifest, exit code)."""
    from .cluster import dask_client, task_resources

    started, t0 = started or time.time(), time.perf_counter()
    require_clip_extra()
    so = config.storage_options
    layout = OutputLayout(out, so)
    shards_dir = _absolute(config.write_shards) if config.write_shards else None
    exclude = (layout.url(),) + ((shards_dir,) if shards_dir else ())
    clip_spec = ClipSpec.from_config(config)
    fields = parse_json_fields(config.json_fields)
    listed = list_inputs(inputs, SHARD_SUFFIXES + PARQUET_SUFFIXES, exclude, so)
    tars = [f for f in listed.files if not f.lower().endswith(PARQUET_SUFFIXES)]
    parquets = [f for f in listed.files if f.lower().endswith(PARQUET_SUFFIXES)]
    shard_parts = [ShardPart(t) for t in tars]
    pq_plan = plan_parquet(parquets, config.image_column, check_image_type, min(config.partition_rows, IMAGE_PARQUET_ROWS),
                           pa.binary(), reserved=("aesthetic_score", "error", "embedding"), storage_options=so) if parquets else None

    # Compatibility first: a head trained on another CLIP is refused before anything is downloaded.
    heads = {SCORE_COLUMN: config.aesthetic_weights, **config.extra_scores}
    compatibility = clip_spec.check(heads={column: REGISTRY.get(w) for column, w in heads.items()})
    predictor, weights = load_job_predictor(config)
    extras, extra_info = load_extra_heads(config, predictor.embed_dim)
    clip_spec.check(predictor.embed_dim)
    clip_spec, clip_weights = prepare_clip_weights(clip_spec)  # present or fetchable, before any task
    check_extra_score_names(extras, shard_schema(fields).names + (pq_plan.schema.names if pq_plan else []))
    opts = WriteOptions(config.score_threshold, "embedding", config.keep_embeddings, config.keep_rejected,
                        predictor.embed_dim, tuple(extras), samples=config.report_samples)
    embed = EmbedOptions.from_config(config)
    failed_inputs = dict(pq_plan.failed) if pq_plan else {}
    work = []
    common = dict(clip_spec=clip_spec, predictor=predictor, out=layout.url(), opts=opts, embed=embed, extras=extras,
                  storage_options=so)
    if shard_parts:
        work.append(Work(shard_parts, process_shard, dict(fields=fields, write_shards=shards_dir,
                                                          max_sidecar_bytes=config.max_sidecar_bytes, **common)))
    if pq_plan and pq_plan.parts:
        work.append(Work(pq_plan.parts, process_image_parquet_part, dict(schema=pq_plan.schema, column=config.image_column, **common)))
    if not work and not failed_inputs:
        raise InputError(f"no shards or image Parquet files found in {', '.join(map(str, inputs))}")
    plan_s = round(time.perf_counter() - t0, 3)

    with dask_client(config, model_work=True) as (client, device):
        settings = output_settings(
            config, "run",
            inputs=sorted(str(f) for f in listed.files),
            weights_sha256=weights["sha256"],
            extra_scores_sha256={k: v["sha256"] for k, v in extra_info.items()},
            write_shards=shards_dir,
            clip_model_config_sha256=_file_digest(clip_spec.model_config),
            clip_compute=compute_precision(config.clip_precision, device),
            image_decoder=resolve_decoder(config.image_decoder, device),
        )
        job = Job(
            kind="run",
            layout=layout,
            settings=settings,
            info={
                "config": config.to_dict(),
                "weights": weights,
                "extra_scores": extra_info,
                "clip": {"model": clip_spec.model, "pretrained": clip_spec.pretrained, "model_config": clip_spec.model_config,
                         "compatibility": compatibility, "weights": clip_weights},
                "versions": package_versions(VERSIONED_PACKAGES),
            },
            failed_inputs=failed_inputs,
            duplicate_inputs=listed.duplicates,
            started=started,
            report=config.report,
        )
        job.timings["plan_s"] = plan_s
        job.timings["cluster_s"] = round(time.perf_counter() - t0 - plan_s, 3)
        return run_parts(job, client, work, overwrite=overwrite, resources=task_resources(config, device),
                         progress=progress and not config.verbose, unit="images")


def require_clip_extra() -> None:
    """The ``run`` job needs torch, torchvision, open_clip and Pillow: say so in one line if absent."""
    import importlib.util

    missing = [m for m in ("torch", "torchvision", "open_clip", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"aesthetic-dask run needs the clip extra ({', '.join(missing)} missing): "
                         "pip install 'aesthetic-dask[clip]'")


def _absolute(url: str) -> str:
    """A local path made absolute in the client (workers may run elsewhere); URLs as given."""
    return url if "://" in url else os.path.abspath(url)


def _file_digest(path: str | None) -> str | None:
    """sha256 of a small file's content (an open_clip model config), so an edit changes the fingerprint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
