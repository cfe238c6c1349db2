"""Reader: precomputed CLIP embeddings (Parquet, or clip-retrieval folders) as a lazy Dask frame.

One partition per Parquet file or run of row groups (about ``partition_rows`` rows), and per row
range of a clip-retrieval ``img_emb/img_emb_N.npy`` with its row-aligned
``metadata/metadata_N.parquet``. Partitions are pandas frames with pyarrow-backed columns (no
Python objects per row), indexed by row number in their source file.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from .errors import DataError, InputError, MissingColumnError
from . import storage
from .sources import check_not_inside, list_inputs

EMBEDDING_TYPE = pa.list_(pa.float32())
_NPY_NAME = re.compile(r"img_emb_(\d+)\.npy$")


@dataclass(frozen=True)
class EmbeddingPart:
    """Rows ``[start, stop)`` of one input file: one partition, one set of output files."""

    source: str
    start: int
    stop: int
    row_groups: tuple[int, ...] | None = None  # Parquet input: the row groups holding the rows
    metadata: str | None = None  # clip-retrieval input: the row-aligned metadata Parquet

    @property
    def name(self) -> str:
        """Deterministic output name: file stem, a digest of its (absolute) path, the row range.

        A pure function of ``source``, so the client and every worker agree on it.
        """
        return f"{source_name(self.source)}-{self.start:010d}-{self.stop:010d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def source_name(source: str) -> str:
    """``stem-digest`` of an input path: readable, and unique per path."""
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    return f"{Path(str(source)).name.split('.')[0][:80]}-{digest}"


@dataclass
class EmbeddingPlan:
    """What to read: the partitions, the one schema they share, and inputs that could not be read
    (path -> reason: each is a :class:`DataError`, recorded, and the job goes on)."""

    parts: list[EmbeddingPart]
    schema: pa.Schema
    embedding_column: str
    failed: dict[str, str]
    duplicates: list[str] = field(default_factory=list)


def _check_embedding_type(dtype: pa.DataType, column: str, where: str) -> None:
    is_list = pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
    if not (is_list and pa.types.is_floating(dtype.value_type)):
        raise InputError(
            f"{where}: column {column!r} has type {dtype}, expected list<float> or "
            "fixed_size_list<float>[768] (float16/32/64)"
        )


def _group_row_groups(meta: pq.FileMetaData, target_rows: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Consecutive row groups, about ``target_rows`` rows per group: (start, stop, row groups)."""
    groups: list[tuple[int, int, tuple[int, ...]]] = []
    start = stop = 0
    current: list[int] = []
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if current and stop - start + n > target_rows:
            groups.append((start, stop, tuple(current)))
            start, current = stop, []
        current.append(i)
        stop += n
    if current:
        groups.append((start, stop, tuple(current)))
    return groups


def _open_footer(url: str, storage_options: dict[str, Any] | None = None) -> pq.FileMetaData | str:
    """The footer of a Parquet file (local or remote), or why it cannot be read."""
    try:
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
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[EmbeddingPart], list[tuple[str, pa.Schema]], dict[str, str]]:
    parts: list[EmbeddingPart] = []
    schemas: list[tuple[str, pa.Schema]] = []
    failed: dict[str, str] = {}
    with ThreadPoolExecutor(16) as pool:  # footers are small reads: many at once, for object storage
        footers = list(pool.map(lambda f: _open_footer(f, storage_options), files))
    for path, meta in zip(files, footers):
        if isinstance(meta, str):
            failed[str(path)] = meta
            continue
        schema = meta.schema.to_arrow_schema()
        if column not in schema.names:
            raise MissingColumnError(str(path), column, schema.names)
        check(schema.field(column).type, column, str(path))
        schemas.append((str(path), schema))
        for start, stop, groups in _group_row_groups(meta, partition_rows):
            parts.append(EmbeddingPart(str(path), start, stop, row_groups=groups))
    return parts, schemas, failed


def plan_parquet(
    inputs: list[str] | str,
    column: str,
    check: Callable[[pa.DataType, str, str], None],
    partition_rows: int,
    canonical: pa.DataType | None = None,
    exclude: tuple[str, ...] = (),
    reserved: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
) -> EmbeddingPlan:
    """Partitions and shared schema of Parquet files/dirs/globs that must hold ``column``.

    Input columns named in ``reserved`` (columns the job writes) are read as ``NAME_input``.
    """
    listed = list_inputs(inputs, (".parquet", ".pq"), exclude, storage_options)
    parts, schemas, failed = _plan_parquet_files(listed.files, column, check, partition_rows, storage_options)
    schema = rename_reserved(_unify(schemas, column, canonical), reserved, column)
    return EmbeddingPlan(parts, schema, column, failed, listed.duplicates)


def plan_embeddings(
    inputs: list[str] | str,
    embedding_column: str = "embedding",
    partition_rows: int = 131072,
    exclude: tuple[str, ...] = (),
    reserved: tuple[str, ...] = ("aesthetic_score", "error"),
    storage_options: dict[str, Any] | None = None,
) -> EmbeddingPlan:
    """Partitions and the shared schema of Parquet files/dirs/globs and clip-retrieval folders.

    ``exclude``: directories never read as input (the job's OUT).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    is_folder = {i: _is_clip_retrieval_folder(i, storage_options) for i in inputs}
    folders = [os.path.abspath(i) if "://" not in i else i for i in inputs if is_folder[i]]
    others = [i for i in inputs if not is_folder[i]]
    listed = list_inputs(others, (".parquet", ".pq"), exclude, storage_options) if others else None
    try:
        parts, schemas, failed = _plan_parquet_files(
            listed.files if listed else [], embedding_column, _check_embedding_type, partition_rows, storage_options
        )
    except MissingColumnError as exc:
        raise InputError(f"{exc}; choose one with --embedding-column") from None
    seen_folders: set[str] = set()
    duplicates = list(listed.duplicates) if listed else []
    for folder in folders:
        identity = os.path.realpath(folder) if "://" not in folder else folder.rstrip("/")
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
    return EmbeddingPlan(parts, schema, embedding_column, failed, duplicates)


def _plan_clip_retrieval(
    folder: str, column: str, partition_rows: int, storage_options: dict[str, Any] | None = None,
) -> tuple[list[EmbeddingPart], list[tuple[str, pa.Schema]], dict[str, str]]:
    """Parts of a clip-retrieval folder; an unreadable or misaligned file pair is a failed input."""
    fs, root = storage.split(folder, storage_options)
    found = [p for p in fs.glob(storage.join(root, "img_emb", "img_emb_*.npy")) if _NPY_NAME.search(p)]
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
            parts.append(EmbeddingPart(npy_url, start, stop, metadata=meta_url))
    return parts, schemas, failed


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file object, from its header alone."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not supported")
    return shape, dtype, f.tell()


def read_npy_rows(url: str, start: int, stop: int, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D .npy file, reading only their bytes (local or remote)."""
    fs, path = storage.split(url, storage_options)
    with fs.open(path, "rb") as f:
        shape, dtype, offset = _npy_header(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(offset + start * row_bytes)
        data = f.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
        raise ValueError(f"file ends after {len(data) // max(row_bytes, 1)} of rows {start}-{stop}")
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))


def _open_clip_retrieval_pair(fs: Any, npy: str, meta_url: str, storage_options: dict[str, Any] | None
                              ) -> tuple[tuple[int, ...], pq.FileMetaData]:
    """The embeddings' shape and the metadata footer of one pair; DataError if unusable."""
    meta_fs, meta_path = storage.split(meta_url, storage_options)
    if not meta_fs.isfile(meta_path):
        raise DataError(f"no row-aligned metadata file {meta_url}")
    try:
        with fs.open(npy, "rb") as f:
            shape, dtype, _ = _npy_header(f)
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
_SOURCE_NAME = b"aesthetic_dask.input_name"


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
        schema = schema.set(i, schema.field(i).with_name(new).with_metadata({_SOURCE_NAME: name.encode()}))
    return schema


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: cast where types differ, nulls where absent,
    renamed input columns read from their input name."""
    columns = []
    for target in schema:
        source = (target.metadata or {}).get(_SOURCE_NAME, b"").decode() or target.name
        if source in table.column_names:
            col = table.column(source)
            if pa.types.is_struct(col.type) and pa.types.is_binary(target.type):
                col = pc.struct_field(col, "bytes")  # Hugging Face-style image struct<bytes, path>
            columns.append(col if col.type == target.type else col.cast(target.type))
        else:
            columns.append(pa.nulls(table.num_rows, target.type))
    return pa.Table.from_arrays(columns, schema=pa.schema([f.remove_metadata() for f in schema]))


def read_parquet_rows(url: str, start: int, stop: int, row_groups: tuple[int, ...] | None = None,
                      storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file (local or remote), reading only the row groups
    that hold them (and only ``columns`` of them that exist, when given).

    Uses a dataset fragment: measured here about 2x faster than ``ParquetFile.read_row_groups``.
    """
    import pyarrow.dataset as ds

    fs, path = storage.split(url, storage_options)
    fragment = ds.ParquetFileFormat().make_fragment(path, filesystem=storage.pyarrow_filesystem(fs))
    first = start
    if row_groups is None:
        meta = fragment.metadata
        row_groups, offset, first = [], 0, None
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if offset < stop and offset + n > start:
                row_groups.append(i)
                first = offset if first is None else first
            offset += n
        if not row_groups:
            return fragment.physical_schema.empty_table()
    if columns is not None:
        present = set(fragment.physical_schema.names)
        columns = [c for c in columns if c in present]
    # One thread per partition: Dask already runs partitions in parallel (threads would contend).
    table = fragment.subset(row_group_ids=list(row_groups)).to_table(columns=columns, use_threads=False)
    return table.slice(start - first, stop - start) if (start - first or table.num_rows != stop - start) else table


def read_embedding_table(part: EmbeddingPart, schema: pa.Schema, column: str,
                         storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The Arrow table of one partition, conformed to ``schema``. Raises DataError if unreadable."""
    # Only the columns the schema reads (under their input names): a projection, not every column.
    columns = [(f.metadata or {}).get(_SOURCE_NAME, b"").decode() or f.name for f in schema]
    try:
        if part.metadata is None:
            table = read_parquet_rows(part.source, part.start, part.stop, part.row_groups, storage_options, columns)
        else:
            table = read_parquet_rows(part.metadata, part.start, part.stop, None, storage_options)
            matrix = np.ascontiguousarray(read_npy_rows(part.source, part.start, part.stop, storage_options))
            values = pa.array(matrix.reshape(-1))
            table = table.append_column(column, pa.FixedSizeListArray.from_arrays(values, matrix.shape[1]))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{part.source}: cannot read rows {part.start}-{part.stop}: {exc}") from None
    if table.num_rows != part.rows:
        raise DataError(f"{part.source}: expected {part.rows} rows in {part.start}-{part.stop}, read {table.num_rows}")
    return conform(table, schema)


def table_to_frame(table: pa.Table, start: int = 0) -> pd.DataFrame:
    """Arrow table to a pandas frame with pyarrow-backed dtypes, indexed from ``start``."""
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    df.index = pd.RangeIndex(start, start + len(df))
    return df


def read_part(part: EmbeddingPart, schema: pa.Schema, column: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Partition function of the Parquet readers: one part as a pandas frame."""
    return table_to_frame(read_embedding_table(part, schema, column, storage_options), part.start)


def parquet_frame(plan: EmbeddingPlan, parts: list[EmbeddingPart] | None = None,
                  storage_options: dict[str, Any] | None = None):
    """The lazy Dask frame of ``plan`` (or of a subset of its parts)."""
    import dask.dataframe as dd

    parts = plan.parts if parts is None else parts
    meta = table_to_frame(pa.schema([f.remove_metadata() for f in plan.schema]).empty_table())
    return dd.from_map(
        read_part,
        parts,
        schema=plan.schema,
        column=plan.embedding_column,
        storage_options=storage_options,
        meta=meta,
        enforce_metadata=False,
        label="read-parquet",
    )


def read_embeddings(
    paths: list[str] | str, embedding_column: str = "embedding", partition_rows: int = 131072,
    storage_options: dict[str, Any] | None = None,
):
    """Lazy ``dask.dataframe.DataFrame`` of Parquet embedding files or clip-retrieval folders.

    ``paths``: files, directories or globs, local or fsspec URLs (``s3://...`` with
    ``storage_options``). The embedding column is ``list<float32>``; other columns keep their
    Arrow types, unified across files. Unreadable files raise ``DataError``.
    """
    plan = plan_embeddings(paths, embedding_column, partition_rows, storage_options=storage_options)
    if plan.failed:
        path, reason = next(iter(plan.failed.items()))
        raise DataError(f"{path}: {reason}")
    return parquet_frame(plan, storage_options=storage_options)
