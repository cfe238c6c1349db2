"""Quick start: both jobs on small samples, each on a local Dask cluster (the embedded default).

    .venv/bin/python jobs/quickstart.py [OUT]

1. `aesthetic-dask run` (the main job) on demo/shards/: 2 WebDataset shards of scikit-image's
   sample photos with captions, through CLIP ViT-L/14 (open_clip, `openai` weights downloaded
   into the model cache on first use). Where those weights cannot be had (offline, not cached)
   it runs with `--demo-clip` instead: the same pipeline on a small randomly initialised CLIP,
   labelled a demonstration whose scores mean nothing in this script's output and in the job's
   summary, manifest and report.
2. `aesthetic-dask score` on demo/embeddings/: 20,000 synthetic CLIP-sized embeddings.

Predictor weights: $AESTHETIC_WEIGHTS if set, else the shared copy beside this checkout if
present, else the registry default (downloaded into the model cache on first use).
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


def make_shards(directory: Path) -> None:
    """Two WebDataset shards of the photos scikit-image ships, with captions and JSON sidecars."""
    import io
    import json
    import tarfile

    from PIL import Image
    from skimage import data

    if directory.is_dir() and any(directory.glob("*.tar")):
        return
    directory.mkdir(parents=True, exist_ok=True)
    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina"]
    for s in range(2):
        with tarfile.open(directory / f"shard-{s:05d}.tar", "w") as tar:
            for i, name in enumerate(names[s * 4 : s * 4 + 4]):
                buf = io.BytesIO()
                Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=92)
                key = f"{s:03d}{i:05d}"
                for ext, blob in ((".jpg", buf.getvalue()), (".txt", f"scikit-image sample: {name}".encode()),
                                  (".json", json.dumps({"name": name}).encode())):
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def show(out: Path, columns: list[str], label: str = "") -> None:
    """The five best-scored kept rows (rejected ones too where none was kept)."""
    import pandas as pd

    for part in ("kept", "rejected"):
        files = sorted((out / part).glob("*.parquet"))
        rows = pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame(columns=columns)
        if len(rows) or part == "rejected":
            break
    top = rows.nlargest(5, "aesthetic_score")[columns].to_string(index=False) if len(rows) else "(none)"
    print(f"\n{label}Top of {len(rows):,} {part} rows in {out / part}:\n{top}\n")


def demo_reason() -> str | None:
    """Why the main job must run on the demo CLIP here (the default CLIP weights neither cached nor
    fetchable), or None. One probe of the hub, in seconds; nothing is downloaded."""
    from aesthetic_dask.config import load_config
    from aesthetic_dask.models.clip import ClipSpec, clip_weights_unavailable

    return clip_weights_unavailable(ClipSpec.from_config(load_config()))


def main() -> int:
    """Both jobs; the exit status and the last line say how each went (and whether the main job ran
    on the demo CLIP)."""
    from aesthetic_dask.cli import main as cli

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "out" / "quickstart"
    weights = os.environ.get("AESTHETIC_WEIGHTS") or (str(SHARED) if SHARED.exists() else None)
    weight_args = ["--aesthetic-weights", weights] if weights else []

    shards = REPO / "demo" / "shards"
    make_shards(shards)
    offline = demo_reason()
    label = "DEMO CLIP (random weights; these scores mean nothing). " if offline else ""
    if offline:
        print(f"quickstart: the CLIP ViT-L/14 weights cannot be had here: {offline}. The main job runs on a small "
              "randomly initialised CLIP instead (--demo-clip): a pipeline demonstration whose scores mean nothing. "
              "With the weights (`aesthetic-dask download`, online) it runs the real model.", file=sys.stderr)
    # The demo CLIP's scores sit lower (about 4..5): its threshold keeps some and drops some, to show both.
    run_code = cli(["run", str(shards), "-o", str(out / "run"), "--threshold", "4.5" if offline else "5.0", "--json-fields", "name",
                    "--keep-rejected", "--overwrite", *weight_args, *(["--demo-clip"] if offline else [])])
    if run_code == 0:
        show(out / "run", ["key", "caption", "aesthetic_score"], label)

    demo = REPO / "demo" / "embeddings"
    make_demo(demo)
    score_code = cli(["score", str(demo), "-o", str(out / "score"), "--threshold", "5.0", "--keep-rejected", "--overwrite",
                      *weight_args])
    if score_code == 0:
        show(out / "score", ["key", "caption", "aesthetic_score"])

    outcome = {0: "done", 3: "partial", 1: "failed", 2: "could not start"}
    run_text = outcome.get(run_code, f"exit {run_code}")
    if offline:
        run_text += " on the demo CLIP (offline: a pipeline demonstration, its scores mean nothing)"
    print(f"quickstart: run (the main job): {run_text}; score: {outcome.get(score_code, f'exit {score_code}')}; "
          f"output in {out}", file=sys.stderr)
    return 0 if run_code == 0 and score_code == 0 else max(run_code, score_code, 1)


if __name__ == "__main__":
    raise SystemExit(main())
