"""Benchmark (fault seeds): a refilter stopped anywhere and run again ends as a clean run does.

    python benchmarks/bench_faults.py [--seeds 60] [--kills 20] [--rows 4000]

Builds a `score` OUT (8 files of ``--rows`` embeddings, --keep-rejected, and one without), and clean
OUTs at a higher and a lower threshold. Then:

- ``--seeds`` stops injected at a random write of the refilter (before or after it commits; a kill,
  a full disk (ENOSPC) or Ctrl-C), sometimes twice, then the refilter run to the end;
- ``--kills`` real SIGKILLs of a `python -m aesthetic_dask refilter` process at a random moment of
  its work, then the same command again.

Each finished OUT is compared with the clean one (kept and rejected rows, totals, histogram,
status, no lease or _tmp left). Prints the count that matched per case; the target is all.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from _common import REPO, random_predictor

sys.path.insert(0, str(REPO / "tests"))
from faults import Killed, full_disk, stopped_at_write  # noqa: E402

CLI = [sys.executable, "-m", "aesthetic_dask"]


def score(inp: Path, out: Path, weights: Path, threshold: float, keep_rejected: bool) -> None:
    subprocess.run([*CLI, "score", str(inp), "-o", str(out), "--aesthetic-weights", str(weights), "--threshold",
                    repr(threshold), "--no-report", *(["--keep-rejected"] if keep_rejected else [])],
                   check=True, capture_output=True)


def differs(out: Path, clean: Path, keep_rejected: bool) -> str | None:
    """What differs between ``out`` and the clean OUT, or None."""
    m, c = (json.loads((p / "manifest.json").read_text()) for p in (out, clean))
    for key in ("status", "totals", "score_histogram", "fingerprint"):
        if m[key] != c[key]:
            return f"manifest {key}: {m[key]} != {c[key]}"
    for d in ("kept", "rejected") if keep_rejected else ("kept",):
        a, b = (pd.read_parquet(p / d).sort_values("key").reset_index(drop=True) for p in (out, clean))
        if not a.equals(b):
            return f"{d}/: {len(a)} rows != {len(b)}"
    if (out / "_tmp").exists() or (out / "_lock.json").exists():
        return "_tmp or _lock.json left"
    return None


def refilter_cli(out: Path, threshold: float) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "refilter", str(out), "--threshold", repr(threshold), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=60)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4000)
    args = ap.parse_args()
    from aesthetic_dask.refilter import refilter

    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    try:
        weights, inp = random_predictor(work), work / "in"
        inp.mkdir()
        rng = np.random.default_rng(0)
        for i in range(8):
            emb = rng.standard_normal((args.rows, 768)).astype(np.float32)
            emb[::97] = np.nan  # error rows too
            pq.write_table(pa.table({"key": [f"f{i}-{j}" for j in range(args.rows)],
                                     "embedding": list(emb)}), inp / f"f{i}.parquet")
        probe = work / "probe"
        score(inp, probe, weights, -1e9, True)
        scores = pd.read_parquet(probe / "kept")["aesthetic_score"].to_numpy()
        low, mid, high = (float(np.quantile(scores, q)) for q in (0.25, 0.5, 0.75))
        cases = {"up": (True, mid, high), "down": (True, mid, low), "up-without-rejected": (False, mid, high)}
        built = {}
        for case, (keep_rejected, before, after) in cases.items():
            job, clean = work / f"{case}-job", work / f"{case}-clean"
            score(inp, job, weights, before, keep_rejected)
            score(inp, clean, weights, after, keep_rejected)
            trial = work / "count"
            shutil.copytree(job, trial)
            with stopped_at_write(None, False, Killed()) as writes:
                refilter(str(trial), after, report=False)
            shutil.rmtree(trial)
            t0 = time.perf_counter()
            shutil.copytree(job, trial)
            proc = refilter_cli(trial, after)
            proc.wait()
            built[case] = (job, clean, writes[0], time.perf_counter() - t0)
            shutil.rmtree(trial)
        print(f"{8 * args.rows:,} rows in 8 partitions; thresholds {low:.4f} / {mid:.4f} / {high:.4f}")
        for case, (job, clean, writes, seconds) in built.items():
            keep_rejected, _, threshold = cases[case]
            ok, failures = 0, []
            for seed in range(args.seeds):
                out = work / "out"
                shutil.copytree(job, out)
                pick = random.Random(f"{case}-{seed}")
                for _ in range(pick.choice((1, 2))):
                    with stopped_at_write(pick.randrange(writes), pick.random() < 0.5,
                                          pick.choice((Killed(), full_disk(), KeyboardInterrupt()))):
                        try:
                            refilter(str(out), threshold, report=False)
                        except (Killed, OSError, KeyboardInterrupt):
                            pass
                refilter(str(out), threshold, report=False)
                why = differs(out, clean, keep_rejected)
                ok += why is None
                failures += [f"seed {seed}: {why}"] if why else []
                shutil.rmtree(out)
            killed_ok, kill_failures, mid_work = 0, [], 0
            for seed in range(args.kills):
                out = work / "out"
                shutil.copytree(job, out)
                proc = refilter_cli(out, threshold)
                time.sleep(random.Random(seed).uniform(0.5, seconds))  # imports take the first half second or so
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                mid_work += json.loads((out / "manifest.json").read_text())["status"] == "refiltering"
                again = refilter_cli(out, threshold)
                _, err = again.communicate()
                why = differs(out, clean, keep_rejected) if again.returncode == 0 else f"exit {again.returncode}: {err[-300:]}"
                killed_ok += why is None
                kill_failures += [f"kill {seed}: {why}"] if why else []
                shutil.rmtree(out)
            print(f"{case:<22} {writes} writes, refilter {seconds:.1f}s: injected stops {ok}/{args.seeds} equal a clean "
                  f"run, SIGKILLs {killed_ok}/{args.kills} ({mid_work} of them mid-split)")
            for line in (failures + kill_failures)[:5]:
                print(f"    {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
