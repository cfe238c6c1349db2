"""What every Parquet file a job writes says of where its scores came from, as key-value metadata.

One key, :data:`KEY` (``aesthetic_dask``), holding JSON: the head (name and sha256, and the extra
heads'), the CLIP model and pretrained tag (and whether it was the demo CLIP, whose scores mean
nothing), the threshold the rows were split at, and the run that wrote the file. Rows copied out
of OUT keep it with the file: ``pq.read_schema(path).metadata[b"aesthetic_dask"]``, or
:func:`read`. ``refilter`` rewrites it with its threshold and run.
"""

from __future__ import annotations

import json
from typing import Any

KEY = b"aesthetic_dask"


def describe(job_kind: str, heads: Any, threshold: float, run_id: str, clip: dict[str, Any] | None,
             version: str | None, filters: Any = ()) -> dict[str, Any]:
    """The provenance of a job's files (``clip``: the manifest's record of the CLIP; None for
    ``score``, whose embeddings were made elsewhere; ``version``: this package's, as the manifest
    records it; ``filters``: the ``--filter`` criteria, also part of the split)."""
    return {
        "job": job_kind,
        "head": {"name": heads.weights["name"], "sha256": heads.weights["sha256"]},
        "extra_heads": {column: {"name": info["name"], "sha256": info["sha256"]}
                        for column, info in heads.extra_info.items()},
        "clip": None if clip is None else {"model": clip["model"], "pretrained": clip["pretrained"],
                                           "demo": bool(clip.get("demo"))},
        "score_threshold": threshold,
        **({"filters": [str(c) for c in filters]} if filters else {}),
        "run_id": run_id,
        "aesthetic_dask": version,
    }


def metadata(info: dict[str, Any]) -> tuple[tuple[bytes, bytes], ...]:
    """``info`` as the files' key-value metadata (a hashable value for :class:`output.WriteOptions`)."""
    return ((KEY, json.dumps(info, sort_keys=True).encode()),)


def restamped(schema_metadata: dict[bytes, bytes] | None, threshold: float, run_id: str) -> dict[bytes, bytes]:
    """A file's metadata with the threshold and run of a refilter that re-split it."""
    out = dict(schema_metadata or {})
    info = json.loads(out[KEY]) if KEY in out else {}
    info.update(score_threshold=threshold, run_id=run_id)
    out[KEY] = json.dumps(info, sort_keys=True).encode()
    return out


def read(path: str, filesystem: Any = None) -> dict[str, Any] | None:
    """The provenance of a Parquet file written by a job, or None."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path, filesystem=filesystem).metadata or {}
    return json.loads(meta[KEY]) if KEY in meta else None
