"""The report's thumbnails, made where images are decoded (the samples sink stores them): which
samples get one, and the 128-px JPEG itself. Made while decoding, for the first samples of a
partition and ~1 in 32 after: bounded, deterministic, and a few percent of the decode work at most."""

from __future__ import annotations

import io
import zlib
from typing import Any

THUMBNAIL_PX = 128
THUMBNAIL_FIRST = 16
THUMBNAIL_EVERY = 32
THUMBNAIL_MAX = 128


def wants_thumbnail(index: int, key: str | None, made: int) -> bool:
    """Whether sample ``index`` of a partition gets a thumbnail (``made`` so far)."""
    if made >= THUMBNAIL_MAX:
        return False
    return index < THUMBNAIL_FIRST or zlib.crc32((key or str(index)).encode()) % THUMBNAIL_EVERY == 0


def make_thumbnail(image: Any) -> bytes:
    """A <= 128-px RGB JPEG of a decoded PIL image."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return buf.getvalue()
