"""Benchmark: no hostile input costs far more than a normal input of the same count.

    python benchmarks/bench_hostile.py [--repeats 3]

Each case is one whole CLI process (`python -m aesthetic_dask ...`, its local cluster and decode
pool included), run on a crafted input and on a normal one of the same count, side by side;
time and peak RSS (the process tree, sampled every 20 ms) are the best of ``--repeats``. The
`run` cases use the demo CLIP (`--demo-clip`: a real 224-pixel open_clip ViT with random
weights, so the real preprocessing runs) and random predictor weights. Target: each ratio <= 1.5.

- 1x16000 PNGs (~100 bytes each; a plain shortest-side resize is 224 x 3.6M pixels) vs photo PNGs
- GNU sparse members: small PNGs with 250 MB holes each vs the same PNGs as plain members
- 16 MiB PAX member names in a .tar.gz (skipped unread past 4 MiB) vs the same samples with short names
- a .tar.gz of 200 MiB zero-filled images (1.6 MB in all) vs the same count of small PNGs
- PNGs with a zTXt chunk after the pixels inflating to 64 MiB vs the same PNGs without it
- a YAML alias bomb as the config (9 levels, < 1 KB) vs a plain config, `score` on 300 rows
- 5,000-column Parquet vs 5 columns, 300 rows of embeddings, `score`
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import REPO, PHOTOS, peak_rss, random_predictor

sys.path.insert(0, str(REPO / "tests"))
from crafted import extreme_aspect_png, gnu_sparse_member, tar_bytes, yaml_alias_bomb, ztxt_bomb  # noqa: E402

SAMPLES = 8  # images per shard in the `run` cases
ROWS = 300  # rows in the `score` cases
TARGET = 1.5


@dataclass
class Case:
    """One hostile input against a normal one of the same count, through the same command."""

    name: str
    job: str  # run or score
    normal: list[str]  # the input arguments
    hostile: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)  # per side: more arguments
    codes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per side: expected exit codes


def png(name: str, size: int | None = None) -> bytes:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    if size:
        image = image.resize((size, size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], gzipped: bool = False) -> str:
    data = tar_bytes(members)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return str(path)


def sparse_tar(path: Path, members: list[tuple[str, bytes]], holes: int) -> str:
    """A tar of old-GNU sparse members: each stores its bytes, then ``holes`` bytes of holes."""
    path.write_bytes(b"".join(gnu_sparse_member(name, blob, len(blob) + holes) for name, blob in members) + b"\0" * 1024)
    return str(path)


def embeddings_parquet(path: Path, extra_columns: int) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 768), dtype=np.float32)
    columns = {"key": [f"k{i}" for i in range(ROWS)],
               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 768)}
    columns |= {f"c{j:04d}": pa.array(np.full(ROWS, j, np.int32)) for j in range(extra_columns)}
    pq.write_table(pa.table(columns), path)
    return str(path)


def build_cases(d: Path) -> list[Case]:
    d.mkdir(parents=True, exist_ok=True)
    photos = [png(PHOTOS[i % len(PHOTOS)]) for i in range(SAMPLES)]
    small = [png(PHOTOS[i % len(PHOTOS)], 64) for i in range(SAMPLES)]
    names = [f"{i:05d}.png" for i in range(SAMPLES)]
    long_names = [f"{i:05d}" + "a" * (16 << 20) + ".png" for i in range(SAMPLES)]
    configs = d / "plain.yaml", d / "bomb.yaml"
    configs[0].write_text("score_threshold: 5.0\nstorage_options: {}\n")
    configs[1].write_text("score_threshold: 5.0\n" + yaml_alias_bomb(9))
    score_input = embeddings_parquet(d / "rows.parquet", 5)
    return [
        Case("1x16000 PNGs", "run", [write_tar(d / "photos.tar", list(zip(names, photos)))],
             [write_tar(d / "aspect.tar", [(n, extreme_aspect_png(16000)) for n in names])]),
        Case("sparse members, 250 MB holes", "run", [write_tar(d / "small.tar", list(zip(names, small)))],
             [sparse_tar(d / "sparse.tar", list(zip(names, small)), 250 << 20)]),
        Case("16 MiB PAX names, .tar.gz", "run", [write_tar(d / "short.tar.gz", list(zip(names, small)), gzipped=True)],
             [write_tar(d / "pax.tar.gz", list(zip(long_names, small)), gzipped=True)]),
        Case("200 MiB zero images, .tar.gz", "run", [write_tar(d / "small.tar.gz", list(zip(names, small)), gzipped=True)],
             [write_tar(d / "zeros.tar.gz", [(n, bytes(200 << 20)) for n in names], gzipped=True)],
             codes={"hostile": (3,)}),  # the shard stops once its bombs inflated 256 MiB: a failed partition
        Case("zTXt bomb after the pixels", "run", [write_tar(d / "plain-png.tar", list(zip(names, photos)))],
             [write_tar(d / "ztxt.tar", [(n, ztxt_bomb(p, 64 << 20)) for n, p in zip(names, photos)])]),
        Case("YAML alias bomb config", "score", [score_input], [score_input],
             extra={"normal": ["--config", str(configs[0])], "hostile": ["--config", str(configs[1])]},
             codes={"hostile": (2,)}),
        Case("5,000-column Parquet", "score", [score_input], [embeddings_parquet(d / "wide.parquet", 5000)]),
    ]


def command(case: Case, side: str, out: Path, models: Path, weights: Path) -> list[str]:
    cmd = [sys.executable, "-m", "aesthetic_dask", case.job, *getattr(case, side), "-o", str(out), "--overwrite",
           "--aesthetic-weights", str(weights), "--model-dir", str(models), *case.extra.get(side, [])]
    if case.job == "run":
        cmd += ["--demo-clip", "--threshold", "0"]
    return cmd


def accounted(out: Path) -> str:
    """rows in / kept / errors from the manifest, or why there is none."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return "refused (no OUT written)"
    t = json.loads(manifest.read_text())["totals"]
    return f"{t['rows_in']} in, {t['rows_kept']} kept, {t['rows_below_threshold']} below, {t['rows_error']} errors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is shown")
    args = parser.parse_args()
    from aesthetic_dask.models.demo import demo_clip_files

    work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-hostile-"))
    models, weights = work / "models", random_predictor(work)
    demo_clip_files(models)  # built once, before anything is timed
    cases = build_cases(work / "inputs")
    print(f"{'case':<30} {'normal s':>8} {'hostile s':>9} {'time x':>6} {'normal MiB':>10} {'hostile MiB':>11} "
          f"{'peak x':>6}  accounted (hostile)")
    worst = 0.0
    for case in cases:
        best = {}
        for side in ("normal", "hostile"):
            out = work / "out" / f"{case.name.split()[0]}-{side}"
            runs = [peak_rss(command(case, side, out, models, weights), case.codes.get(side, (0,)))
                    for _ in range(args.repeats)]
            best[side] = (min(r[0] for r in runs), min(r[1] for r in runs), accounted(out))
        (tn, mn, _), (th, mh, said) = best["normal"], best["hostile"]
        worst = max(worst, th / tn, mh / mn)
        print(f"{case.name:<30} {tn:8.2f} {th:9.2f} {th / tn:6.2f} {mn:10.0f} {mh:11.0f} {mh / mn:6.2f}  {said}")
    print(f"WORST RATIO {worst:.2f} (target <= {TARGET}): {'ok' if worst <= TARGET else 'OVER'}")


if __name__ == "__main__":
    main()
