"""What the report shows besides numbers: a small, bounded, deterministic sample per partition and
score band (with 128-px JPEG thumbnails in the ``run`` job), and error reasons with examples.

Sampled during the run, so ``aesthetic-dask report`` needs no second pass over the images. The
samples live in ``OUT/samples/`` (never in ``kept/``, whose files are exactly the kept rows).
"""

from __future__ import annotations

import io
import re
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .columns import SCORE_COLUMN
from .output import NamedFiles, write_parquet

# Score bands of the contact sheets: [0, 1), [1, 2), ..., [9, 10), and >= 10 (below 0 joins band 0).
BANDS = 11
PER_BAND = 4  # samples kept per partition and band
THUMBNAIL_PX = 128
# Thumbnails are made while decoding, for the first samples of a partition and ~1 in 32 after:
# bounded, deterministic, and a few percent of the decode work at most.
THUMBNAIL_FIRST = 16
THUMBNAIL_EVERY = 32
THUMBNAIL_MAX = 128
ERROR_KINDS_MAX = 50
ERROR_EXAMPLES = 3
_URL_COLUMN = re.compile("url", re.IGNORECASE)


def band_of(scores: np.ndarray) -> np.ndarray:
    """The integer band (0..10) of each finite score."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64)), 0, BANDS - 1).astype(int)


def wants_thumbnail(index: int, key: str | None, made: int) -> bool:
    """Whether sample ``index`` of a partition gets a thumbnail (``made`` so far)."""
    if made >= THUMBNAIL_MAX:
        return False
    return index < THUMBNAIL_FIRST or zlib.crc32((key or str(index)).encode()) % THUMBNAIL_EVERY == 0


def make_thumbnail(image: Any) -> bytes:
    """A <= 128-px RGB JPEG of a decoded PIL image."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return buf.getvalue()


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


def reason_kind(reason: str) -> str:
    """A reason with its numbers masked, so "image is 512x512 ..." and "image is 640x480 ..." group."""
    return re.sub(r"\d+", "N", reason)


def error_reasons(reasons: pa.Array | pa.ChunkedArray, keys: list[str]) -> dict[str, dict[str, Any]]:
    """{reason kind: {count, examples}} of one partition's error rows (bounded)."""
    out: dict[str, dict[str, Any]] = {}
    for reason, key in zip(reasons.to_pylist(), keys):
        kind = reason_kind(reason)
        entry = out.get(kind)
        if entry is None:
            if len(out) >= ERROR_KINDS_MAX:
                kind = "other reasons"
                entry = out.setdefault(kind, {"count": 0, "examples": []})
            else:
                entry = out[kind] = {"count": 0, "examples": []}
        entry["count"] += 1
        if len(entry["examples"]) < ERROR_EXAMPLES:
            entry["examples"].append(key)
    return out


def merge_error_reasons(parts: list[dict[str, dict[str, Any]] | None]) -> dict[str, dict[str, Any]]:
    """Error reasons of all partitions, most frequent first."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for kind, entry in (part or {}).items():
            merged = out.setdefault(kind, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:ERROR_EXAMPLES]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))


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
