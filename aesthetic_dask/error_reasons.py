"""Why rows are errors, grouped: each partition's error reasons by kind (numbers masked) with a
few example keys, bounded, on its record; merged over the partitions for the manifest and the
report."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

ERROR_KINDS_MAX = 50
ERROR_EXAMPLES = 3


def reason_kind(reason: str) -> str:
    """A reason with its numbers masked, so "image is 512x512 ..." and "image is 640x480 ..." group."""
    return re.sub(r"\d+", "N", reason)


def error_reasons(reasons: pa.Array | pa.ChunkedArray, keys: list[str]) -> dict[str, dict[str, Any]]:
    """{reason kind: {count, examples}} of one partition's error rows (bounded)."""
    out: dict[str, dict[str, Any]] = {}
    for reason, key in zip(reasons.to_pylist(), keys):
        kind = reason_kind(reason)
        entry = out.get(kind)
        if entry is None:
            if len(out) >= ERROR_KINDS_MAX:
                kind = "other reasons"
                entry = out.setdefault(kind, {"count": 0, "examples": []})
            else:
                entry = out[kind] = {"count": 0, "examples": []}
        entry["count"] += 1
        if len(entry["examples"]) < ERROR_EXAMPLES:
            entry["examples"].append(key)
    return out


def merge_error_reasons(parts: list[dict[str, dict[str, Any]] | None]) -> dict[str, dict[str, Any]]:
    """Error reasons of all partitions, most frequent first."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for kind, entry in (part or {}).items():
            merged = out.setdefault(kind, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:ERROR_EXAMPLES]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))
