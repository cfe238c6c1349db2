"""The image kinds' rows (``run``), read and scored: the first steps of the one partition
pipeline (:func:`partition.process`) for a WebDataset shard (:class:`ShardRows`) and a row range of
a Parquet file of images (:class:`ImageParquetRows`). Their images are read and decoded by the
worker's decode pool, embedded and scored where the model runs (:func:`pipeline.stage.embed_source`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .embed import attach_embedded
from .embeddings_reader import read_embedding_table
from .errors import DataError
from .image_reader import samples_table
from .pipeline.host import ParquetImages, ShardImages
from .pipeline.stage import embed_source
from .rows import ScoredRows


@dataclass(frozen=True)
class _Embedded:
    """What the image kinds share: the CLIP, the embed stage's options and the heads scored on the
    model's device (:func:`pipeline.stage.embed_source`)."""

    clip_spec: Any
    embed: Any  # pipeline.stage.EmbedOptions
    predictor: Any
    extras: dict[str, Any] | None = None
    storage_options: dict[str, Any] | None = None
    thumbnails: bool = True  # the report's samples
    keep_embeddings: bool = False

    def _embed(self, source: Any) -> Any:
        return embed_source(source, self.clip_spec, self.embed, self.predictor.embed_dim, self.thumbnails,
                            heads=[self.predictor, *(self.extras or {}).values()], keep_embeddings=self.keep_embeddings)

    def _scored(self, table: pa.Table, embedded: Any) -> pa.Table:
        return attach_embedded(table, embedded, self.extras or {})


def _embedded_facts(embedded: Any) -> dict[str, Any]:
    return {"clip_compute": embedded.compute, "image_decoder": embedded.decoder, "worker": embedded.worker,
            "stats": embedded.stats}


@dataclass(frozen=True)
class ShardRows(_Embedded):
    """A WebDataset shard: a host process of the worker's pool reads and decodes it, the model
    embeds and scores its images; the samples' other members become columns (``fields``: the
    sidecar JSON's typed columns)."""

    fields: dict[str, Any] = field(default_factory=dict)
    max_sidecar_bytes: int = 65536

    def read(self, part: Any) -> ScoredRows:
        embedded = self._embed(ShardImages(part.source, self.max_sidecar_bytes, self.storage_options))
        if not embedded.rows_known:  # e.g. deleted after planning: its size is unknown, never a silent 0
            raise DataError(embedded.failure)
        samples = embedded.metas
        base = samples_table(samples, part.source, self.fields, with_images=False).drop_columns(["image", "image_ext"])
        note = f"{part.source}: empty shard: no samples" if not samples and not embedded.failure else None
        return ScoredRows(self._scored(base, embedded), np.array([s.index for s in samples], dtype=np.int64),
                          embedded.thumbnails, embedded.failure, note, _embedded_facts(embedded), from_tar=True)


@dataclass(frozen=True)
class ImageParquetRows(_Embedded):
    """A row range of a Parquet file of images: its other columns (``schema``) read here, its
    image column (``column``) by a host process of the pool."""

    schema: pa.Schema | None = None
    column: str = "image"

    def read(self, part: Any) -> ScoredRows:
        table = read_embedding_table(part, self.schema, self.column, self.storage_options)
        embedded = self._embed(ParquetImages(part.source, part.start, part.stop, part.row_groups, self.column,
                                          self.storage_options, part.group_start))
        if embedded.failure:
            raise DataError(f"{part.source}: cannot read rows {part.start}-{part.stop}: {embedded.failure}")
        return ScoredRows(self._scored(table, embedded), np.arange(part.start, part.stop, dtype=np.int64),
                          embedded.thumbnails if self.thumbnails else None,
                          facts={"start": part.start, "stop": part.stop, **_embedded_facts(embedded)})
