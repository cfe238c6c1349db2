"""Planning the partitions of Parquet and clip-retrieval inputs, in the client: one per Parquet file
or run of row groups (about ``partition_rows`` rows), and per row range of a clip-retrieval
``img_emb/img_emb_N.npy`` with its row-aligned ``metadata/metadata_N.parquet``; their one unified
schema, with input columns named like a column the job writes renamed ``NAME_input``. Reading the
planned partitions is :mod:`.embeddings_reader`.
"""

from __future__ import annotations

from functools import cached_property

import hashlib
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from .columns import written_by
from .errors import DataError, InputError, MissingColumnError
from . import storage, versions
from .sources import check_not_inside, list_inputs


EMBEDDING_TYPE = pa.list_(pa.float32())
PARQUET_SUFFIXES = (".parquet", ".pq")  # what a listed input must end with to be read as Parquet


_NPY_NAME = re.compile(r"img_emb_(\d+)\.npy$")


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


def source_name(source: str) -> str:
    """The output name of an input: its file name, then a 64-bit digest of its directory.

    Unique by construction among the files of one directory (their names differ), however many
    there are (a 32-bit digest of the path collided for same-stem shards at scale); files of two
    directories differ by the directory's digest as well. A pure function of the path: the same
    in the client and every worker, and in every run. An escape keeps it a plain file name:
    ``%`` and ``/``, glob characters, and a leading ``.`` or ``_`` (which Parquet readers skip)
    are ``%XX``; an over-long name is cut and keeps a digest of the whole.
    """
    directory, base = posixpath.split(str(source))
    digest = hashlib.sha256(directory.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in base)
    if base and base[0] in "._":
        base = f"%{ord(base[0]):02X}{base[1:]}"
    if len(base.encode("utf-8", "surrogateescape")) > 120:
        base = f"{base[:80]}~{hashlib.sha256(base.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return f"{base}-{digest}"


_ESCAPED = set("%/\\*?[]{}:\0\n\r\t")


@dataclass
class EmbeddingPlan:
    """What to read: the partitions, the one schema they share, and inputs that could not be read
    (path -> reason: each is a :class:`DataError`, recorded, and the job goes on)."""

    parts: list[ParquetPart]
    schema: pa.Schema
    embedding_column: str
    failed: dict[str, str]
    duplicates: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. an earlier job's OUT skipped
    footers: dict[str, list[Any]] = field(default_factory=dict)  # what each file's footer said (FOOTER_CACHE)


def _other_job_hint(schema: pa.Schema, check: Callable) -> str:
    """Where a file lacks the job's column but holds the other job's input: which command reads it."""
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
             or pa.types.is_fixed_size_list(f.type)]
    images = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
              or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if check is not _check_embedding_type and lists and not images:
        return f"; it holds embeddings ({lists[0]!r}): score them with `aesthetic-dask score`"
    if check is _check_embedding_type and images and not lists:
        return f"; it holds image bytes ({images[0]!r}): embed them with `aesthetic-dask run`"
    return ""


def _check_embedding_type(dtype: pa.DataType, column: str, where: str) -> None:
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
        if n > 2 * target_rows:  # (a range inside one row group: see _plan_parquet_files)
            groups += [(stop + a, stop + b, (i,)) for a, b in _row_ranges(n, target_rows)]
            stop += n
            start = stop
            continue
        current.append(i)
        stop += n
    if current:
        groups.append((start, stop, tuple(current)))
    return groups


def _open_footer(url: str, storage_options: dict[str, Any] | None = None) -> pq.FileMetaData | str:
    """The footer of a Parquet file (local or remote), or why it cannot be read."""
    try:
        if not storage.is_url(url):
            return pq.read_metadata(storage.local_path(url))
        fs, path = storage.split(url, storage_options)
        return pq.ParquetFile(path, filesystem=storage.pyarrow_filesystem(fs)).metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"not a readable Parquet file: {exc}"


def _row_ranges(n: int, target_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + target_rows, n)) for s in range(0, n, target_rows)] or [(0, 0)]


def _is_clip_retrieval_folder(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    if set("*?[") & set(str(url)):
        return False
    storage.check_reachable(str(url), storage_options, "input")
    fs, path = storage.split(str(url), storage_options)
    try:
        return fs.isdir(storage.join(path, "img_emb"))
    except Exception:  # noqa: BLE001 - listing the inputs reports what is wrong with them
        return False


def _plan_parquet_files(
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
            read = list(pool.map(lambda f: _open_footer(f, storage_options), unread))
    else:  # a local footer is a fraction of a millisecond: a pool's hand-offs cost more (0.37 s vs 1.4 s for 5,000)
        read = [_open_footer(f) for f in unread]
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


def plan_parquet(
    inputs: list[str] | str,
    column: str,
    check: Callable[[pa.DataType, str, str], None],
    partition_rows: int,
    canonical: pa.DataType | None = None,
    exclude: tuple[str, ...] = (),
    reserved: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
    footer_cache: dict[str, list[Any]] | None = None,
) -> EmbeddingPlan:
    """Partitions and shared schema of Parquet files/dirs/globs that must hold ``column``.

    Input columns named in ``reserved`` (columns the job writes) are read as ``NAME_input``.
    """
    listed = list_inputs(inputs, PARQUET_SUFFIXES, exclude, storage_options)
    parts, schemas, failed, footers = _plan_parquet_files(listed.files, column, check, partition_rows, storage_options,
                                                          footer_cache)
    schema = rename_reserved(_unify(schemas, column, canonical), reserved, column)
    return EmbeddingPlan(parts, schema, column, failed, listed.duplicates, listed.notes(), footers)


def plan_embeddings(
    inputs: list[str] | str,
    embedding_column: str = "embedding",
    partition_rows: int = 131072,
    exclude: tuple[str, ...] = (),
    reserved: tuple[str, ...] = written_by("score"),
    storage_options: dict[str, Any] | None = None,
    footer_cache: dict[str, list[Any]] | None = None,
) -> EmbeddingPlan:
    """Partitions and the shared schema of Parquet files/dirs/globs and clip-retrieval folders.

    ``exclude``: directories never read as input (the job's OUT).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    is_folder = {i: _is_clip_retrieval_folder(i, storage_options) for i in inputs}
    folders = [i if storage.is_url(i) else storage.local_path(i) for i in inputs if is_folder[i]]
    others = [i for i in inputs if not is_folder[i]]
    listed = list_inputs(others, PARQUET_SUFFIXES, exclude, storage_options) if others else None
    try:
        parts, schemas, failed, footers = _plan_parquet_files(
            listed.files if listed else [], embedding_column, _check_embedding_type, partition_rows, storage_options,
            footer_cache)
    except MissingColumnError as exc:
        raise InputError(f"{exc}; choose one with --embedding-column") from None
    seen_folders: set[str] = set()
    duplicates = list(listed.duplicates) if listed else []
    for folder in folders:
        identity = folder.rstrip("/") if storage.is_url(folder) else os.path.realpath(folder)
        if identity in seen_folders:
            duplicates.append(folder)
            continue
        seen_folders.add(identity)
        check_not_inside(folder, exclude, storage_options)
        folder_parts, folder_schemas, folder_failed = _plan_clip_retrieval(folder, embedding_column, partition_rows,
                                                                           storage_options)
        parts.extend(folder_parts)
        schemas.extend(folder_schemas)
        failed.update(folder_failed)
    if not schemas and not failed:
        raise InputError(f"no embedding files found in {', '.join(map(str, inputs))}")
    schema = rename_reserved(_unify(schemas, embedding_column, EMBEDDING_TYPE), reserved, embedding_column)
    return EmbeddingPlan(parts, schema, embedding_column, failed, duplicates, listed.notes() if listed else [], footers)


def _plan_clip_retrieval(
    folder: str, column: str, partition_rows: int, storage_options: dict[str, Any] | None = None,
) -> tuple[list[ParquetPart], list[tuple[str, pa.Schema]], dict[str, str]]:
    """Parts of a clip-retrieval folder; an unreadable or misaligned file pair is a failed input."""
    fs, root = storage.split(folder, storage_options)
    try:  # listed, never globbed: the folder's own name may hold [ ] or *
        found = [p for p in fs.ls(storage.join(root, "img_emb"), detail=False) if _NPY_NAME.search(p)]
    except FileNotFoundError:
        found = []
    npys = sorted(found, key=lambda p: int(_NPY_NAME.search(p)[1]))
    if not npys:
        raise InputError(f"{folder}: img_emb/ holds no img_emb_N.npy files")
    parts, schemas, failed = [], [], {}
    for npy in npys:
        n_str = _NPY_NAME.search(npy)[1]
        npy_url = storage.to_url(fs, npy)
        meta_url = storage.to_url(fs, storage.join(root, "metadata", f"metadata_{n_str}.parquet"))
        try:
            shape, meta = _open_clip_retrieval_pair(fs, npy, meta_url, storage_options)
        except DataError as exc:
            failed[npy_url] = str(exc)
            continue
        schema = meta.schema.to_arrow_schema()
        if column in schema.names:
            raise InputError(f"{meta_url}: already has a column {column!r}; pick another --embedding-column")
        schemas.append((meta_url, schema.append(pa.field(column, EMBEDDING_TYPE))))
        for start, stop in _row_ranges(shape[0], partition_rows):
            parts.append(ParquetPart(npy_url, start, stop, metadata=meta_url))
    return parts, schemas, failed


def npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """(shape, dtype, data offset, Fortran order) of an .npy file object, from its header alone."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, dtype, f.tell(), bool(fortran)


def _open_clip_retrieval_pair(fs: Any, npy: str, meta_url: str, storage_options: dict[str, Any] | None
                              ) -> tuple[tuple[int, ...], pq.FileMetaData]:
    """The embeddings' shape and the metadata footer of one pair; DataError if unusable."""
    meta_fs, meta_path = storage.split(meta_url, storage_options)
    if not meta_fs.isfile(meta_path):
        raise DataError(f"no row-aligned metadata file {meta_url}")
    try:
        with fs.open(npy, "rb") as f:
            shape, dtype, _, _ = npy_header(f)
    except (ValueError, OSError) as exc:
        raise DataError(f"not a readable .npy array: {exc}") from None
    if len(shape) != 2 or dtype.kind != "f":
        raise DataError(f"expected a 2-D float array, got shape {shape} {dtype}")
    meta = _open_footer(meta_url, storage_options)
    if isinstance(meta, str):
        raise DataError(f"metadata {meta_url}: {meta}")
    if meta.num_rows != shape[0]:
        raise DataError(f"{shape[0]} rows but {meta_url} has {meta.num_rows}; they must be row-aligned")
    return shape, meta


def _unify(schemas: list[tuple[str, pa.Schema]], column: str, canonical: pa.DataType | None) -> pa.Schema:
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


# Field metadata naming the input column a renamed field reads (see rename_reserved).
INPUT_NAME_KEY = b"aesthetic_dask.input_name"


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
