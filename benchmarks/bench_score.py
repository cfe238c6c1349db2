"""Benchmark: the whole `aesthetic-dask score` command against merely reading the embeddings.

    python benchmarks/bench_score.py            # 500k float32 embeddings in 4 files, 5 rounds

Every side runs as a whole fresh process (imports, cluster start and all), alternated round by
round on the same files (page cache warm after a first unmeasured round of each); the best of
the rounds are compared (medians printed too): the ratio is what to read, not the seconds. A
third side runs the command without the report and its samples, to give their cost. Also measured in the same run: a NeMo Curator-style scoring loop (torch MLP in
batches of 32 and 1024 over L2-normalised embeddings, as its AestheticScorer runs it, objects
already built) for a throughput comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import REAL_WEIGHTS, random_predictor


BASELINE = """
import sys, pyarrow.parquet as pq
rows = 0
for path in sys.argv[1:]:
    col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    matrix = col.flatten().to_numpy().reshape(-1, 768)
    rows += matrix.shape[0]
print(rows)
"""


def make_data(directory: Path, rows: int, files: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"emb_{i:02d}.parquet" for i in range(files)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(0)
    per_file = rows // files
    for i, path in enumerate(paths):
        x = rng.standard_normal((per_file, 768), dtype=np.float32)
        offsets = pa.array(np.arange(0, per_file * 768 + 1, 768, dtype=np.int32))
        table = pa.table({
            "key": [f"{i:03d}{j:09d}" for j in range(per_file)],
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1))),
        })
        pq.write_table(table, path, row_group_size=32768)
    return paths


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def nemo_style_throughput(paths: list[Path], weights: Path, batch: int, rows: int = 100_000) -> float:
    """Embeddings/s of a torch MLP loop like NeMo Curator's AestheticScorer (CPU, objects built)."""
    import torch

    from aesthetic_dask.models.checkpoint import load_state_dict
    from aesthetic_dask.models.fetch import resolve_weights

    resolved = resolve_weights(str(weights), Path(tempfile.gettempdir()))
    state = load_state_dict(resolved.path, resolved.sha256, resolved.spec, None)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    mlp.load_state_dict({k.removeprefix("layers."): torch.from_numpy(v) for k, v in state.items()})
    mlp.eval()
    col = pq.read_table(paths[0], columns=["embedding"]).column("embedding").combine_chunks()
    emb = col.flatten().to_numpy().reshape(-1, 768)[:rows]
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(emb), batch):
            x = torch.from_numpy(emb[start : start + batch].copy())
            x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            mlp(x).squeeze(1).numpy()
    return len(emb) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "aesthetic-dask-bench")
    parser.add_argument("--weights", type=Path, default=REAL_WEIGHTS if REAL_WEIGHTS.exists() else None)
    args = parser.parse_args()

    data = args.data / f"score-{args.rows}x{args.files}"
    paths = make_data(data, args.rows, args.files)
    work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-"))
    weights = args.weights or random_predictor(work)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    baseline = [sys.executable, "-c", BASELINE, *map(str, paths)]
    score = [sys.executable, "-m", "aesthetic_dask", "score", str(data), "-o", str(work / "out"), "--aesthetic-weights",
             str(weights), "--model-dir", str(work / "models"), "--threshold", "0", "--overwrite"]

    configs = {}
    for name, text in (("no-report", "report: false\n"), ("nothing", "report: false\nreport_samples: false\n")):
        (work / f"{name}.yaml").write_text(text)
        configs[name] = score + ["--config", str(work / f"{name}.yaml")]
    sides = {"read embeddings into numpy (pyarrow)": baseline, "aesthetic-dask score (whole command)": score,
             "  ... without the report page": configs["no-report"],
             "  ... without the page and samples": configs["nothing"]}

    print(f"{rows:,} float32 embeddings in {len(paths)} files; weights {weights.name}; {os.cpu_count()} cores")
    for cmd in sides.values():
        timed(cmd)  # warm: page cache, .pyc, converted weights
    times: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(args.rounds):
        for label, cmd in sides.items():
            times[label].append(timed(cmd))
    for label, ts in times.items():
        print(f"{label:<38} best {min(ts):6.2f}s  median {statistics.median(ts):6.2f}s  runs {', '.join(f'{t:.2f}' for t in ts)}")
    b, s, page, bare = (min(ts) for ts in times.values())
    print(f"RATIO score / read = {s / b:.2f} best of {args.rounds}; without the report page {page / b:.2f}; "
          f"bare {bare / b:.2f}  (target <= 1.3)")
    print(f"samples cost {(page - bare) / page * 100:+.1f}% of the job; the report page {(s - page) / s * 100:+.1f}% "
          f"(a fixed cost per job, not per row)")
    scores = np.random.default_rng(0).normal(5.5, 0.5, rows).astype(np.float32)
    t0 = time.perf_counter()
    from aesthetic_dask.histogram import histogram_counts

    histogram_counts(scores)
    print(f"histogram of {rows:,} scores: {time.perf_counter() - t0:.4f}s = {(time.perf_counter() - t0) / s * 100:.2f}% of the job")
    ours = rows / s
    for batch in (32, 1024):
        nemo = nemo_style_throughput(paths, weights, batch)
        print(f"NeMo-style torch MLP loop, batch {batch:>4}: {nemo:>10,.0f} emb/s (model only)  "
              f"| aesthetic-dask end to end {ours:,.0f} emb/s  RATIO {ours / nemo:.1f}x")


if __name__ == "__main__":
    main()
