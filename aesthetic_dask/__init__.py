"""aesthetic-dask: filter image datasets by predicted aesthetic quality, on Dask.

Notebook API (lazy Dask frames)::

    import aesthetic_dask as ad
    cfg = ad.load_config(threshold=5.0)
    ddf = ad.read_embeddings("laion/embeddings/", embedding_column="embedding")
    scored = ad.score_embeddings(ddf, cfg)
    ad.score_histogram(scored)             # exact histogram, bins of 0.05 (small pandas frame)
    good = ad.filter_by_score(scored, cfg.score_threshold, cfg.filters)
    ad.write_report("out/")                # OUT/report.html of a finished job
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names and the modules that define them; imported on first use so that the CLI and
# `import aesthetic_dask` stay fast.
_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "read_embeddings": "sources.readers",
    "score_embeddings": "score",
    "filter_by_score": "filters",
    "score_partition": "score",
    "read_webdataset": "sources.readers",
    "read_image_parquet": "sources.readers",
    "embed_images": "embed",
    "AestheticPredictor": "models.heads",
    "load_predictor": "models.load",
    "REGISTRY": "models.registry",
    "score_histogram": "histogram",
    "write_report": "report",
    "refilter": "refilter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aesthetic_dask' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
