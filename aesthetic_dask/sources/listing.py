"""Expanding INPUT arguments (files, directories, globs; local paths or fsspec URLs) into a sorted
list of absolute files, listed through their filesystem.

Local paths are made absolute here, in the client, so tasks find them on workers whose working
directory differs; URLs keep their protocol on every path the job records. A job's own output
directories are never read as input: they are skipped when listing directories and globs, and
naming a file inside one is refused. An earlier job's OUT found inside an input directory (a
``manifest.json`` beside a ``_parts/`` folder) is skipped too, and said in one line.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .. import storage, versions
from ..errors import InputError

_GLOB_CHARS = set("*?[")


@dataclass
class InputFiles:
    """The files to read (local absolute paths or URLs), in a stable order, and the spellings that
    named a file already listed."""

    files: list[str]
    duplicates: list[str] = field(default_factory=list)
    skipped_outputs: list[str] = field(default_factory=list)  # earlier jobs' OUTs found under an input
    skipped_special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices found under an input

    def notes(self) -> list[str]:
        """One line per earlier job's OUT and per special file skipped."""
        return [f"note: skipped {where}: an earlier aesthetic-dask job's output (manifest.json and _parts/), "
                "never read as input" for where in self.skipped_outputs] + \
            [f"note: skipped {where}: {_special_kind(where)}, not a regular file (reading it could wait for ever)"
             for where in self.skipped_special]


def list_inputs(
    inputs: list[str] | str,
    suffixes: tuple[str, ...],
    exclude: Iterable[str | Path] = (),
    storage_options: dict[str, Any] | None = None,
) -> InputFiles:
    """Files named directly, found under directories (recursively, by suffix), or matched by globs.

    Order is stable (sorted per argument) so partition numbering and output names are
    deterministic. A file named twice (a symlink, a relative and an absolute spelling) is listed
    once and reported in ``duplicates``. Anything under an ``exclude`` directory (the job's OUT)
    is skipped; naming it directly is an :class:`InputError`, as is a missing path or a glob that
    matches nothing.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    _real_directory.cache_clear()  # what the directories resolve to now
    files: list[tuple[str, str]] = []  # (identity, url)
    skipped: list[str] = []
    special: list[str] = []
    for raw in inputs:
        storage.check_reachable(raw, storage_options, "input")
        fs, path = storage.split(str(raw) if storage.is_url(raw) else str(Path(str(raw).removeprefix("file://")).expanduser()),
                                 storage_options)
        local = storage.is_local(fs)
        excluded = _excluded(exclude, fs, storage_options)
        try:
            if _GLOB_CHARS & set(path) and not fs.exists(path):  # a path that exists is meant literally
                matches = sorted(m for m in fs.glob(path) if not _inside(m, excluded, local))
                if not matches:
                    raise InputError(f"input {raw}: the pattern matches no file")
                for m in matches:
                    files.extend(_expand_one(fs, m, suffixes, excluded, local, skipped))
                continue
            if not fs.exists(path):
                raise InputError(f"input {raw}: no such file or directory")
        except InputError:
            raise  # already the one line
        except (OSError, PermissionError, ValueError) as exc:
            raise InputError(f"input {raw}: cannot list it: {type(exc).__name__}: {exc}") from None
        if _inside(path, excluded, local):
            raise InputError(f"input {raw} lies inside the job's output directory; it is never read as input")
        if local and not os.path.isdir(path) and _special_kind(path):
            raise InputError(f"input {raw}: {_special_kind(path)}, not a regular file; reading it could wait for ever")
        found = _expand_one(fs, path, suffixes, excluded, local, skipped)
        if not found:
            raise InputError(f"input {raw}: no {'/'.join(suffixes)} files under this directory")
        files.extend(found)
    seen: set[str] = set()
    unique, duplicates = [], []
    regular = []
    for identity, url in files:
        if not storage.is_url(url) and _special_kind(url):
            special.append(url)  # found by a directory or a glob: said, never opened
        else:
            regular.append((identity, url))
    for identity, url in regular:
        if identity in seen:
            duplicates.append(url)
            continue
        seen.add(identity)
        unique.append(url)
    return InputFiles(unique, duplicates, sorted(set(skipped)), sorted(set(special)))


def check_not_inside(raw: str, exclude: Iterable[str | Path], storage_options: dict[str, Any] | None = None) -> None:
    """Refuse an input that lies inside one of the job's output directories."""
    fs, path = storage.split(str(raw), storage_options)
    if _inside(path, _excluded(exclude, fs, storage_options), storage.is_local(fs)):
        raise InputError(f"input {raw} lies inside the job's output directory; it is never read as input")


def _excluded(exclude: Iterable[str | Path], fs: Any, storage_options: dict[str, Any] | None) -> list[str]:
    """The excluded directories that live on ``fs``, as its paths (resolved when local)."""
    out = []
    for e in exclude:
        efs, epath = storage.split(str(e), storage_options)
        if type(efs) is type(fs):
            out.append(os.path.realpath(epath) if storage.is_local(fs) else epath.rstrip("/"))
    return out


@functools.lru_cache(maxsize=65536)
def _real_directory(directory: str) -> str:
    return os.path.realpath(directory)


def _realpath(path: str) -> str:
    """``os.path.realpath`` at the cost of one lstat per file: its directory is resolved once per
    listing (realpath walks every component: 0.46 s for 5,000 files, twice)."""
    absolute = os.path.abspath(path)
    if os.path.islink(absolute):
        return os.path.realpath(absolute)
    head, tail = os.path.split(absolute)
    return os.path.join(_real_directory(head), tail) if tail else _real_directory(head)


def _inside(path: str, excluded: list[str], local: bool) -> bool:
    resolved = _realpath(path) if local else path.rstrip("/")
    return any(resolved == e or resolved.startswith(e.rstrip("/") + "/") for e in excluded)


def _expand_one(fs: Any, path: str, suffixes: tuple[str, ...], excluded: list[str], local: bool,
                skipped: list[str]) -> list[tuple[str, str]]:
    """(identity, url) of the file, or of the matching files under the directory, sorted; earlier
    jobs' OUTs under the directory go to ``skipped`` (as URLs) and are not listed."""
    if fs.isdir(path):
        everything = sorted(versions.local_find(path)) if local else fs.find(path)
        outs = [o for o in earlier_outputs(everything) if not _inside(o, excluded, local)]
        skipped.extend(_identify(fs, o, local)[1] for o in outs)
        found = [
            p for p in everything
            if p.lower().endswith(suffixes) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
            and not _inside(p, excluded + outs, local)
        ]
        return [_identify(fs, p, local) for p in sorted(found)]
    return [_identify(fs, path, local)]


def _special_kind(path: str) -> str | None:
    """What a local path is when it is not a regular file or a directory (a FIFO, a socket, a
    device), else None."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None


def earlier_outputs(paths: list[str]) -> list[str]:
    """The directories among ``paths``' parents that hold a job's OUT: a ``manifest.json`` beside
    a ``_parts/`` folder."""
    manifests = {p.rsplit("/", 1)[0] for p in paths if p.endswith("/manifest.json")}
    records = {p.rsplit("/_parts/", 1)[0] for p in paths if "/_parts/" in p}
    return sorted(manifests & records)


def _identify(fs: Any, path: str, local: bool) -> tuple[str, str]:
    if local:
        absolute = os.path.abspath(path)
        return _realpath(absolute), absolute
    url = fs.unstrip_protocol(path)
    return url, url
