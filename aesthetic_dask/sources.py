"""Expanding INPUT arguments (files, directories, globs) into a sorted list of files."""

from __future__ import annotations

import glob
from pathlib import Path

from .errors import InputError

_GLOB_CHARS = set("*?[")


def expand_inputs(inputs: list[str] | str, suffixes: tuple[str, ...]) -> list[Path]:
    """Files named directly, found under directories (recursively, by suffix), or matched by globs.

    Order is stable (sorted per argument) so partition numbering and output names are
    deterministic. A missing path or a glob that matches nothing is an :class:`InputError`.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    files: list[Path] = []
    for raw in inputs:
        if _GLOB_CHARS & set(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            if not matches:
                raise InputError(f"input {raw}: the pattern matches no file")
            for m in matches:
                files.extend(_expand_one(m, suffixes))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"input {raw}: no such file or directory")
        found = _expand_one(path, suffixes)
        if not found:
            raise InputError(f"input {raw}: no {'/'.join(suffixes)} files under this directory")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _expand_one(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith((".", "_"))
        )
    return [path]
