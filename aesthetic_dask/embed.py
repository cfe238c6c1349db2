"""The notebook API of the embed stage: ``embed_images`` over a lazy frame of images.

Each partition goes through the same stage as the ``run`` job (:func:`pipeline.stage.embed_source`):
the worker's decode pool decodes, its encoder embeds. Building the lazy graph imports neither torch
nor open_clip's model code beyond its registry.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from .columns import EMBEDDING_COLUMN, ERROR_COLUMN
from .config import Config, load_config
from .models.clip import ClipSpec
from .image_reader import image_values
from .pipeline.host import BytesImages
from .pipeline.stage import EmbedOptions, embed_source
from .score import attach_embedded


def embed_partition(df: pd.DataFrame, spec: ClipSpec, image_column: str, opts, keep_images: bool) -> pd.DataFrame:
    """Partition function of :func:`embed_images`: add ``embedding`` and reasons in ``error``."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    images = image_values(table.column(image_column))
    drop = [c for c in (image_column, "image_ext") if c in table.column_names and not keep_images]
    out = attach_embedded(table.drop_columns(drop), embed_source(BytesImages(images), spec, opts))
    frame = out.to_pandas(types_mapper=pd.ArrowDtype)
    frame.index = df.index
    return frame


def embed_images(ddf, config: Config | None = None):
    """Lazily add ``embedding`` (L2-normalised, ``fixed_size_list<float32>[dim]`` with the width the
    CLIP model gives) to a frame of images. Image bytes are dropped after embedding unless
    ``config.write_shards`` needs them."""
    config = config or load_config()
    spec = ClipSpec.from_config(config)
    spec.check()
    column = config.image_column if config.image_column in ddf.columns else "image"
    keep = bool(config.write_shards)
    drop = [c for c in (column, "image_ext") if c in ddf.columns and not keep]
    meta = ddf._meta.drop(columns=drop + [c for c in (EMBEDDING_COLUMN, ERROR_COLUMN) if c in ddf.columns])
    meta = meta.assign(
        embedding=pd.Series(pd.arrays.ArrowExtensionArray(pa.array([], pa.list_(pa.float32(), spec.embed_dim())))),
        error=pd.Series(pd.arrays.ArrowExtensionArray(pa.array([], pa.string()))),
    )
    return ddf.map_partitions(
        embed_partition, spec, column, EmbedOptions.from_config(config), keep, meta=meta, enforce_metadata=False,
    )
