"""The ``run`` job: WebDataset shards or image Parquet -> CLIP embeddings -> scores -> filtered Parquet.

Per partition (a shard, or a row range of an image Parquet file): stream the samples, decode and
embed them in batches (image bytes are let go as soon as they are embedded, so memory per task
does not grow with image sizes), score the embeddings, and write kept/rejected/errors, plus
WebDataset tars of the kept samples with ``--write-shards``.
"""

from __future__ import annotations

import os
import tarfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Config
from .embed import ClipSpec, ImageEmbedder, embedding_column, load_clip
from .embeddings_reader import EmbeddingPart, plan_parquet
from .errors import InputError
from .image_reader import ShardPart, ShardReader, check_image_type, image_values, parse_json_fields, plan_shards, samples_table, split_key
from .job import Job, load_scoring_weights, package_versions, process_parquet_part, record_frame, run_parts
from .output import OutputLayout, WriteOptions, keep_mask, split_and_write, write_record
from .predictor import AestheticPredictor
from .score import ERROR_COLUMN, SCORE_COLUMN, merge_errors

# Rows per partition of image Parquet: all their image bytes are in memory at once.
IMAGE_PARQUET_ROWS = 4096
VERSIONED_PACKAGES = ("aesthetic-dask", "dask", "distributed", "pandas", "pyarrow", "numpy", "torch", "torchvision", "open_clip_torch", "pillow")


def _embed_and_score(
    images: Iterable[bytes | None], clip_spec: ClipSpec, predictor: AestheticPredictor, embed: dict[str, Any]
) -> tuple[pa.Array, np.ndarray, list[str | None]]:
    """(embedding column, float32 scores, reasons) for a stream of image bytes."""
    clip = load_clip(clip_spec)
    if clip.embed_dim != predictor.embed_dim:
        raise InputError(f"CLIP model {clip_spec.model} gives {clip.embed_dim}-d embeddings; the predictor expects {predictor.embed_dim}")
    embedder = ImageEmbedder(clip, embed["batch_size"], embed["max_pixels"], embed["decode_threads"])
    rows, reasons = [], []
    for emb, reason in embedder.embed(images):
        rows.append(emb)
        reasons.append(reason)
    valid = np.array([r is not None for r in rows], dtype=bool)
    scores = np.full(len(rows), np.nan, dtype=np.float32)
    if valid.any():
        scores[valid] = predictor.score_unit(np.stack([r for r in rows if r is not None]))
    return embedding_column(rows, clip.embed_dim), scores, reasons


def _scored_table(base: pa.Table, embeddings: pa.Array, scores: np.ndarray, reasons: list[str | None]) -> pa.Table:
    earlier = base.column(ERROR_COLUMN) if ERROR_COLUMN in base.column_names else None
    error = merge_errors(earlier, pa.array(reasons, pa.string()))
    table = base.drop_columns([c for c in (ERROR_COLUMN,) if c in base.column_names])
    return table.append_column("embedding", embeddings).append_column(SCORE_COLUMN, pa.array(scores)).append_column(ERROR_COLUMN, error)


def process_shard(part: ShardPart, fields: dict, clip_spec: ClipSpec, predictor: AestheticPredictor, out: str,
                  opts: WriteOptions, embed: dict[str, Any], write_shards: str | None) -> pd.DataFrame:
    """Read, embed, score and write one WebDataset shard; return its record."""
    t0 = time.perf_counter()
    layout = OutputLayout(Path(out))
    reader = ShardReader(part.source)
    samples = []

    def images():
        for sample in reader:
            samples.append(sample)
            data, sample.image = sample.image, None  # bytes live only until embedded
            yield None if sample.error else data

    embeddings, scores, reasons = _embed_and_score(images(), clip_spec, predictor, embed)
    base = samples_table(samples, part.source, fields, with_images=False).drop_columns(["image", "image_ext"])
    table = _scored_table(base, embeddings, scores, reasons)
    record: dict[str, Any] = {"name": part.name, "source": part.source}
    record |= split_and_write(table, np.array([s.index for s in samples], dtype=np.int64), part.name, part.source, layout, opts)
    if reader.failure:
        record["failure"] = f"{part.source}: {reader.failure}"
    elif not samples:
        record["note"] = f"{part.source}: empty shard: no samples"
    if write_shards and record["rows_kept"]:
        keep, _ = keep_mask(table, opts.threshold)
        kept_keys = {s.key for s, k in zip(samples, keep) if k}
        shard = write_kept_shard(part.source, kept_keys, Path(write_shards) / f"{part.name}.tar", layout.tmp)
        record["files"].append(str(shard))  # absolute: checked on resume like the rest
    record["seconds"] = round(time.perf_counter() - t0, 4)
    write_record(layout, record)
    return record_frame(record)


def write_kept_shard(source: str, keys: set[str], target: Path, tmp_dir: Path) -> Path:
    """Copy the members of the kept samples (original bytes, same names) into a new tar, atomically."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{target.name}.{uuid.uuid4().hex}.tmp"
    with tarfile.open(source, mode="r|*") as src, tarfile.open(tmp, mode="w") as dst:
        try:
            for member in src:
                if member.isfile() and split_key(member.name)[0] in keys:
                    dst.addfile(member, src.extractfile(member))
        except (tarfile.TarError, EOFError, OSError):
            pass  # a truncated source: its readable part was what got scored
    os.replace(tmp, target)
    return target


def score_image_table(table: pa.Table, column: str, clip_spec: ClipSpec, predictor: AestheticPredictor, embed: dict[str, Any]) -> pa.Table:
    """Rows of an image Parquet file, with the image column replaced by embedding, score and error."""
    embeddings, scores, reasons = _embed_and_score(image_values(table.column(column)), clip_spec, predictor, embed)
    return _scored_table(table.drop_columns([column]), embeddings, scores, reasons)


def process_image_parquet_part(part: EmbeddingPart, schema: pa.Schema, column: str, clip_spec: ClipSpec,
                               predictor: AestheticPredictor, out: str, opts: WriteOptions, embed: dict[str, Any]) -> pd.DataFrame:
    """Read, embed, score and write rows of an image Parquet file; return its record."""
    scorer = partial(score_image_table, column=column, clip_spec=clip_spec, predictor=predictor, embed=embed)
    return process_parquet_part(part, schema, column, out, opts, scorer)


def run_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], int]:
    """Run the image job over shards and image Parquet; return (manifest, exit code)."""
    from .cluster import dask_client, task_resources
    from .sources import expand_inputs

    t0 = time.perf_counter()
    out = Path(out)
    clip_spec = ClipSpec.from_config(config)
    fields = parse_json_fields(config.json_fields)
    files = expand_inputs(inputs, (".tar", ".tar.gz", ".tgz", ".parquet", ".pq"))
    tars = [str(f) for f in files if not f.name.lower().endswith((".parquet", ".pq"))]
    parquets = [str(f) for f in files if f.name.lower().endswith((".parquet", ".pq"))]
    shard_parts = plan_shards(tars) if tars else []
    pq_plan = plan_parquet(parquets, config.image_column, check_image_type, min(config.partition_rows, IMAGE_PARQUET_ROWS), pa.binary()) if parquets else None

    predictor, weights = load_scoring_weights(config)
    clip_spec.check(predictor.embed_dim)
    shards_dir = str(Path(config.write_shards).resolve()) if config.write_shards else None
    opts = WriteOptions(config.score_threshold, "embedding", config.keep_embeddings, config.keep_rejected, predictor.embed_dim)
    embed = {"batch_size": config.model_inference_batch_size, "max_pixels": config.max_image_pixels, "decode_threads": config.decode_threads}
    settings = {
        "inputs": sorted(str(Path(f).resolve()) for f in files),
        "score_threshold": config.score_threshold,
        "clip_model": clip_spec.model,
        "clip_pretrained": config.clip_pretrained,
        "json_fields": config.json_fields,
        "image_column": config.image_column,
        "keep_embeddings": config.keep_embeddings,
        "keep_rejected": config.keep_rejected,
        "max_image_pixels": config.max_image_pixels,
        "write_shards": shards_dir,
        "weights_sha256": weights["sha256"],
    }
    job = Job(
        kind="run",
        layout=OutputLayout(out),
        settings=settings,
        info={
            "config": config.to_dict(),
            "weights": weights,
            "clip": {"model": clip_spec.model, "pretrained": clip_spec.pretrained, "model_config": clip_spec.model_config},
            "versions": package_versions(VERSIONED_PACKAGES),
        },
        failed_inputs=dict(pq_plan.failed) if pq_plan else {},
    )
    job.timings["plan_s"] = round(time.perf_counter() - t0, 3)
    common = dict(clip_spec=clip_spec, predictor=predictor, out=str(out.resolve()), opts=opts, embed=embed)
    work = []
    if shard_parts:
        work.append((shard_parts, process_shard, dict(fields=fields, write_shards=shards_dir, **common)))
    if pq_plan and pq_plan.parts:
        work.append((pq_plan.parts, process_image_parquet_part, dict(schema=pq_plan.schema, column=config.image_column, **common)))
    if not work and not job.failed_inputs:
        raise InputError(f"no shards or image Parquet files found in {', '.join(map(str, inputs))}")
    with dask_client(config, model_work=True) as (client, device):
        return run_parts(job, client, work, overwrite=overwrite, resources=task_resources(config, device),
                         progress=progress and not config.verbose)
