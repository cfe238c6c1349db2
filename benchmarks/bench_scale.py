"""Benchmark: cost follows the work (issue 32): memory stays flat as inputs grow, the manifest and
a re-run cost what changed, a huge row group costs what small ones do.

    python benchmarks/bench_scale.py [--only manifest,rerun,rowgroup,fixed,run]

- ``manifest``: a synthetic OUT of 100,000 finished partitions (records as the jobs write them):
  the manifest written while the job runs (running totals) against the full one, and a no-op
  re-run's preparation (one listing, the records from the index) against reading every record.
- ``rerun``: `score` with nothing new over 500 and 5,000 finished files (target: 10x the files
  <= 2.0x the time), and with one new file among 5,000 (target <= 1.5x the no-op).
- ``rowgroup``: peak memory of `score` over 600k rows in one row group against 12 row groups
  (target <= 1.5).
- ``fixed``: `score` of 500k rows with the report on against a plain pyarrow read of the same
  embeddings (target <= 1.3).
- ``run``: `run` with a tiny open_clip model over 20 and 200 generated shards: peak memory
  (RSS of the whole process tree, sampled every 20 ms); target: 10x the shards <= 1.3x the peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
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


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def synthetic_out(root: Path, n: int) -> list:
    """An OUT of ``n`` finished partitions with records as a `score` job writes them; the parts."""
    import numpy as np

    from aesthetic_dask import histogram
    from aesthetic_dask.config import fingerprint
    from aesthetic_dask.parquet_plan import ParquetPart
    from aesthetic_dask.partition import Record

    parts = []
    for d in ("kept", "errors", "_parts"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        part = ParquetPart(f"/data/in/file-{i // 10:06d}.parquet", (i % 10) * 1000, (i % 10 + 1) * 1000,
                             row_groups=(i % 10,), identity=f"size=123456;mtime={i // 10}.0")
        rec = Record.of(part)
        rec.wrote({"files": [f"kept/{part.name}.parquet", f"errors/{part.name}.parquet"], "rows_in": 1000,
                   "rows_kept": 400, "rows_below_threshold": 598, "rows_error": 2,
                   "histogram": histogram.histogram_counts(rng.normal(5, 0.6, 200)), "extra_histograms": {},
                   "error_reasons": {}})
        rec.threshold, rec.job = 5.0, fingerprint({"score_threshold": 5.0})
        (root / "_parts" / f"{part.name}.json").write_text(json.dumps(rec.to_json(), indent=2) + "\n")
        (root / "kept" / f"{part.name}.parquet").touch()
        (root / "errors" / f"{part.name}.parquet").touch()
        parts.append(part)
    return parts


def bench_manifest(work: Path, n: int) -> None:
    from aesthetic_dask.job import Job
    from aesthetic_dask.output import OutputLayout
    from aesthetic_dask.records import index_path, read_records, write_index

    out = work / f"synthetic-{n}"
    t0 = time.perf_counter()
    parts = synthetic_out(out, n)
    print(f"manifest: a synthetic OUT of {n:,} finished partitions (built in {time.perf_counter() - t0:.0f}s)")
    layout = OutputLayout(out)

    def job() -> Job:
        j = Job("score", layout, {"score_threshold": 5.0}, {"config": {}})
        j.run_id = "bench"
        return j

    j = job()
    j.prepare(parts, {p.source for p in parts}, overwrite=False)
    running = best(j.write_running)
    size_running = (out / "manifest.json").stat().st_size
    full = best(lambda: j.write_manifest("running"), 2)
    size_full = (out / "manifest.json").stat().st_size
    j.lock.release()
    print(f"  manifest update while running: {running * 1e3:8.1f} ms ({size_running / 1e3:,.0f} kB)   "
          f"the full manifest: {full * 1e3:8.1f} ms ({size_full / 1e6:,.1f} MB)   RATIO {running / full:.3f}")
    write_index(layout, read_records(layout))

    def noop() -> None:
        k = job()
        todo = k.prepare(parts, {p.source for p in parts}, overwrite=False)
        assert not todo and k.skipped == n, (len(todo), k.skipped)
        k.lock.release()

    with_index = best(noop)
    Path(index_path(layout)).rename(out.parent / "index.aside")
    without = best(noop, 1)
    (out.parent / "index.aside").rename(index_path(layout))
    print(f"  no-op re-run's preparation: from the index {with_index:6.2f}s   reading every record {without:6.2f}s   "
          f"RATIO {with_index / without:.2f}  ({with_index / n * 1e6:.0f} us per finished partition)")


def score_cmd(inputs: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aesthetic_dask", "score", str(inputs), "-o", str(out), "--aesthetic-weights",
            str(weights), "--threshold", "0", "--n-workers", "1", *extra]


def bench_rerun(work: Path, weights: Path) -> None:
    import numpy as np

    print("rerun: `score` re-run with nothing new (best of 3, whole processes, --no-report)")
    times = {}
    rng = np.random.default_rng(0)
    for files in (500, 5000):
        inp = work / f"rerun-in-{files}"
        inp.mkdir()
        emb = rng.standard_normal((20, 768)).astype(np.float32)
        table = pa.table({"key": [f"k{i}" for i in range(20)], "embedding": list(emb)})
        for i in range(files):
            pq.write_table(table, inp / f"f{i:05d}.parquet")
        out = work / f"rerun-out-{files}"
        subprocess.run(score_cmd(inp, out, weights, "--no-report"), check=True, capture_output=True)
        times[files] = best(lambda: subprocess.run(score_cmd(inp, out, weights, "--no-report"), check=True,
                                                   capture_output=True))
        print(f"  {files:>5} finished files: {times[files]:6.2f}s")
    print(f"  RATIO 10x the files = {times[5000] / times[500]:.2f}x the time (target <= 2.0)")
    inp, out = work / "rerun-in-5000", work / "rerun-out-5000"
    new = []

    def one_new() -> None:
        path = inp / f"new-{len(new):03d}.parquet"
        pq.write_table(pa.table({"key": ["n0"], "embedding": [list(np.ones(768, np.float32))]}), path)
        new.append(path)
        subprocess.run(score_cmd(inp, out, weights, "--no-report"), check=True, capture_output=True)

    t_new = best(one_new)
    print(f"  one new file among 5,000: {t_new:6.2f}s   RATIO {t_new / times[5000]:.2f}x the no-op (target <= 1.5)")


def write_row_groups(path: Path, rows: int, groups: int) -> None:
    """``rows`` random embeddings in ``groups`` row groups of equal size."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 768), dtype=np.float32)
    offsets = pa.array(np.arange(0, rows * 768 + 1, 768, dtype=np.int32))
    table = pa.table({"key": [str(i) for i in range(rows)],
                      "embedding": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))})
    pq.write_table(table, path, row_group_size=-(-rows // groups))


def bench_rowgroup(work: Path, weights: Path, rows: int = 600_000) -> None:
    print(f"rowgroup: `score` over {rows:,} rows, peak memory (RSS of the process tree)")
    peaks = {}
    for groups in (1, 12):
        path = work / f"rg-{groups}" / "e.parquet"
        path.parent.mkdir()
        write_row_groups(path, rows, groups)
        t, peaks[groups] = peak_rss(score_cmd(path.parent, work / f"rg-out-{groups}", weights, "--no-report"))
        print(f"  {groups:>2} row group(s): {t:6.1f}s  peak {peaks[groups]:6.0f} MiB")
        path.unlink()
    print(f"  RATIO one row group / 12 = {peaks[1] / peaks[12]:.2f} (target <= 1.5)")


def bench_fixed(work: Path, weights: Path, rows: int = 500_000) -> None:
    path = make_embeddings(work / "fixed" / "e.parquet", rows)
    read = [sys.executable, "-c", "import sys, numpy as np, pyarrow.parquet as pq\n"
            "t = pq.read_table(sys.argv[1])\n"
            "x = t.column('embedding').combine_chunks().flatten().to_numpy().reshape(-1, 768)\n"
            "print(float((x * x).sum()))", str(path)]
    plain = best(lambda: subprocess.run(read, check=True, capture_output=True))
    n = [0]

    def job() -> None:
        n[0] += 1
        subprocess.run(score_cmd(path.parent, work / f"fixed-out-{n[0]}", weights), check=True, capture_output=True)

    scored = best(job)
    print(f"fixed: `score` of {rows:,} rows with the report {scored:6.2f}s   a plain pyarrow read {plain:6.2f}s   "
          f"RATIO {scored / plain:.2f} (target <= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="manifest,rerun,rowgroup,fixed,run")
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "aesthetic-dask-bench")
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-scale-"))
    weights = random_predictor(work)
    if "manifest" in only:
        bench_manifest(work, args.partitions)
    if "rerun" in only:
        bench_rerun(work, weights)
    if "rowgroup" in only:
        bench_rowgroup(work, weights)
    if "fixed" in only:
        bench_fixed(work, weights)
    if "run" in only:
        bench_run(work, weights, args)


def bench_run(work: Path, weights: Path, args: argparse.Namespace) -> None:
    config, ckpt = tiny_clip(work, image_size=64, layers=2, width=64, patch=16)
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
