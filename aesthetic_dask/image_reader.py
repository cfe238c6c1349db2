"""Readers of images: WebDataset tar shards and Parquet with image bytes.

Shards are streamed member by member (never extracted: a member name is data, never a path).
A sample is a run of consecutive members sharing a key: the member path up to the first dot of
its last component (``a/b/x.jpg`` -> ``a/b/x``). ``.txt`` is the caption, ``.json`` is kept as
text, and fields named in ``json_fields`` become typed columns.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa

from .errors import DataError
from .sources import expand_inputs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
JSON_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
# A member larger than this is never read into memory (its sample becomes an error row).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ShardPart:
    """One WebDataset shard: one partition and one set of output files."""

    source: str
    rows: int | None = None  # unknown until the shard is read

    @property
    def name(self) -> str:
        """``stem-digest`` of the shard's path: a pure function of it, same on every machine."""
        from .embeddings_reader import source_name

        return source_name(self.source)


@dataclass
class Sample:
    key: str
    index: int
    image: bytes | None = None
    image_ext: str | None = None
    caption: str | None = None
    json_text: str | None = None
    error: str | None = None


def split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member: ``a/b/x.seg.JPG`` -> (``a/b/x``, ``seg.jpg``)."""
    directory, base = posixpath.split(member_name)
    dot = base.find(".")
    stem, ext = (base, "") if dot < 0 else (base[:dot], base[dot + 1 :])
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


@dataclass
class ShardReader:
    """Iterate the samples of a tar shard; ``failure`` says why reading stopped early, if it did."""

    path: str
    max_member_bytes: int = MAX_MEMBER_BYTES
    failure: str | None = field(default=None, init=False)

    def __iter__(self) -> Iterator[Sample]:
        current: Sample | None = None
        index = 0
        self._in_member = False
        try:
            with tarfile.open(self.path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_key(member.name)
                    if current is not None and key != current.key:
                        yield _finish(current)
                        current, index = None, index + 1
                    if current is None:
                        current = Sample(key=key, index=index)
                    self._add(current, ext, member, tar)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            complete = index + (current is not None and not self._in_member)
            self.failure = _describe_tar_error(exc, complete)
            if current is not None and self._in_member:
                # Damage inside this sample's data: it is still accounted for, as an error row.
                current.image, current.error = None, f"sample cut off by archive damage: {type(exc).__name__}"
        if self.failure is None and not _has_end_marker(self.path):
            self.failure = f"archive truncated: no end-of-archive marker after {index + (current is not None)} samples"
        if current is not None:
            yield _finish(current)

    def _add(self, sample: Sample, ext: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        last = ext.rsplit(".", 1)[-1]
        wanted = last in IMAGE_EXTENSIONS or ext in ("txt", "json")
        if not wanted:
            return
        if member.size > self.max_member_bytes:
            sample.error = f"member {member.name!r} is {member.size} bytes, over the {self.max_member_bytes}-byte limit"
            return
        self._in_member = True
        data = tar.extractfile(member).read()
        self._in_member = False
        if last in IMAGE_EXTENSIONS and sample.image is None:
            sample.image, sample.image_ext = data, ext
        elif ext == "txt":
            sample.caption = data.decode("utf-8", errors="replace")
        elif ext == "json":
            sample.json_text = data.decode("utf-8", errors="replace")


def _has_end_marker(path: str) -> bool:
    """Whether an uncompressed tar ends with its zero blocks (a streaming read stops silently
    at a cut header); compressed shards are checked by their own stream format instead."""
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7"):
            return True
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read()
    return size >= 1024 and size % 512 == 0 and not tail.strip(b"\0")


def _finish(sample: Sample) -> Sample:
    if sample.image is None and sample.error is None:
        sample.error = "no image"
    return sample


def _describe_tar_error(exc: BaseException, samples_read: int) -> str:
    if samples_read == 0 and isinstance(exc, tarfile.ReadError):
        return f"not a tar archive: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError) and exc.filename:
        return f"cannot read the shard: {exc.strerror or exc}"
    return f"archive truncated or corrupt after {samples_read} samples: {type(exc).__name__}: {exc}"


def parse_json_fields(spec: list[str] | str | None) -> dict[str, pa.DataType]:
    """``["width:int64", "url"]`` (or ``"width:int64,url"``) -> field types (default string)."""
    if not spec:
        return {}
    items = spec.split(",") if isinstance(spec, str) else spec
    fields: dict[str, pa.DataType] = {}
    for item in (i.strip() for i in items if i.strip()):
        name, _, kind = item.partition(":")
        kind = kind or "string"
        if kind not in JSON_TYPES:
            from .errors import InputError

            raise InputError(f"json field {item!r}: type must be one of {', '.join(JSON_TYPES)}")
        fields[name] = JSON_TYPES[kind]
    return fields


def json_field_values(texts: list[str | None], fields: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Typed columns of the named fields; null where absent, malformed or of another type."""
    parsed: list[dict[str, Any]] = []
    for text in texts:
        try:
            obj = json.loads(text) if text else {}
        except ValueError:
            obj = {}
        parsed.append(obj if isinstance(obj, dict) else {})
    columns = {}
    for name, dtype in fields.items():
        values = [_coerce_json(obj.get(name), dtype) for obj in parsed]
        columns[name] = pa.array(values, type=dtype)
    return columns


def _coerce_json(value: Any, dtype: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(dtype):
        return value if isinstance(value, str) else json.dumps(value)
    if pa.types.is_boolean(dtype):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(dtype):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shard_schema(fields: dict[str, pa.DataType]) -> pa.Schema:
    """The one schema of every shard's samples (whatever sidecars each shard has)."""
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("source", pa.string()),
            pa.field("image", pa.binary()),
            pa.field("image_ext", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("json", pa.string()),
            *[pa.field(name, dtype) for name, dtype in fields.items()],
            pa.field("error", pa.string()),
        ]
    )


def samples_table(samples: list[Sample], source: str, fields: dict[str, pa.DataType], with_images: bool = True) -> pa.Table:
    """Samples as an Arrow table of :func:`shard_schema` (image bytes left null if not wanted)."""
    schema = shard_schema(fields)
    columns = {
        "key": [s.key for s in samples],
        "source": [source] * len(samples),
        "image": [s.image if with_images else None for s in samples],
        "image_ext": [s.image_ext for s in samples],
        "caption": [s.caption for s in samples],
        "json": [s.json_text for s in samples],
        **json_field_values([s.json_text for s in samples], fields),
        "error": [s.error for s in samples],
    }
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def read_shard(part: ShardPart, fields: dict[str, pa.DataType]) -> pd.DataFrame:
    """Partition function of :func:`read_webdataset`: one shard as a pandas frame.

    A shard that cannot be read whole raises :class:`DataError` naming it (as Dask's own readers
    do on a corrupt file); the ``run`` job instead keeps the samples before the damage and
    records the failure, with the same :class:`ShardReader`.
    """
    reader = ShardReader(part.source)
    samples = list(reader)
    if reader.failure:
        raise DataError(f"{part.source}: {reader.failure}")
    return samples_table(samples, part.source, fields).to_pandas(types_mapper=pd.ArrowDtype)


def plan_shards(inputs: list[str] | str) -> list[ShardPart]:
    """One part per tar shard found in the inputs (files, directories, globs)."""
    return [ShardPart(str(p)) for p in expand_inputs(inputs, (".tar", ".tar.gz", ".tgz"))]


def read_webdataset(paths: list[str] | str, json_fields: list[str] | str | None = None):
    """Lazy Dask frame of WebDataset shards, one partition per shard.

    Columns: ``key``, ``source``, ``image`` (bytes), ``image_ext``, ``caption``, ``json`` (the
    sidecar's text), the ``json_fields`` as typed columns, and ``error`` ("no image").
    """
    import dask.dataframe as dd

    fields = parse_json_fields(json_fields)
    meta = shard_schema(fields).empty_table().to_pandas(types_mapper=pd.ArrowDtype)
    return dd.from_map(read_shard, plan_shards(paths), fields=fields, meta=meta, enforce_metadata=False, label="read-webdataset")


def image_values(column: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    """Image bytes from a binary column or a Hugging Face-style ``struct<bytes, path>`` column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def check_image_type(dtype: pa.DataType, column: str, where: str) -> None:
    ok = pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
    if pa.types.is_struct(dtype):
        ok = dtype.get_field_index("bytes") >= 0
    if not ok:
        from .errors import InputError

        raise InputError(f"{where}: column {column!r} has type {dtype}, expected binary image bytes or struct<bytes, path>")


def read_image_parquet(paths: list[str] | str, image_column: str = "image", partition_rows: int = 4096):
    """Lazy Dask frame of Parquet files holding image bytes (binary or ``struct<bytes, path>``)."""
    from .embeddings_reader import parquet_frame, plan_parquet

    plan = plan_parquet(paths, image_column, check_image_type, partition_rows)
    if plan.failed:
        path, reason = next(iter(plan.failed.items()))
        raise DataError(f"{path}: {reason}")
    return parquet_frame(plan)
