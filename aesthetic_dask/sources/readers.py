"""The notebook's readers: each job's inputs as a lazy Dask frame, planned by the same kinds as
the jobs (:mod:`.registry`), one ``dd.from_map`` partition per planned part, with a declared meta.
An input that cannot be read raises :class:`errors.DataError` naming it."""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from ..image_reader import MAX_SIDECAR_BYTES, parse_json_fields
from .image_parquet import IMAGE_PARQUET_ROWS, ImageParquet
from .kind import InputOptions
from .registry import plan_embeddings, plan_inputs
from .shards import Shards


def _frame(planned: Any, opts: InputOptions) -> Any:
    if planned.failed:
        path, reason = next(iter(planned.failed.items()))
        raise DataError(f"{path}: {reason}")
    import dask.dataframe as dd

    frames = [plan.kind.frame(plan, opts) for plan in planned.plans]
    return frames[0] if len(frames) == 1 else dd.concat(frames)


def read_webdataset(paths: list[str] | str, json_fields: list[str] | str | None = None,
                    max_sidecar_bytes: int = MAX_SIDECAR_BYTES, storage_options: dict[str, Any] | None = None):
    """Lazy Dask frame of WebDataset shards, one partition per shard.

    Columns: ``key``, ``source``, ``image`` (bytes), ``image_ext``, ``caption``, ``json`` (the
    sidecar's text), the ``json_fields`` as typed columns, and ``error`` ("no image").
    """
    opts = InputOptions("image", 0, storage_options=storage_options, json_fields=parse_json_fields(json_fields),
                        max_sidecar_bytes=max_sidecar_bytes)
    return _frame(plan_inputs((Shards(),), paths, opts), opts)


def read_image_parquet(paths: list[str] | str, image_column: str = "image", partition_rows: int = IMAGE_PARQUET_ROWS,
                       storage_options: dict[str, Any] | None = None):
    """Lazy Dask frame of Parquet files holding image bytes (binary or ``struct<bytes, path>``)."""
    opts = InputOptions(image_column, partition_rows, storage_options=storage_options)
    return _frame(plan_inputs((ImageParquet(),), paths, opts), opts)


def read_embeddings(
    paths: list[str] | str, embedding_column: str = "embedding", partition_rows: int = 131072,
    storage_options: dict[str, Any] | None = None,
):
    """Lazy ``dask.dataframe.DataFrame`` of Parquet embedding files or clip-retrieval folders.

    ``paths``: files, directories or globs, local or fsspec URLs (``s3://...`` with
    ``storage_options``). The embedding column is ``list<float32>``; other columns keep their
    Arrow types, unified across files. Unreadable files raise ``DataError``.
    """
    planned = plan_embeddings(paths, embedding_column, partition_rows, storage_options=storage_options)
    return _frame(planned, InputOptions(embedding_column, partition_rows, storage_options=storage_options))
