"""The samples sink: what the report shows besides numbers, a small, bounded, deterministic sample
per partition and score band (with the 128-px JPEG thumbnails the ``run`` job's decoders made,
:mod:`.pipeline.thumbnails`). The error reasons with examples are :mod:`.error_reasons`.

Sampled during the run, so ``aesthetic-dask report`` needs no second pass over the images. The
samples live in ``OUT/samples/`` (never in ``kept/``, whose files are exactly the kept rows).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .columns import SCORE_COLUMN
from .output import NamedFiles, write_parquet

# Score bands of the contact sheets: [0, 1), [1, 2), ..., [9, 10), and >= 10 (below 0 joins band 0).
BANDS = 11
PER_BAND = 4  # samples kept per partition and band
_URL_COLUMN = re.compile("url", re.IGNORECASE)


def band_of(scores: np.ndarray) -> np.ndarray:
    """The integer band (0..10) of each finite score."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64)), 0, BANDS - 1).astype(int)


def pick(scores: np.ndarray, eligible: np.ndarray, per_band: int = PER_BAND) -> np.ndarray:
    """Row indices: per band, up to ``per_band`` eligible rows spread evenly over the partition."""
    chosen = []
    bands = band_of(np.where(eligible, scores, 0))
    for band in range(BANDS):
        members = np.flatnonzero(eligible & (bands == band))
        if len(members):
            take = np.unique(np.linspace(0, len(members) - 1, min(per_band, len(members))).round().astype(int))
            chosen.extend(members[take].tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)


def sample_table(table: pa.Table, scores: np.ndarray, rows: np.ndarray, source: str, chosen: np.ndarray,
                 thumbnails: dict[int, bytes] | None) -> pa.Table:
    """The sampled rows: key, source, row, score, band, caption, a URL-like column, thumbnail."""
    def text(column: str | None) -> pa.Array:
        if column is None:
            return pa.nulls(len(chosen), pa.string())
        return table.column(column).take(pa.array(chosen)).cast(pa.string())

    names = table.column_names
    url = next((c for c in names if _URL_COLUMN.search(c) and pa.types.is_string(table.schema.field(c).type)), None)
    return pa.table({
        "key": text("key" if "key" in names else None),
        "source": pa.array([source] * len(chosen), pa.string()),
        "row": pa.array(rows[chosen], pa.int64()),
        "aesthetic_score": pa.array(scores[chosen], pa.float32()),
        "band": pa.array(band_of(scores[chosen]), pa.int8()),
        "caption": text("caption" if "caption" in names and pa.types.is_string(table.schema.field("caption").type) else None),
        "url": text(url),
        "thumbnail": pa.array([(thumbnails or {}).get(int(i)) for i in chosen], pa.binary()),
    })


class SamplesSink(NamedFiles):
    """``samples/``: a few scored rows per partition and score band, with their thumbnails where
    the job made them (:func:`pick`, :func:`sample_table`), for the report; written after the
    Parquet sink, whatever the threshold (a refilter leaves them as they are)."""

    directories = ("samples",)

    def write(self, part: Any, scored: Any, record: Any, layout: Any, opts: Any) -> None:
        table, is_error = scored.table, scored.is_error
        if not opts.samples or is_error.all():
            return
        scores = table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False)
        eligible = ~is_error
        if scored.thumbnails is not None:
            eligible &= np.isin(np.arange(table.num_rows), list(scored.thumbnails))
        chosen = pick(scores, eligible)
        if len(chosen):
            write_parquet(sample_table(table, scores, scored.rows, part.source, chosen, scored.thumbnails),
                          layout, storage.join(layout.samples, f"{part.name}.parquet"), dict(opts.metadata))
            record.files.append(f"samples/{part.name}.parquet")

    def resplit(self, record: Any, how: Any) -> None:
        """Nothing: samples are chosen by score band, not by the threshold."""
