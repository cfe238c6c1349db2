"""The exact score distribution: fixed bins on multiples of 0.05, counted per partition and summed.

``EDGES`` are 0.00, 0.05, ..., 10.00 (201 values); ``counts`` has ``len(EDGES) + 1`` bins:
``counts[0]`` holds scores below 0, ``counts[i]`` holds ``EDGES[i-1] <= score < EDGES[i]`` and
``counts[-1]`` holds scores ``>= 10``. Scores are compared in float32, exactly as the keep rule
(:func:`filters.keep_mask`) compares them with a threshold, so the rows at or above any edge are
exactly the rows a job with that threshold keeps. Summing partitions' counts is exact at any scale
and survives resume (each partition's counts live in its completion marker).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EDGES: list[float] = [round(i / 20, 2) for i in range(201)]
_EDGES_F32 = np.asarray(EDGES, dtype=np.float32)
QUANTILES = (1, 5, 25, 50, 75, 95, 99)


def bin_index(scores: np.ndarray) -> np.ndarray:
    """The bin of each (finite, float32) score: the number of edges at or below it."""
    return np.searchsorted(_EDGES_F32, np.asarray(scores, dtype=np.float32), side="right")


def histogram_counts(scores: np.ndarray) -> list[int]:
    """Counts per bin of the finite ``scores`` (NaN, i.e. error rows, are not counted)."""
    scores = np.asarray(scores, dtype=np.float32)
    scores = scores[np.isfinite(scores)]
    return np.bincount(bin_index(scores), minlength=len(EDGES) + 1).astype(int).tolist()


def merge(counts: list[list[int] | None]) -> list[int]:
    """The sum of partitions' counts."""
    total = np.zeros(len(EDGES) + 1, dtype=np.int64)
    for c in counts:
        if c:
            total += np.asarray(c, dtype=np.int64)
    return total.tolist()


def kept_at(counts: list[int], threshold: float) -> int | None:
    """Rows a job with ``threshold`` keeps, when ``threshold`` is an edge (else None)."""
    rounded = round(threshold, 2)
    if rounded not in EDGES or abs(rounded - threshold) > 1e-12:
        return None
    return int(sum(counts[EDGES.index(rounded) + 1 :]))


def quantiles(counts: list[int]) -> dict[str, float | None]:
    """p1 ... p99 from the histogram (linear within a bin; 0.05 wide, so within 0.05 of exact)."""
    total = sum(counts)
    out: dict[str, float | None] = {}
    cumulative = np.cumsum(counts)
    for q in QUANTILES:
        if not total:
            out[f"p{q}"] = None
            continue
        rank = q / 100 * total
        i = int(np.searchsorted(cumulative, rank, side="left"))
        lo = EDGES[i - 1] if i >= 1 else EDGES[0]
        hi = EDGES[i] if i < len(EDGES) else EDGES[-1]
        before = cumulative[i - 1] if i else 0
        inside = counts[i] or 1
        out[f"p{q}"] = round(lo + (hi - lo) * (rank - before) / inside, 4)
    return out


def summary(counts: list[int]) -> dict[str, Any]:
    """The manifest's entry for one score column."""
    return {"edges": EDGES, "counts": counts, "quantiles": quantiles(counts)}


def score_histogram(ddf: Any, column: str = "aesthetic_score"):
    """The exact histogram of a scored frame (lazy Dask or pandas), as a small pandas frame with
    ``lower``, ``upper`` and ``count`` per bin; rows with an ``error`` are not counted, as in the jobs.
    """
    import dask
    import pandas as pd

    def counts_of(df: Any) -> list[int]:
        scores = df[column].to_numpy(dtype="float32", na_value=np.nan)
        if "error" in df.columns:
            scores = scores[~df["error"].notna().to_numpy(dtype=bool)]
        return histogram_counts(scores)

    if hasattr(ddf, "to_delayed"):
        parts = dask.compute(*[dask.delayed(counts_of)(p) for p in ddf.to_delayed()])
    else:
        parts = [counts_of(ddf)]
    total = merge(list(parts))
    lower = [-np.inf, *EDGES]
    upper = [*EDGES, np.inf]
    return pd.DataFrame({"lower": lower, "upper": upper, "count": total})
