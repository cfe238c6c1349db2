"""Benchmark: `aesthetic-dask score` from S3 against a plain s3fs read of the same objects.

    python benchmarks/bench_s3.py            # 200k float32 embeddings in 4 files on moto's S3 server

A real S3 API (moto's server on 127.0.0.1) serves the files. Both sides run as whole fresh
processes, alternated round by round; the best of the rounds are compared. The job should be
bound by the bytes it reads: read the RATIO (job time / plain read time) and the MB/s, not the
seconds (moto is much slower than S3 itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REAL_WEIGHTS, random_predictor
from bench_score import make_data

PLAIN_READ = """
import json, sys, s3fs
fs = s3fs.S3FileSystem(**json.loads(sys.argv[1]))
print(sum(len(fs.cat_file(p)) for p in fs.find(sys.argv[2])))
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        data = Path(tempfile.gettempdir()) / "aesthetic-dask-bench" / f"score-{args.rows}x{args.files}"
        paths = make_data(data, args.rows, args.files)
        fs.put(str(data), "bench/emb", recursive=True)
        size = sum(fs.info(p)["size"] for p in fs.find("bench/emb"))
        work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-s3-"))
        weights = REAL_WEIGHTS if REAL_WEIGHTS.exists() else random_predictor(work)
        plain = [sys.executable, "-c", PLAIN_READ, json.dumps(options), "bench/emb"]
        job = [sys.executable, "-m", "aesthetic_dask", "score", "s3://bench/emb", "-o", str(work / "out"), "--aesthetic-weights",
               str(weights), "--model-dir", str(work / "models"), "--threshold", "0", "--overwrite", "--storage-options",
               json.dumps(options)]
        print(f"{args.rows:,} float32 embeddings, {size / 2**20:.0f} MiB in {len(paths)} objects on moto's S3 server")
        timed(plain), timed(job)
        plain_t, job_t = [], []
        for _ in range(args.rounds):
            plain_t.append(timed(plain))
            job_t.append(timed(job))
        for label, times in (("plain s3fs read of the objects", plain_t), ("aesthetic-dask score s3:// -> local", job_t)):
            best = min(times)
            print(f"{label:<36} best {best:6.2f}s ({size / 2**20 / best:6.0f} MiB/s)  median {statistics.median(times):6.2f}s")
        print(f"RATIO job / plain read = {min(job_t) / min(plain_t):.2f} (best of {args.rounds}); "
              f"{args.rows / min(job_t):,.0f} embeddings/s from S3")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
