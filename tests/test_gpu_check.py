"""The device check's dry run (issue 28): `benchmarks/gpu_check.py --quick` runs every step on a CPU
within its deadline and writes every key the device run writes; without heads it stops at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_WEIGHTS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_without_heads_the_check_stops_in_one_line_before_any_device_work(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, AESTHETIC_WEIGHTS=str(tmp_path / "no-heads-here")))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "AESTHETIC_WEIGHTS" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_the_quick_dry_run_writes_every_key_within_its_deadline(tmp_path):
    if not REAL_WEIGHTS.is_file():
        pytest.skip("real weights not present")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import RESULT_KEYS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--deadline", "240", "--results", str(tmp_path / "r"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, AESTHETIC_WEIGHTS=str(REAL_WEIGHTS.parent)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = (tmp_path / "r").glob("*.json")
    r = json.loads(result.read_text())
    assert set(RESULT_KEYS) <= set(r)
    assert r["elapsed_s"] < 240 and r["run"]["exit_code"] == 0 and r["first_batch_after_s"] is not None
    assert 0 <= r["score_max_abs_diff_fp16_vs_fp32"] < 0.05 and r["precision"]["embedding_cosine_min"] > 0.999
    assert r["cuda_graph"] is False and r["launch_cpu_ms_per_image"] > 0  # no graph on a CPU; its launches measured
    assert set(r["errors"]) <= {"scores_cupy_vs_numpy"}  # the one step that needs cupy on a device
    assert proc.stdout.strip().splitlines()[-1].split("] ", 1)[1] == r["summary"]
