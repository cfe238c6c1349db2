"""Crafted hostile inputs, built by the tests and by ``benchmarks/bench_hostile.py`` (which
measures what each costs against a normal input of the same count)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk_after_pixels(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk between its last IDAT and IEND (where Pillow reads it at load())."""
    assert png[-12:] == png_chunk(b"IEND", b"")
    return png[:-12] + png_chunk(kind, data) + png[-12:]


def ztxt_bomb(png: bytes, inflated: int = 8 << 20) -> bytes:
    """``png`` with a zTXt chunk after its pixels that inflates to ``inflated`` bytes (past Pillow's
    MAX_TEXT_CHUNK): a few KiB on disk."""
    return with_chunk_after_pixels(png, b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * inflated, 9))


def extreme_aspect_png(length: int = 16000) -> bytes:
    """A 1 x ``length`` RGB PNG of about a hundred bytes: its shortest-side resize to 224 would be
    224 x (224 * length) pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((1, length)).save(buf, "PNG")
    return buf.getvalue()


def gnu_sparse_member(name: str, data: bytes, real_size: int) -> bytes:
    """An old-GNU sparse member (type 'S'): ``data`` stored, then holes up to ``real_size`` that a
    reader fills with zeros. tarfile reads these but cannot write them."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512]) + data + b"\0" * (-len(data) % 512)


def yaml_alias_bomb(levels: int = 9) -> str:
    """A config whose ``storage_options`` are ``levels`` levels of ten aliases each: under 1 KB of
    YAML that a loader expanding aliases turns into 10^levels values."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "storage_options:\n" + "".join(f"  {line}\n" for line in lines)


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of the given (member name, bytes), in order, in tarfile's ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
