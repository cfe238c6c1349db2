"""A tar shard as a bounded stream of members: the layer under the WebDataset reader and the
``--write-shards`` writer. Names are data, never paths (:func:`safe_member_name` for writing
them back); compressed shards are decompressed as they stream, with decompression bombs and
huge extended headers bounded (:class:`TarStream`, :class:`BoundedTarInfo`); members are
grouped into samples by key (:func:`iter_members`).
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any, Iterator


def split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member: ``a/b/x.seg.JPG`` -> (``a/b/x``, ``seg.jpg``)."""
    directory, base = posixpath.split(member_name)
    dot = base.find(".")
    stem, ext = (base, "") if dot < 0 else (base[:dot], base[dot + 1 :])
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def clean_name(name: str) -> tuple[str, bool]:
    """A member name as valid UTF-8 text, and whether it was (tarfile keeps undecodable bytes as
    surrogates, which no Arrow string may hold)."""
    try:
        name.encode("utf-8")
        return name, True
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), False


def shown(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters for a message or a key (a hostile name can be megabytes),
    with a digest of the whole, so two long names cut alike stay apart."""
    if len(text) <= limit:
        return text
    import hashlib

    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{text[:limit]}...({len(text)} characters, sha256 {digest})"


def safe_member_name(name: str) -> str:
    """A member name that extracts inside its directory, written by ``--write-shards``: no absolute
    path, no ``.`` or ``..`` part, valid UTF-8. An injective escape (``%`` -> ``%25``, ``\\`` ->
    ``%5C``, an empty part -> ``%2F``, ``.``/``..`` -> ``%2E``/``%2E%2E``), so distinct names stay
    distinct and ``urllib.parse.unquote`` of each part gives back the original."""
    special = {"": "%2F", ".": "%2E", "..": "%2E%2E"}
    parts = clean_name(name)[0].split("/")
    return "/".join(special.get(p) or p.replace("%", "%25").replace("\\", "%5C") for p in parts)


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
# In a compressed shard, a member's data that expands more than MAX_EXPANSION times the compressed
# bytes it came from, once past EXPANSION_FLOOR, is a bomb. Image data is already compressed (a
# JPEG or PNG member is about 1:1), while 200 MiB of zeros are 200 KB of gzip: 8 such members are a
# 1.6 MB .tar.gz that cost gigabytes to read and seconds to inflate. A bomb image is its sample's
# error and is read no further (memory); a stream can only skip a member by inflating it, so once
# bomb members have inflated MAX_BOMB_BYTES in all, the shard is read no further (time). Only
# member data is measured: tar headers and tiny sidecars compress 80-300:1 in honest shards.
MAX_EXPANSION = 50
EXPANSION_FLOOR = 16 << 20
MAX_BOMB_BYTES = 256 << 20

# A PAX or GNU long-name header is read whole by tarfile (and decoded): one of 1 GB is 1 MB of
# .tar.gz. A longer one is skipped unread, and its member is its sample's error.
MAX_HEADER_BYTES = 4 << 20
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class ShardBomb(ValueError):
    """Bomb members of a compressed shard inflated past :data:`MAX_BOMB_BYTES`: the shard is read no further."""


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, except that an extended header (PAX, GNU long name) over
    :data:`MAX_HEADER_BYTES` is skipped unread: the member it belongs to carries ``header_bytes``."""

    header_bytes = 0

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENDED or self.size <= MAX_HEADER_BYTES:
            return super()._proc_member(tar)
        tar.fileobj.seek(tar.fileobj.tell() + self._block(self.size))  # a stream skips by reading, in blocks
        try:
            member = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        member.offset, member.header_bytes = self.offset, max(self.size, member.header_bytes)
        return member


def open_shard(stream: TarStream) -> tarfile.TarFile:
    """A streaming read of the tar in ``stream``, with extended headers bounded (:class:`BoundedTarInfo`)."""
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo)


class TarStream:
    """The (decompressed) tar byte stream, remembering its size and last 1024 bytes: a streaming
    tar read stops silently at a cut header, so completeness is checked from these. In a compressed
    stream it measures each member's expansion (see :meth:`watch`, :meth:`bomb`) and raises
    :class:`ShardBomb` once bomb members inflated past :data:`MAX_BOMB_BYTES`."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.member: tarfile.TarInfo | None = None
        self.member_raw_start, self.member_is_bomb, self.bomb_bytes = 0, False, 0
        head = raw.read(6)
        raw.seek(0)
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
        if kind == "gzip":
            import gzip

            self.stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "bz2":
            import bz2

            self.stream = bz2.BZ2File(raw, mode="rb")
        elif kind == "xz":
            import lzma

            self.stream = lzma.LZMAFile(raw, mode="rb")
        else:
            self.stream = raw
        self.compressed = kind is not None
        self.size, self.tail = 0, b""

    def watch(self, member: tarfile.TarInfo) -> None:
        """The data of ``member`` comes next (read or skipped): measure its expansion."""
        if self.compressed:
            if self.member_is_bomb:
                self.bomb_bytes += self.member.size
            self.member, self.member_raw_start, self.member_is_bomb = member, self.raw.tell(), False

    def bomb(self, member: tarfile.TarInfo) -> bool:
        """Whether ``member``'s data, as far as read, expands like a decompression bomb."""
        return self.member is member and self.member_is_bomb

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)  # tarfile reads records of 10 KiB: the check comes that often
        self.size += len(data)
        self.tail = (self.tail + data)[-1024:]
        member = self.member
        if member is not None:
            inside = min(self.size, member.offset_data + member.size) - member.offset_data
            if not self.member_is_bomb and inside > EXPANSION_FLOOR:
                self.member_is_bomb = inside > MAX_EXPANSION * max(self.raw.tell() - self.member_raw_start, 1)
            if self.member_is_bomb and self.bomb_bytes + inside > MAX_BOMB_BYTES:
                raise ShardBomb(f"members expanding over {MAX_EXPANSION}x from the compressed bytes (decompression "
                                f"bombs, {shown(clean_name(member.name)[0])!r} the last) inflated past {MAX_BOMB_BYTES} bytes")
        return data

    def complete(self) -> bool:
        """Read to the end (a cut compressed stream raises EOFError here) and check the tar's end
        marker: two zero blocks at a 512-byte boundary."""
        while self.read(1 << 20):
            pass
        return self.size >= 1024 and self.size % 512 == 0 and not self.tail.strip(b"\0")


def iter_members(tar: tarfile.TarFile, stream: TarStream | None = None) -> Iterator[tuple[int, str, str, tarfile.TarInfo]]:
    """(sample index, key, extension, member) for every member but directories, grouped exactly as
    :class:`ShardReader` groups samples: a run of consecutive members sharing a key. ``stream``
    (the tar's :class:`TarStream`) measures each member's expansion."""
    index, key = -1, None
    for member in tar:
        if stream is not None:
            stream.watch(member)
        if member.isdir():
            continue
        if getattr(member, "header_bytes", 0):  # its name was never read: a sample of its own
            member_key, ext = f"(a member with a {member.header_bytes}-byte header at offset {member.offset})", ""
        else:
            member_key, ext = split_key(clean_name(member.name)[0])
        if member_key != key:
            index, key = index + 1, member_key
        yield index, member_key, ext, member
