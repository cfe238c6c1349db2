"""Expanding INPUT arguments (files, directories, globs) into a sorted list of absolute files.

Paths are made absolute here, in the client, so tasks find them on workers whose working
directory differs. A job's own output directories are never read as input: they are skipped when
listing directories and globs, and naming a file inside one is refused.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import InputError

_GLOB_CHARS = set("*?[")


@dataclass
class InputFiles:
    """The files to read, in a stable order, and the spellings that named a file already listed."""

    files: list[Path]
    duplicates: list[str] = field(default_factory=list)


def list_inputs(
    inputs: list[str] | str, suffixes: tuple[str, ...], exclude: Iterable[str | Path] = ()
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
    excluded = [Path(e).expanduser().resolve() for e in exclude]
    files: list[Path] = []
    for raw in inputs:
        if _GLOB_CHARS & set(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(Path(raw).expanduser()), recursive=True))
            matches = [m for m in matches if not _inside(m, excluded)]
            if not matches:
                raise InputError(f"input {raw}: the pattern matches no file")
            for m in matches:
                files.extend(_expand_one(m, suffixes, excluded))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"input {raw}: no such file or directory")
        check_not_inside(raw, excluded)
        found = _expand_one(path, suffixes, excluded)
        if not found:
            raise InputError(f"input {raw}: no {'/'.join(suffixes)} files under this directory")
        files.extend(found)
    seen: set[Path] = set()
    unique, duplicates = [], []
    for f in files:
        key = f.resolve()
        if key in seen:
            duplicates.append(str(f))
            continue
        seen.add(key)
        unique.append(Path(os.path.abspath(f)))
    return InputFiles(unique, duplicates)


def expand_inputs(inputs: list[str] | str, suffixes: tuple[str, ...], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """The files of :func:`list_inputs`, without the duplicate report."""
    return list_inputs(inputs, suffixes, exclude).files


def check_not_inside(raw: str | Path, exclude: Iterable[str | Path]) -> None:
    """Refuse an input that lies inside one of the job's output directories."""
    owner = _inside(Path(raw).expanduser(), [Path(e).expanduser().resolve() for e in exclude])
    if owner:
        raise InputError(f"input {raw} lies inside the job's output directory {owner}; it is never read as input")


def _inside(path: Path, excluded: list[Path]) -> Path | None:
    """The excluded directory ``path`` lies in (or is), if any."""
    resolved = path.resolve()
    for e in excluded:
        if resolved == e or e in resolved.parents:
            return e
    return None


def _expand_one(path: Path, suffixes: tuple[str, ...], excluded: list[Path]) -> list[Path]:
    if path.is_dir():
        found = []
        for root, dirs, names in os.walk(path):
            # Prune the job's own output directories (an OUT inside an input directory).
            dirs[:] = sorted(d for d in dirs if not _inside(Path(root) / d, excluded))
            found.extend(
                Path(root) / n for n in names if n.lower().endswith(suffixes) and not n.startswith((".", "_"))
            )
        return sorted(found)
    return [path]
