"""clip-retrieval folders (``score``): ``img_emb/img_emb_N.npy`` with its row-aligned
``metadata/metadata_N.parquet``, an INPUT argument read whole (never listed by suffix). One
partition per row range of each ``.npy``; the embeddings read by byte range from its header
(:func:`embeddings_reader.read_npy_rows`), the metadata's row groups beside them."""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DataError, InputError
from ..embeddings_reader import npy_header
from ..parquet_plan import EMBEDDING_TYPE, ParquetPart, open_footer, row_ranges
from .kind import InputOptions, KindPlan
from .listing import check_not_inside
from .parquet_embeddings import EmbeddingsKind, embedding_schema

_NPY_NAME = re.compile(r"img_emb_(\d+)\.npy$")


class ClipRetrievalFolders(EmbeddingsKind):
    name = "clip-retrieval"

    def claims(self, path: str) -> bool:
        return False  # a folder is claimed whole, never file by file

    def claims_whole(self, argument: str, storage_options: dict[str, Any] | None) -> bool:
        if set("*?[") & set(str(argument)):
            return False
        storage.check_reachable(str(argument), storage_options, "input")
        fs, path = storage.split(str(argument), storage_options)
        try:
            return fs.isdir(storage.join(path, "img_emb"))
        except Exception:  # noqa: BLE001 - listing the inputs reports what is wrong with them
            return False

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        plan = KindPlan(self, [], None)
        schemas: list[tuple[str, pa.Schema]] = []
        seen: set[str] = set()
        for folder in (i if storage.is_url(i) else storage.local_path(i) for i in inputs):
            identity = folder.rstrip("/") if storage.is_url(folder) else os.path.realpath(folder)
            if identity in seen:
                plan.duplicates.append(folder)
                continue
            seen.add(identity)
            check_not_inside(folder, opts.exclude, opts.storage_options)
            self._plan_folder(folder, opts, plan, schemas)
        plan.schema = embedding_schema(schemas, opts) if schemas else None
        return plan

    @staticmethod
    def _plan_folder(folder: str, opts: InputOptions, plan: KindPlan, schemas: list[tuple[str, pa.Schema]]) -> None:
        """A folder's parts and metadata schemas into ``plan``; an unreadable or misaligned pair is a failed input."""
        fs, root = storage.split(folder, opts.storage_options)
        try:  # listed, never globbed: the folder's own name may hold [ ] or *
            found = [p for p in fs.ls(storage.join(root, "img_emb"), detail=False) if _NPY_NAME.search(p)]
        except FileNotFoundError:
            found = []
        npys = sorted(found, key=lambda p: int(_NPY_NAME.search(p)[1]))
        if not npys:
            raise InputError(f"{folder}: img_emb/ holds no img_emb_N.npy files")
        for npy in npys:
            n_str = _NPY_NAME.search(npy)[1]
            npy_url = storage.to_url(fs, npy)
            meta_url = storage.to_url(fs, storage.join(root, "metadata", f"metadata_{n_str}.parquet"))
            try:
                shape, meta = _open_pair(fs, npy, meta_url, opts.storage_options)
            except DataError as exc:
                plan.failed[npy_url] = str(exc)
                continue
            schema = meta.schema.to_arrow_schema()
            if opts.column in schema.names:
                raise InputError(f"{meta_url}: already has a column {opts.column!r}; pick another --embedding-column")
            schemas.append((meta_url, schema.append(pa.field(opts.column, EMBEDDING_TYPE))))
            for start, stop in row_ranges(shape[0], opts.partition_rows):
                plan.parts.append(ParquetPart(npy_url, start, stop, metadata=meta_url))


def _open_pair(fs: Any, npy: str, meta_url: str, storage_options: dict[str, Any] | None
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
    meta = open_footer(meta_url, storage_options)
    if isinstance(meta, str):
        raise DataError(f"metadata {meta_url}: {meta}")
    if meta.num_rows != shape[0]:
        raise DataError(f"{shape[0]} rows but {meta_url} has {meta.num_rows}; they must be row-aligned")
    return shape, meta
