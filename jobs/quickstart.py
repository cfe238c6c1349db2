"""Quick start: score a small sample of embeddings on a local Dask cluster (the embedded default).

    .venv/bin/python jobs/quickstart.py [OUT]

Makes demo/embeddings/ (20,000 synthetic CLIP-sized embeddings in 2 Parquet files, with keys
and captions) if it is missing, then runs `aesthetic-dask score` on it with threshold 5.0.
Weights: $AESTHETIC_WEIGHTS if set, else the shared copy beside this checkout if present, else
the registry default (downloaded into the model cache on first use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/models/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


def make_demo(directory: Path, files: int = 2, rows: int = 10_000) -> None:
    if directory.is_dir() and any(directory.glob("*.parquet")):
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Unit-norm directions around a shared mean, roughly like CLIP image embeddings.
    mean = rng.standard_normal(768).astype(np.float32)
    for i in range(files):
        emb = (mean + 2.0 * rng.standard_normal((rows, 768), dtype=np.float32)).astype(np.float32)
        table = pa.table({
            "key": [f"{i:04d}{j:05d}" for j in range(rows)],
            "caption": [f"demo image {i}-{j}" for j in range(rows)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 768),
        })
        pq.write_table(table, directory / f"part-{i:05d}.parquet")


def main() -> int:
    from aesthetic_dask.cli import main as cli

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "out" / "quickstart"
    demo = REPO / "demo" / "embeddings"
    make_demo(demo)
    weights = os.environ.get("AESTHETIC_WEIGHTS") or (str(SHARED) if SHARED.exists() else None)
    args = ["score", str(demo), "-o", str(out), "--threshold", "5.0", "--keep-rejected", "--overwrite"]
    if weights:
        args += ["--aesthetic-weights", weights]
    code = cli(args)
    if code == 0:
        import pandas as pd

        kept = pd.read_parquet(out / "kept")
        print(f"\nTop 5 of {len(kept):,} kept rows:\n{kept.nlargest(5, 'aesthetic_score').to_string(index=False)}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
