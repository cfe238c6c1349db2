"""WebDataset shards (``run``): one partition per tar, streamed member by member by a process of
the worker's decode pool (its source: :class:`ShardImages`), the samples' other
members as columns (``.txt`` the caption, ``.json`` as text, ``json_fields`` typed). The tar
sample layer itself is :mod:`image_reader` and :mod:`tar_stream`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import DataError
from ..image_reader import MAX_SIDECAR_BYTES, SHARD_SUFFIXES, ShardPart, ShardReader, samples_table, shard_schema
from ..image_rows import EmbeddedRows, embedded_facts
from ..pipeline.host import Item
from ..rows import ScoredRows
from .kind import InputKind, InputOptions, KindPlan

# Members of a sample read into the frame, never carried into the job's output files.
_NOT_WRITTEN = ("image", "image_ext", "error")


@dataclass(frozen=True)
class ShardImages:
    """How a decode process opens a shard: streamed by it, member by member (its image bytes never
    cross the process boundary)."""

    source: str
    max_sidecar_bytes: int
    storage_options: dict[str, Any] | None = None

    def items(self, failure: list[str]) -> Iterator[Item]:
        """The shard's samples, in order; why it stopped early goes in ``failure`` (and ``unread``
        when it could not be opened at all: its rows are unknown)."""
        reader = ShardReader(self.source, max_sidecar_bytes=self.max_sidecar_bytes, storage_options=self.storage_options)
        for sample in reader:
            data, sample.image = sample.image, None
            yield Item(sample, sample.key, None if sample.error else data)
        if reader.failure:
            failure.append(f"{self.source}: {reader.failure}")
            if not reader.opened:
                failure.append("unread")


@dataclass(frozen=True)
class ShardRows(EmbeddedRows):
    """A WebDataset shard: a host process of the worker's pool reads and decodes it, the model
    embeds and scores its images; the samples' other members become columns (``fields``: the
    sidecar JSON's typed columns)."""

    fields: dict[str, Any] = field(default_factory=dict)
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES

    def read(self, part: Any) -> ScoredRows:
        embedded = self.embedded(ShardImages(part.source, self.max_sidecar_bytes, self.storage_options))
        if not embedded.rows_known:  # e.g. deleted after planning: its size is unknown, never a silent 0
            raise DataError(embedded.failure)
        samples = embedded.metas
        base = samples_table(samples, part.source, self.fields, with_images=False).drop_columns(["image", "image_ext"])
        note = f"{part.source}: empty shard: no samples" if not samples and not embedded.failure else None
        return ScoredRows(self.with_scores(base, embedded), np.array([s.index for s in samples], dtype=np.int64),
                          embedded.thumbnails, embedded.failure, note, embedded_facts(embedded), from_tar=True)


def read_shard(part: ShardPart, fields: dict[str, pa.DataType], max_sidecar_bytes: int = MAX_SIDECAR_BYTES,
               storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The notebook's partition function: one shard as a pandas frame.

    A shard that cannot be read whole raises :class:`DataError` naming it (as Dask's own readers
    do on a corrupt file); the ``run`` job instead keeps the samples before the damage and
    records the failure, with the same :class:`image_reader.ShardReader`.
    """
    reader = ShardReader(part.source, max_sidecar_bytes=max_sidecar_bytes, storage_options=storage_options)
    samples = list(reader)
    if reader.failure:
        raise DataError(f"{part.source}: {reader.failure}")
    return samples_table(samples, part.source, fields).to_pandas(types_mapper=pd.ArrowDtype)


class Shards(InputKind):
    name = "webdataset"
    job = "run"
    suffixes = SHARD_SUFFIXES

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        return KindPlan(self, [ShardPart(f) for f in inputs], shard_schema(opts.json_fields))

    def columns(self, plan: KindPlan, opts: InputOptions) -> pa.Schema:
        return pa.schema([f for f in plan.schema if f.name not in _NOT_WRITTEN])

    def rows(self, plan: KindPlan, opts: InputOptions, **scoring: Any) -> ShardRows:
        return ShardRows(**scoring, storage_options=opts.storage_options, fields=opts.json_fields,
                         max_sidecar_bytes=opts.max_sidecar_bytes)

    def frame(self, plan: KindPlan, opts: InputOptions) -> Any:
        import dask.dataframe as dd

        meta = plan.schema.empty_table().to_pandas(types_mapper=pd.ArrowDtype)
        return dd.from_map(read_shard, plan.parts, fields=opts.json_fields, max_sidecar_bytes=opts.max_sidecar_bytes,
                           storage_options=opts.storage_options, meta=meta, enforce_metadata=False,
                           label="read-webdataset")
