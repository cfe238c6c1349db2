"""What the image kinds' readers share (``run``; :class:`sources.shards.ShardRows`,
:class:`sources.image_parquet.ImageParquetRows`): their images are read and decoded by the
worker's decode pool, embedded and scored where the model runs (:func:`pipeline.stage.embed_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .score import attach_embedded


@dataclass(frozen=True)
class EmbeddedRows:
    """What the image kinds share: the CLIP, the embed stage's options and the heads scored on the
    model's device (:func:`pipeline.stage.embed_source`)."""

    clip_spec: Any
    embed: Any  # pipeline.stage.EmbedOptions
    predictor: Any
    extras: dict[str, Any] | None = None
    storage_options: dict[str, Any] | None = None
    thumbnails: bool = True  # the report's samples
    keep_embeddings: bool = False

    def embedded(self, source: Any) -> Any:
        """``source`` (a decode pool source of one part) decoded, embedded and scored where the model runs."""
        from .pipeline import stage  # at call time: a decode process opening a kind's source never needs it

        return stage.embed_source(source, self.clip_spec, self.embed, self.predictor.embed_dim, self.thumbnails,
                                  heads=[self.predictor, *(self.extras or {}).values()], keep_embeddings=self.keep_embeddings)

    def with_scores(self, table: pa.Table, embedded: Any) -> pa.Table:
        """``table`` with the embedded images' scores, errors (and embeddings) attached."""
        return attach_embedded(table, embedded, self.extras or {})


def embedded_facts(embedded: Any) -> dict[str, Any]:
    return {"clip_compute": embedded.compute, "image_decoder": embedded.decoder, "worker": embedded.worker,
            "stats": embedded.stats}
