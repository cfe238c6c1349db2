"""Mapper: add ``aesthetic_score`` (and an ``error`` reason for invalid rows) to partitions.

Pure frame-in, frame-out functions for ``map_partitions``: pandas partitions use numpy, cudf
partitions (on GPU workers) use cupy; both go through :func:`classify_and_score`.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, MissingColumnError
from .models.heads import AestheticPredictor

from .columns import EMBEDDING_COLUMN, ERROR_COLUMN, RESERVED_SCORE_NAMES, SCORE_COLUMN
from .pipeline.device import array_module
from .config import load_config
from .models.load import load_extra_heads, load_predictor
ERROR_DTYPE = pd.ArrowDtype(pa.string())


def check_extra_score_names(extras: dict[str, Any], input_columns: list[str]) -> None:
    """Refuse an ``--extra-scores`` column name that is empty, reserved or already an input column."""
    for name in extras:
        if not name.isidentifier():
            raise InputError(f"--extra-scores {name}: a column name must be letters, digits and _")
        if name in RESERVED_SCORE_NAMES:
            raise InputError(f"--extra-scores {name}: {name!r} is a column the job writes; choose another name")
        if name in input_columns:
            raise InputError(f"--extra-scores {name}: the input already has a column {name!r}; choose another name")


def arrow_chunks(series: pd.Series) -> list[pa.Array]:
    """The Arrow chunks behind a pandas column (zero-copy for pyarrow-backed dtypes)."""
    arr = series.array.__arrow_array__() if hasattr(series.array, "__arrow_array__") else pa.array(series)
    return arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]


def merge_errors(earlier: pa.Array | pa.ChunkedArray | None, new: pa.Array) -> pa.Array:
    """Per-row reasons where an earlier stage's reason (e.g. an undecodable image) wins."""
    if earlier is None:
        return new
    if isinstance(earlier, pa.ChunkedArray):
        earlier = earlier.combine_chunks() if earlier.num_chunks else pa.array([], pa.string())
    return pc.coalesce(earlier.cast(pa.string()), new)


def score_arrow(
    chunks: list[pa.Array], predictor: AestheticPredictor, extras: dict[str, AestheticPredictor] | None = None,
    xp: Any = None, batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(float32 scores, error reasons, extra heads' scores) of an Arrow embedding column, chunk by chunk.

    Chunks are scored where they lie: combining them would copy the whole matrix. Every head
    reads the same matrix in the same pass. The table stays in Arrow on the host; only the
    embedding matrix goes to the array module ``xp`` (by default the one this process has:
    cupy on a worker with a CUDA device, else numpy), and only the scores come back. Each head
    call reads at most ``batch_size`` embeddings (``model_inference_batch_size``; None: a chunk).
    """
    if xp is None:
        xp = array_module()
    heads = [predictor, *(extras or {}).values()]
    per_head: list[list[np.ndarray]] = [[] for _ in heads]
    reasons = []
    for chunk in chunks:
        matrix, candidates, why = arrow_embedding_matrix(chunk, predictor.embed_dim)
        if xp is not np:
            matrix = xp.asarray(matrix)  # host -> device: the matrix alone
        for out, scores in zip(per_head, classify_and_score(xp, heads, matrix, candidates, why, batch_size)):
            out.append(scores)
        reasons.append(why)
    if not reasons:
        empty = np.empty(0, np.float32)
        return empty, np.empty(0, object), {name: empty for name in (extras or {})}
    joined = [np.concatenate(parts) for parts in per_head]
    return joined[0], np.concatenate(reasons), dict(zip(extras or {}, joined[1:]))


def classify_and_score(
    xp: Any,
    heads: AestheticPredictor | list[AestheticPredictor],
    matrix: Any,
    candidates: Any,
    reasons: np.ndarray,
    batch_size: int | None = None,
) -> Any:
    """Scores for all rows from each head; invalid rows get NaN and a reason in ``reasons`` (filled in place).

    ``matrix`` holds the rows where ``candidates`` is true (right length, no nulls). Rows with a
    non-finite or zero squared norm are invalid: a zero vector is an error, not a division by zero.
    Each head call reads at most ``batch_size`` rows (None: all). Given one head, returns its
    scores; given a list, a list of score arrays.
    """
    single = not isinstance(heads, (list, tuple))
    heads = [heads] if single else list(heads)
    n = candidates.shape[0]
    results = [np.full(n, np.nan, dtype=np.float32) for _ in heads]
    if matrix.shape[0] == 0:
        return results[0] if single else results
    sq_norm = xp.einsum("ij,ij->i", matrix, matrix)
    matrix, sq_norm = _rescaled_where_the_norm_over_or_underflows(xp, matrix, sq_norm)
    finite = xp.isfinite(sq_norm)
    nonzero = sq_norm > 0
    ok = finite & nonzero
    cand_idx = np.flatnonzero(_to_numpy(candidates))
    finite_h, nonzero_h, ok_h = _to_numpy(finite), _to_numpy(nonzero), _to_numpy(ok)
    reasons[cand_idx[~finite_h]] = "embedding contains NaN or inf"
    reasons[cand_idx[finite_h & ~nonzero_h]] = "embedding has zero norm"
    if ok_h.any():
        rows, norms = (matrix, sq_norm) if ok_h.all() else (matrix[ok], sq_norm[ok])
        step = batch_size or rows.shape[0]
        for head, scores in zip(heads, results):
            scores[cand_idx[ok_h]] = np.concatenate(
                [_to_numpy(head.score_raw(rows[i:i + step], norms[i:i + step], xp)) for i in range(0, rows.shape[0], step)])
    return results[0] if single else results


def _rescaled_where_the_norm_over_or_underflows(xp: Any, matrix: Any, sq_norm: Any) -> tuple[Any, Any]:
    """Rows of finite, non-zero values whose float32 squared norm overflows (values near 1e20) or
    underflows (near 1e-23) to inf or 0, divided by their largest magnitude: the direction, and so
    the score, is the same, and the row is no longer taken for NaN/inf or zero. Checked only where
    a norm is not a finite positive number (the common case costs one test)."""
    suspect = ~xp.isfinite(sq_norm) | (sq_norm == 0)
    if not bool(suspect.any()):
        return matrix, sq_norm
    rows = xp.flatnonzero(suspect)
    peak = xp.abs(matrix[rows]).max(axis=1)
    fixable = xp.isfinite(peak) & (peak > 0)  # NaN, inf and all-zero rows keep their reason
    if not bool(fixable.any()):
        return matrix, sq_norm
    fix = rows[fixable]
    matrix, sq_norm = matrix.copy(), sq_norm.copy()  # the matrix may be Arrow's read-only memory
    matrix[fix] = matrix[fix] / peak[fixable][:, None]
    sq_norm[fix] = xp.einsum("ij,ij->i", matrix[fix], matrix[fix])
    return matrix, sq_norm


def _to_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def arrow_embedding_matrix(arr: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 matrix of candidate rows, candidate mask, reasons) from an Arrow list array."""
    n = len(arr)
    reasons = np.full(n, None, dtype=object)
    if pa.types.is_null(arr.type):
        reasons[:] = "null embedding"
        return np.empty((0, dim), np.float32), np.zeros(n, bool), reasons
    lengths = pc.list_value_length(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    length_np = lengths.fill_null(-1).to_numpy(zero_copy_only=False)
    candidates = valid & (length_np == dim)
    if not candidates.all():
        reasons[~valid] = "null embedding"
        bad = valid & (length_np != dim)
        for i in np.flatnonzero(bad):
            reasons[i] = f"embedding has {length_np[i]} values, expected {dim}"
        arr = arr.filter(pa.array(candidates))
    flat = arr.flatten()
    if flat.null_count:
        has_null = flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, dim).any(axis=1)
        cand_idx = np.flatnonzero(candidates)
        reasons[cand_idx[has_null]] = "embedding contains null values"
        candidates[cand_idx[has_null]] = False
        arr = arr.filter(pa.array(~has_null))
        flat = arr.flatten()
    matrix = flat.to_numpy(zero_copy_only=False).reshape(-1, dim)
    if matrix.dtype != np.float32:
        matrix = matrix.astype(np.float32)
    return matrix, candidates, reasons


def _cudf_embedding_matrix(series: Any, dim: int) -> tuple[Any, Any, np.ndarray]:
    """The cudf twin of :func:`arrow_embedding_matrix`; the matrix stays on the GPU."""
    import cupy as cp

    n = len(series)
    reasons = np.full(n, None, dtype=object)
    valid = series.notna().values
    lengths = series.list.len().fillna(-1).values
    candidates = valid & (lengths == dim)
    host_valid, host_len = cp.asnumpy(valid), cp.asnumpy(lengths)
    reasons[~host_valid] = "null embedding"
    for i in np.flatnonzero(host_valid & (host_len != dim)):
        reasons[i] = f"embedding has {host_len[i]} values, expected {dim}"
    leaves = series[candidates].list.leaves
    if not leaves.null_count:  # nulls only: NaN is a value here, classified as on CPU ("NaN or inf")
        return leaves.values.astype(cp.float32).reshape(-1, dim), candidates, reasons
    # Rare: nulls inside embeddings. cudf's isna()/fillna() would take NaN for null, so through Arrow.
    values = leaves.to_arrow()
    host_null = values.is_null().to_numpy(zero_copy_only=False).reshape(-1, dim).any(axis=1)
    cand_idx = np.flatnonzero(cp.asnumpy(candidates))
    reasons[cand_idx[host_null]] = "embedding contains null values"
    candidates[cp.asarray(cand_idx[host_null])] = False
    matrix = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)[~host_null]
    return cp.asarray(matrix), candidates, reasons


def score_columns(
    embedding: list[pa.Array],
    earlier_error: pa.ChunkedArray | pa.Array | None,
    predictor: AestheticPredictor,
    extras: dict[str, AestheticPredictor] | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, pa.Array, dict[str, np.ndarray]]:
    """The score stage on Arrow columns: (float32 scores, NaN where invalid; error reasons; extra
    heads' scores by column name).

    ``embedding`` is the column's chunks; an earlier stage's reason (e.g. an undecodable image)
    wins over this stage's.
    """
    scores, reasons, extra = score_arrow(embedding, predictor, extras, batch_size=batch_size)
    return scores, merge_errors(earlier_error, pa.array(reasons, type=pa.string())), extra


def score_table(
    table: pa.Table,
    predictor: AestheticPredictor,
    embedding_column: str = "embedding",
    extras: dict[str, AestheticPredictor] | None = None,
    batch_size: int | None = None,
) -> pa.Table:
    """``table`` with ``aesthetic_score`` (float32), the extra heads' columns and ``error`` set:
    the jobs' score stage."""
    if embedding_column not in table.column_names:
        raise MissingColumnError("input", embedding_column, table.column_names)
    earlier = table.column(ERROR_COLUMN) if ERROR_COLUMN in table.column_names else None
    scores, error, extra = score_columns(table.column(embedding_column).chunks, earlier, predictor, extras, batch_size)
    return attach_scores(table, scores, error, extra)


def attach_scores(table: pa.Table, scores: np.ndarray, error: pa.Array, extra: dict[str, np.ndarray]) -> pa.Table:
    """``table`` with ``aesthetic_score``, the extra heads' columns (float32) and ``error`` set."""
    added = {SCORE_COLUMN: scores, **extra}
    out = table.drop_columns([c for c in (*added, ERROR_COLUMN) if c in table.column_names])
    for name, values in added.items():
        out = out.append_column(name, pa.array(values, pa.float32()))
    return out.append_column(ERROR_COLUMN, error)


def score_partition(
    df: Any, predictor: AestheticPredictor, embedding_column: str = "embedding",
    extras: dict[str, AestheticPredictor] | None = None,
) -> Any:
    """Partition function: ``df`` plus ``aesthetic_score`` (float32, NaN if invalid), the extra
    heads' columns, and ``error``.

    The notebook API's score stage; it computes exactly what :func:`score_table` does for the jobs.
    """
    if embedding_column not in df.columns:
        raise MissingColumnError("input", embedding_column, list(df.columns))
    if type(df).__module__.startswith("cudf"):
        return _score_cudf_partition(df, predictor, embedding_column, extras)
    earlier = pa.chunked_array(arrow_chunks(df[ERROR_COLUMN]), pa.string()) if ERROR_COLUMN in df.columns else None
    scores, error, extra = score_columns(arrow_chunks(df[embedding_column]), earlier, predictor, extras)
    out = df.drop(columns=[c for c in (SCORE_COLUMN, *extra, ERROR_COLUMN) if c in df.columns])
    out = out.assign(**{SCORE_COLUMN: scores, **extra})
    out[ERROR_COLUMN] = pd.Series(pd.arrays.ArrowExtensionArray(error), index=df.index)
    return out


def _score_cudf_partition(df: Any, predictor: AestheticPredictor, embedding_column: str,
                          extras: dict[str, AestheticPredictor] | None = None) -> Any:
    """cudf partitions: the matrix is scored on the GPU with cupy; reasons merge as on CPU."""
    import cudf
    import cupy as xp

    matrix, candidates, reasons = _cudf_embedding_matrix(df[embedding_column], predictor.embed_dim)
    scores, *extra = classify_and_score(xp, [predictor, *(extras or {}).values()], matrix, candidates, reasons)
    earlier = df[ERROR_COLUMN].to_arrow() if ERROR_COLUMN in df.columns else None
    merged = merge_errors(earlier, pa.array(reasons, type=pa.string()))
    out = df.assign(**{SCORE_COLUMN: scores, **dict(zip(extras or {}, extra))})
    error = cudf.Series.from_arrow(merged)
    error.index = df.index  # positional: the reasons are in row order, whatever the index labels
    out[ERROR_COLUMN] = error
    return out


def _scored_meta(meta: pd.DataFrame, extra_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    added = (SCORE_COLUMN, *extra_columns)
    meta = meta.drop(columns=[c for c in (*added, ERROR_COLUMN) if c in meta.columns])
    return meta.assign(
        **{c: pd.Series([], dtype="float32") for c in added}, **{ERROR_COLUMN: pd.Series([], dtype=ERROR_DTYPE)}
    )


def score_embeddings(ddf, config=None, predictor: AestheticPredictor | None = None):
    """Lazily add ``aesthetic_score``, the ``extra_scores`` heads' columns and ``error`` (the
    reason of an invalid row) to an embeddings frame.

    The heads are loaded once in the caller from ``config`` (unless ``predictor`` is given) and
    travel to the workers; a folded head is one 768-vector and a bias.
    """
    config = config or load_config()
    if predictor is None:
        predictor = load_predictor(config.aesthetic_weights, config.resolved_model_dir)
    extras, _ = load_extra_heads(config.extra_scores, config.resolved_model_dir, predictor.embed_dim)
    column = config.embedding_column
    if column not in ddf.columns:
        raise MissingColumnError("input", column, list(ddf.columns))
    return ddf.map_partitions(
        score_partition, predictor, column, extras, meta=_scored_meta(ddf._meta, tuple(extras)), enforce_metadata=False
    )


def attach_embedded(table: pa.Table, result, extra_names: Iterable[str] = ()) -> pa.Table:
    """``table`` (one row per image, in order) plus the embed stage's columns: ``embedding`` (when
    made), the scores (when scored: ``aesthetic_score`` then ``extra_names``), and ``error`` (an
    earlier reason, e.g. "no image", wins)."""
    earlier = table.column(ERROR_COLUMN) if ERROR_COLUMN in table.column_names else None
    out = table.drop_columns([c for c in (ERROR_COLUMN, EMBEDDING_COLUMN) if c in table.column_names])
    if result.embeddings is not None:
        out = out.append_column(EMBEDDING_COLUMN, result.embeddings)
    error = merge_errors(earlier, result.reasons)
    if result.scores is None:
        return out.append_column(ERROR_COLUMN, error)
    return attach_scores(out, result.scores[0], error, dict(zip(extra_names, result.scores[1:])))
