"""The keep rule as data: ``aesthetic_score >= score_threshold`` (NeMo Curator's rule) and, ANDed
with it, each criterion of ``filters`` (``--filter NAME>=T``, also ``>``, ``<`` and ``<=``) on a
score column: ``aesthetic_score`` itself or an ``--extra-scores`` head's column.

A row is kept when it has no error and passes every criterion; a NaN score passes none (NaN
compares false). Criteria are written as text (config, CLI, manifest, fingerprint) and parsed
here once: :func:`parse_all` refuses a malformed one in one line naming it.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .columns import ERROR_COLUMN, SCORE_COLUMN
from .errors import ConfigError

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_CRITERION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([^\s<>=]+)\s*$")


@dataclass(frozen=True)
class Criterion:
    """``column op value``: the rows of a scored table that pass it."""

    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"

    def passes(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask of ``scores`` passing (a NaN passes nothing)."""
        scores = np.asarray(scores)
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        with np.errstate(invalid="ignore"):
            return _OPS[self.op](scores, scores.dtype.type(self.value))


def parse(text: str) -> Criterion:
    """``"NAME>=T"`` (or ``>``, ``<``, ``<=``) as a :class:`Criterion`; one line if it is not one."""
    match = _CRITERION.match(text) if isinstance(text, str) else None
    value = _number(match.group(3)) if match else None
    if value is None or not math.isfinite(value):
        raise ConfigError(f"filters (--filter): {text!r} is not NAME>=T, NAME>T, NAME<=T or NAME<T with NAME a score "
                          "column and T a finite number (e.g. --filter aesthetic_score<9.5)")
    return Criterion(match.group(1), match.group(2), value)


def parse_all(texts: Iterable[str], score_columns: Iterable[str] = ()) -> tuple[Criterion, ...]:
    """Every criterion of ``texts``; each must name ``aesthetic_score`` or one of ``score_columns``
    (the ``--extra-scores`` names): a criterion on a column the job does not score is refused."""
    known = (SCORE_COLUMN, *score_columns)
    criteria = tuple(parse(t) for t in texts)
    for c in criteria:
        if c.column not in known:
            raise ConfigError(f"filters (--filter): {str(c)!r} names no score column of this job; a filter applies "
                              f"to {', '.join(known)} (add a head with --extra-scores {c.column}=WEIGHTS)")
    return criteria


def as_criteria(filters: Iterable[Any]) -> tuple[Criterion, ...]:
    """``filters`` given as criteria or as their text (the notebook API takes either)."""
    return tuple(f if isinstance(f, Criterion) else parse(f) for f in filters)


def keep_mask(scores: np.ndarray, is_error: np.ndarray, threshold: float) -> np.ndarray:
    """The one keep rule on ``aesthetic_score`` alone: no error and ``score >= threshold`` (NaN
    scores never pass). :func:`table_keep_mask` adds the ``filters``."""
    scores = np.asarray(scores)
    with np.errstate(invalid="ignore"):
        # Compared in the scores' own dtype (float32), as the histogram bins are: exact agreement.
        return ~is_error & (scores >= scores.dtype.type(threshold))


def table_keep_mask(table: Any, threshold: float, criteria: Iterable[Criterion] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(kept, error) row masks of a scored Arrow table under the whole rule; one without an
    ``error`` column (a kept or rejected file, which hold valid rows only) has no error rows."""
    is_error = table.column(ERROR_COLUMN).is_valid().to_numpy(zero_copy_only=False) \
        if ERROR_COLUMN in table.column_names else np.zeros(table.num_rows, bool)
    return _rule(lambda name: _column(table, name), is_error, threshold, criteria), is_error


def failing(table: Any, is_error: np.ndarray, criteria: Iterable[Criterion]) -> dict[str, int]:
    """Valid rows failing each criterion (a row may fail several), by the criterion's text."""
    return {str(c): int((~is_error & ~c.passes(_column(table, c.column))).sum()) for c in criteria}


def filter_partition(df: Any, threshold: float, criteria: tuple[Criterion, ...] = ()) -> Any:
    """Partition function of :func:`filter_by_score`: the rows the jobs would keep."""
    is_error = df[ERROR_COLUMN].notna().to_numpy(dtype=bool) if ERROR_COLUMN in df.columns else np.zeros(len(df), bool)
    return df[_rule(lambda name: _frame_column(df, name), is_error, threshold, criteria)]


def filter_by_score(ddf, threshold: float = 0.5, filters: Iterable[Any] = ()):
    """Rows with ``aesthetic_score >= threshold``, passing every one of ``filters`` (criteria or
    their text, e.g. ``["other<7"]``: a config's ``filters``), and no error: exactly what the
    jobs keep.

    Lazy on a Dask frame; a pandas (or cudf) frame is filtered at once.
    """
    criteria = as_criteria(filters)
    if not hasattr(ddf, "map_partitions"):
        return filter_partition(ddf, threshold, criteria)
    return ddf.map_partitions(filter_partition, threshold, criteria, meta=ddf._meta, enforce_metadata=False)


def _rule(column: Any, is_error: np.ndarray, threshold: float, criteria: Iterable[Criterion]) -> np.ndarray:
    """The whole keep rule over ``column(name)`` (an Arrow table's or a frame's, as float32)."""
    keep = keep_mask(column(SCORE_COLUMN), is_error, threshold)
    for c in criteria:
        keep &= c.passes(column(c.column))
    return keep


def _column(table: Any, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _frame_column(df: Any, name: str) -> np.ndarray:
    return np.asarray(df[name].to_numpy(dtype="float32", na_value=np.nan))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
