"""Planning Parquet inputs' partitions, in the client, for the kinds that read Parquet
(:mod:`.sources.parquet_embeddings`, :mod:`.sources.image_parquet`, and the metadata of
:mod:`.sources.clip_retrieval`): one per file or run of row groups (about ``partition_rows``
rows), their footers read once (and cached by a job's OUT), one unified schema, with input columns
named like a column the job writes renamed ``NAME_input``. Reading the planned partitions is
:mod:`.embeddings_reader`.
"""

from __future__ import annotations

from functools import cached_property

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from .errors import InputError, MissingColumnError
from . import storage, versions
from .naming import source_name
from .embeddings_reader import INPUT_NAME_KEY


EMBEDDING_TYPE = pa.list_(pa.float32())
PARQUET_SUFFIXES = (".parquet", ".pq")  # what a listed input must end with to be read as Parquet


@dataclass(frozen=True)
class ParquetPart:
    """Rows ``[start, stop)`` of one input file: one partition, one set of output files."""

    source: str
    start: int
    stop: int
    row_groups: tuple[int, ...] | None = None  # Parquet input: the row groups holding the rows
    metadata: str | None = None  # clip-retrieval input: the row-aligned metadata Parquet
    identity: str | None = field(default=None, compare=False)  # what was planned: storage.identities
    group_start: int | None = None  # a slice of one big row group: the group's first row (streamed)

    @cached_property  # a digest of the path: computed once per part, however often it is asked
    def name(self) -> str:
        """Deterministic output name: file stem, a digest of its (absolute) path, the row range.

        A pure function of ``source``, so the client and every worker agree on it.
        """
        return f"{source_name(self.source)}-{self.start:010d}-{self.stop:010d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _other_job_hint(schema: pa.Schema, check: Callable) -> str:
    """Where a file lacks the job's column but holds the other job's input: which command reads it."""
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
             or pa.types.is_fixed_size_list(f.type)]
    images = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
              or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if check is not check_embedding_type and lists and not images:
        return f"; it holds embeddings ({lists[0]!r}): score them with `aesthetic-dask score`"
    if check is check_embedding_type and images and not lists:
        return f"; it holds image bytes ({images[0]!r}): embed them with `aesthetic-dask run`"
    return ""


def check_embedding_type(dtype: pa.DataType, column: str, where: str) -> None:
    is_list = pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
    if not (is_list and pa.types.is_floating(dtype.value_type)):
        raise InputError(
            f"{where}: column {column!r} has type {dtype}, expected list<float> or "
            "fixed_size_list<float>[768] (float16/32/64)"
        )


def _group_row_groups(rows: list[int], target_rows: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Consecutive row groups, about ``target_rows`` rows per group: (start, stop, row groups). A
    row group of over twice ``target_rows`` (files written by other tools often have one, of
    millions of rows) is split into row ranges of ``target_rows``, which the reader streams
    (:func:`embeddings_reader.read_parquet_rows`): memory follows the partition, not the row group."""
    groups: list[tuple[int, int, tuple[int, ...]]] = []
    start = stop = 0
    current: list[int] = []
    for i, n in enumerate(rows):
        if current and (stop - start + n > target_rows or n > 2 * target_rows):
            groups.append((start, stop, tuple(current)))
            start, current = stop, []
        if n > 2 * target_rows:  # (a range inside one row group: see plan_parquet_files)
            groups += [(stop + a, stop + b, (i,)) for a, b in row_ranges(n, target_rows)]
            stop += n
            start = stop
            continue
        current.append(i)
        stop += n
    if current:
        groups.append((start, stop, tuple(current)))
    return groups


def open_footer(url: str, storage_options: dict[str, Any] | None = None) -> pq.FileMetaData | str:
    """The footer of a Parquet file (local or remote), or why it cannot be read."""
    try:
        if not storage.is_url(url):
            return pq.read_metadata(storage.local_path(url))
        fs, path = storage.split(url, storage_options)
        return pq.ParquetFile(path, filesystem=storage.pyarrow_filesystem(fs)).metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"not a readable Parquet file: {exc}"


def row_ranges(n: int, target_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + target_rows, n)) for s in range(0, n, target_rows)] or [(0, 0)]


def plan_parquet_files(
    files: list[str], column: str, check: Callable[[pa.DataType, str, str], None], partition_rows: int,
    storage_options: dict[str, Any] | None = None, footer_cache: dict[str, list[Any]] | None = None,
) -> tuple[list[ParquetPart], list[tuple[str, pa.Schema]], dict[str, str], dict[str, list[Any]]]:
    """Parts, schemas and unreadable files of Parquet ``files``, and what their footers said.

    With ``footer_cache`` (a job's OUT keeps one: :data:`FOOTER_CACHE`), each file is first
    identified (one listing per directory) and a file whose identity is unchanged is planned from
    the cache: a nightly re-run reads the footers of new and changed files only.
    """
    parts: list[ParquetPart] = []
    schemas: list[tuple[str, pa.Schema]] = []
    failed: dict[str, str] = {}
    ids = versions.identities(files, storage_options) if footer_cache is not None else {}
    known = {f: footer_cache[f] for f in files if ids.get(f) and (footer_cache or {}).get(f, [None])[0] == ids[f]}
    unread = [f for f in files if f not in known]
    if any(storage.is_url(f) for f in unread):
        with ThreadPoolExecutor(16) as pool:  # footers are small reads: many at once, for object storage
            read = list(pool.map(lambda f: open_footer(f, storage_options), unread))
    else:  # a local footer is a fraction of a millisecond: a pool's hand-offs cost more (0.37 s vs 1.4 s for 5,000)
        read = [open_footer(f) for f in unread]
    footers = dict(known)
    for path, meta in zip(unread, read):
        if isinstance(meta, str):
            failed[str(path)] = meta
        else:
            footers[path] = [ids.get(path), [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                             _schema_text(meta.schema.to_arrow_schema())]
    for path in files:
        if path not in footers:
            continue
        _, rows, schema = footers[path]
        schema = _schema_of(schema)
        if column not in schema.names:
            raise MissingColumnError(str(path), column, schema.names, _other_job_hint(schema, check))
        check(schema.field(column).type, column, str(path))
        schemas.append((str(path), schema))
        offsets = np.cumsum([0] + rows)
        for start, stop, groups in _group_row_groups(rows, partition_rows):
            first = int(offsets[groups[0]]) if groups else start
            whole = len(groups) != 1 or (start, stop) == (first, int(offsets[groups[0] + 1]))
            parts.append(ParquetPart(str(path), start, stop, row_groups=groups, group_start=None if whole else first,
                                       identity=ids.get(path)))
    return parts, schemas, failed, {f: e for f, e in footers.items() if e[0]}


def _schema_text(schema: pa.Schema) -> str:
    import base64

    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_of(text: str) -> pa.Schema:
    import base64

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def unify(schemas: list[tuple[str, pa.Schema]], column: str, canonical: pa.DataType | None) -> pa.Schema:
    """One schema for all partitions; ``column`` becomes ``canonical`` when one is given."""
    if not schemas:
        return pa.schema([pa.field(column, canonical or pa.binary())])
    unified = None
    for where, schema in schemas:
        if canonical is not None:
            schema = schema.set(schema.get_field_index(column), pa.field(column, canonical))
        schema = schema.remove_metadata()
        try:
            unified = schema if unified is None else pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{where}: its columns conflict with earlier inputs: {exc}") from None
    return unified




def rename_reserved(schema: pa.Schema, reserved: tuple[str, ...], keep: str) -> pa.Schema:
    """The documented rule for input columns named like a column the job writes: ``NAME`` is
    read as ``NAME_input`` (``keep``, the column the job reads, is left alone)."""
    for name in reserved:
        if name == keep or name not in schema.names:
            continue
        new = f"{name}_input"
        if new in schema.names:
            raise InputError(f"the inputs have both {name!r} and {new!r} columns; {name!r} is a column the job writes")
        i = schema.get_field_index(name)
        schema = schema.set(i, schema.field(i).with_name(new).with_metadata({INPUT_NAME_KEY: name.encode()}))
    return schema
