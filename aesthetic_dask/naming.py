"""The output name of an input: a pure function of its path, the same in the client, on every
worker and in every run (a partition's files and record are named after it)."""

from __future__ import annotations

import hashlib
import posixpath


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
