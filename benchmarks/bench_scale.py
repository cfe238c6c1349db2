"""Benchmark: memory stays flat as inputs grow (partitions stream through, nothing piles up).

    python benchmarks/bench_scale.py

- `run` with a tiny open_clip model over 20 and over 200 generated shards: throughput and peak
  memory (RSS of the whole process tree, sampled every 20 ms). Target: 10x the shards costs
  <= 1.3x the peak.
- `score` over one 250k-row and one 1M-row Parquet file: peak memory follows the partition
  size, not the input size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import make_shards, peak_rss, random_predictor, tiny_clip
import pyarrow as pa
import pyarrow.parquet as pq


def make_embeddings(path: Path, rows: int) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32()))])) as writer:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            x = rng.standard_normal((n, 768), dtype=np.float32)
            offsets = pa.array(np.arange(0, n * 768 + 1, 768, dtype=np.int32))
            writer.write_table(pa.table({"key": [str(start + j) for j in range(n)],
                                         "embedding": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "aesthetic-dask-bench")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-scale-"))
    config, ckpt = tiny_clip(work, image_size=64, layers=2, width=64, patch=16)
    weights = random_predictor(work)
    all_shards = make_shards(args.data / f"scale-{args.shards}x{args.per_shard}", args.shards, args.per_shard)
    small = max(1, args.shards // 10)

    def run_cmd(inputs: list[Path], out: str) -> list[str]:
        return [sys.executable, "-m", "aesthetic_dask", "run", *map(str, inputs), "-o", str(work / out), "--overwrite",
                "--clip-model-config", str(config), "--clip-pretrained", str(ckpt), "--aesthetic-weights", str(weights),
                "--threshold", "0", "--model-dir", str(work / "models")]

    print(f"`run`, tiny CLIP (64px), {args.per_shard} photos per shard:")
    t_small, m_small = peak_rss(run_cmd(all_shards[:small], "small"))
    t_big, m_big = peak_rss(run_cmd(all_shards, "big"))
    print(f"  {small:>4} shards: {t_small:6.1f}s  {small * args.per_shard / t_small:7.1f} img/s  peak {m_small:7.0f} MiB")
    print(f"  {len(all_shards):>4} shards: {t_big:6.1f}s  {len(all_shards) * args.per_shard / t_big:7.1f} img/s  peak {m_big:7.0f} MiB")
    print(f"  PEAK RATIO {len(all_shards) // small}x shards = {m_big / m_small:.2f}x peak  (target <= 1.3)")

    print("`score`, one Parquet file, partitions of 131072 rows:")
    results = []
    for rows in (250_000, 1_000_000):
        path = make_embeddings(args.data / f"scale-one-file-{rows}.parquet", rows)
        cmd = [sys.executable, "-m", "aesthetic_dask", "score", str(path), "-o", str(work / f"score-{rows}"), "--overwrite",
               "--aesthetic-weights", str(weights), "--model-dir", str(work / "models")]
        t, m = peak_rss(cmd)
        results.append(m)
        print(f"  {rows:>9,} rows ({path.stat().st_size / 2**20:6.0f} MiB): {t:6.1f}s  {rows / t:9,.0f} rows/s  peak {m:6.0f} MiB")
    print(f"  PEAK RATIO 4x rows = {results[1] / results[0]:.2f}x peak")


if __name__ == "__main__":
    main()
