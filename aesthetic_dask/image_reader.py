"""Images in their containers: WebDataset tar shards as samples (:class:`ShardReader`), their
columns, and image bytes in Parquet columns. The input kinds that read them are
:mod:`.sources.shards` and :mod:`.sources.image_parquet`.

Shards are streamed member by member (never extracted: a member name is data, never a path).
A sample is a run of consecutive members sharing a key: the member path up to the first dot of
its last component (``a/b/x.jpg`` -> ``a/b/x``). ``.txt`` is the caption, ``.json`` is kept as
text, and fields named in ``json_fields`` become typed columns.
"""

from __future__ import annotations

from functools import cached_property

import json
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from .columns import RESERVED_SAMPLE_COLUMNS
from .errors import InputError
from .naming import source_name
from .storage import split
from . import tar_stream  # its bounds read at use: a test may lower them
from .tar_stream import ShardBomb, TarStream, clean_name, iter_members, open_shard, shown

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
JSON_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
# A member larger than this is never read into memory (its sample becomes an error row).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Default cap of one .txt/.json sidecar (config max_sidecar_bytes): held for the whole shard.
MAX_SIDECAR_BYTES = 64 * 1024
# A key longer than this is its sample's error (PAX headers allow names of any length, and a
# key is copied into every output row, the manifest's examples and the report).
MAX_KEY_CHARS = 1024
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")


@dataclass(frozen=True)
class ShardPart:
    """One WebDataset shard: one partition and one set of output files."""

    source: str
    rows: int | None = None  # unknown until the shard is read
    identity: str | None = field(default=None, compare=False)  # what was planned: storage.identities

    @cached_property  # a digest of the path: computed once per part, however often it is asked
    def name(self) -> str:
        """``stem-digest`` of the shard's path: a pure function of it, same on every machine."""
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
    special: str | None = None  # a link or special member of this sample, never read


@dataclass
class ShardReader:
    """Iterate the samples of a tar shard (plain, .gz, .bz2 or .xz); ``failure`` says why reading
    stopped early, if it did. Whatever one sample holds, it becomes a sample (maybe an error row):
    nothing a member contains can end the shard."""

    path: str  # a local path or an fsspec URL: streamed either way, never downloaded whole
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES
    storage_options: dict[str, Any] | None = None
    failure: str | None = field(default=None, init=False)
    opened: bool = field(default=False, init=False)  # False: the failure came before any byte was read

    def __iter__(self) -> Iterator[Sample]:
        current: Sample | None = None
        self._in_member = False
        try:
            fs, path = split(self.path, self.storage_options)
            with fs.open(path, "rb") as raw:
                self.opened = True
                stream = self._stream = TarStream(raw)
                with open_shard(stream) as tar:
                    for index, key, ext, member in iter_members(tar, stream):
                        if current is not None and index != current.index:
                            yield _finish(current)
                            current = None
                        if current is None:
                            current = Sample(key=shown(key, MAX_KEY_CHARS), index=index)
                            if getattr(member, "header_bytes", 0):
                                current.error = (f"member header is {member.header_bytes} bytes (a name or attributes "
                                                 f"that long), over the limit of {tar_stream.MAX_HEADER_BYTES}; not read")
                            elif len(key) > MAX_KEY_CHARS:
                                current.error = f"key is {len(key)} characters, over the limit of {MAX_KEY_CHARS}"
                            elif not clean_name(member.name)[1]:
                                current.error = "member name is not valid UTF-8"
                        self._add(current, ext, member, tar)
                    if not stream.complete():
                        n = 0 if current is None else current.index + 1
                        self.failure = f"archive truncated: no end-of-archive marker after {n} samples"
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
            complete = 0 if current is None else current.index + (not self._in_member)
            self.failure = _describe_tar_error(exc, complete)
            if current is not None and self._in_member:
                # Damage inside this sample's data: it is still accounted for, as an error row.
                cause = "the shard's expansion past its bound" if isinstance(exc, ShardBomb) else "archive damage"
                current.image, current.error = None, f"sample cut off by {cause}: {type(exc).__name__}"
        if current is not None:
            yield _finish(current)

    def _add(self, sample: Sample, ext: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        last = ext.rsplit(".", 1)[-1]
        is_image = last in IMAGE_EXTENSIONS
        if not (is_image or ext in ("txt", "json")):
            return
        name = shown(clean_name(member.name)[0])
        if not member.isfile():  # a link or a device: never followed, never read
            kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
            sample.special = sample.special or f"member {name!r} is a {kind}, not a regular file"
            return
        if member.issparse():
            # Its holes read as zeros: a 140 KiB shard can expand to gigabytes. Never read.
            sample.error = sample.error or f"member {name!r} is a sparse file ({member.size} bytes once its holes are filled); not read"
            return
        limit = self.max_member_bytes if is_image else self.max_sidecar_bytes
        if member.size > limit:
            what = "image" if is_image else f".{ext} sidecar"
            option = "" if is_image else " (max_sidecar_bytes)"
            sample.error = sample.error or f"{what} {name!r} is {member.size} bytes, over the limit of {limit}{option}"
            return
        self._in_member = True
        data = self._read_member(tar, member, name) if is_image else tar.extractfile(member).read()
        self._in_member = False
        if data is None:  # a bomb: the sample's error, read no further
            sample.error = sample.error or (f"image {name!r} expands over {tar_stream.MAX_EXPANSION}x from the compressed "
                                            "shard (a decompression bomb); not read")
            return
        if is_image and sample.image is None:
            sample.image, sample.image_ext = data, ext
        elif ext == "txt":
            sample.caption = data.decode("utf-8", errors="replace")
        elif ext == "json":
            sample.json_text = data.decode("utf-8", errors="replace")


    def _read_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes | None:
        """An image member's bytes; None where it expands like a bomb (read in steps, so at most
        about :data:`EXPANSION_FLOOR` of it is ever held)."""
        stream, source = self._stream, tar.extractfile(member)
        if not stream.compressed or member.size <= tar_stream.EXPANSION_FLOOR:
            return source.read()
        chunks = []
        while chunk := source.read(1 << 20):
            if stream.bomb(member):
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def _finish(sample: Sample) -> Sample:
    if sample.image is None and sample.error is None:
        sample.error = sample.special or "no image"
    if sample.error:
        sample.image = None
    return sample


def _describe_tar_error(exc: BaseException, samples_read: int) -> str:
    if isinstance(exc, ShardBomb):
        return f"{exc}; the shard is not read past its first {samples_read} samples"
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
            raise InputError(f"json field {item!r}: type must be one of {', '.join(JSON_TYPES)}")
        if name in RESERVED_SAMPLE_COLUMNS:
            raise InputError(f"--json-fields {name}: {name!r} is a column the job writes "
                             f"({', '.join(RESERVED_SAMPLE_COLUMNS)}); choose another field")
        fields[name] = JSON_TYPES[kind]
    return fields


def json_field_values(texts: list[str | None], fields: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Typed columns of the named fields; null where absent, malformed or of another type."""
    parsed: list[dict[str, Any]] = []
    for text in texts:
        try:
            obj = json.loads(text) if text else {}
        except (ValueError, RecursionError):  # malformed, or nested deeper than the parser goes
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
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
        return value if ok else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            return None
    return None


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
        raise InputError(f"{where}: column {column!r} has type {dtype}, expected binary image bytes or struct<bytes, path>")
