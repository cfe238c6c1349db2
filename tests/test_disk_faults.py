"""OUT's disk fails mid-run (issue 19): full (ENOSPC) or read-only. The partitions hit are failed
with the reason, never marked done, never a partial file in kept/; the job ends with one line
naming the cause; a re-run once the disk is fine equals a clean run. Real filesystems: a small
tmpfs mounted by the test (skipped where mounting is not permitted)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_embeddings


def mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MiB tmpfs (remountable larger), unmounted afterwards."""
    point = tmp_path / "disk"
    point.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(point)):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point / "out" / "_tmp")], capture_output=True)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def job(tmp_path, rng, tiny_weights):
    """A `score` job of 8 partitions, each writing ~0.9 MB (embeddings kept), and its clean run."""
    for i in range(8):
        write_embeddings(tmp_path / "emb" / f"part-{i}.parquet", rng.standard_normal((300, 768)).astype(np.float32), f"f{i}-")
    argv = [sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path / "emb"), "--aesthetic-weights",
            str(tiny_weights["safetensors"]), "--threshold", "0", "--keep-embeddings", "--no-report",
            "--n-workers", "1", "--threads-per-worker", "1"]
    clean = subprocess.run([*argv, "-o", str(tmp_path / "clean")], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    return argv, tmp_path / "clean"


def consumer_view(out: Path) -> tuple:
    m = json.loads((out / "manifest.json").read_text())
    kept = pd.read_parquet(out / "kept").sort_values("key").reset_index(drop=True)
    return m["totals"], m["status"], sorted(m["partitions"]["done_names"]), kept


def assert_nothing_partial(out: Path, tmp_cleared: bool = True) -> dict:
    """Every file in kept/ reads whole and belongs to a partition recorded done; no record without
    its file; nothing left in _tmp (unless the test hid it under a mount)."""
    m = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    records = {p.stem for p in (out / "_parts").glob("*.json")}
    kept = {p.stem for p in (out / "kept").glob("*.parquet")}
    for p in (out / "kept").glob("*.parquet"):
        pd.read_parquet(p)
    assert kept <= records | (set(m["partitions"]["done_names"]) if m else set()) and records <= kept
    if tmp_cleared and (out / "_tmp").exists():
        assert not list((out / "_tmp").glob("*"))
    return m


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("aesthetic-dask: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr and "Logging error" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_full_disk_fails_the_partitions_it_hits_and_a_rerun_completes(tmpfs, job):
    argv, clean = job
    out = tmpfs / "out"
    full = subprocess.run([*argv, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert full.returncode in (1, 3), full.stderr
    assert "No space left on device" in (one_error_line(full.stderr) if full.returncode == 1 else full.stderr)
    m = assert_nothing_partial(out)
    if full.returncode == 3:  # the final manifest fitted: it says which partitions failed, and why
        assert m["status"] == "partial" and m["partitions"]["failed"] >= 1
        assert any("No space left on device" in r for v in m["inputs"].values() for r in v.get("failures", []))
    assert len(list((out / "_parts").glob("*.json"))) < 8
    assert mount("-o", "remount,size=64m", str(tmpfs))  # space freed
    rerun = subprocess.run([*argv, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got, want = consumer_view(out), consumer_view(clean)
    assert got[:3] == want[:3]
    pd.testing.assert_frame_equal(got[3], want[3])


def test_a_read_only_out_mid_run_fails_the_partitions_it_hits_and_a_rerun_completes(tmpfs, job):
    argv, clean = job
    assert mount("-o", "remount,size=64m", str(tmpfs))
    out = tmpfs / "out"
    proc = subprocess.Popen([*argv, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_parts").glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    # OUT turns read-only under the running job: a read-only filesystem mounted over OUT/_tmp,
    # where every file the job writes starts (a mount over all of OUT is refused while job.log is open).
    assert mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out / "_tmp")), "could not mount over _tmp/"
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (1, 3), stderr
    assert "Read-only file system" in (one_error_line(stderr) if proc.returncode == 1 else stderr)
    subprocess.run(["umount", str(out / "_tmp")], check=True)  # writable again
    m = assert_nothing_partial(out, tmp_cleared=False)  # what the mount hid is the next run's to clear
    if proc.returncode == 3:  # the final manifest was written: it says which partitions failed, and why
        assert m["status"] == "partial" and m["partitions"]["failed"] >= 1
        reasons = [r for v in m["inputs"].values() for r in v.get("failures", [])]
        assert reasons and all("Read-only file system" in r for r in reasons), reasons
    assert len(list((out / "_parts").glob("*.json"))) < 8
    rerun = subprocess.run([*argv, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got, want = consumer_view(out), consumer_view(clean)
    assert got[:3] == want[:3]
    pd.testing.assert_frame_equal(got[3], want[3])


def test_a_refilter_that_fills_the_disk_is_finished_by_running_it_again(tmpfs, job, tmp_path):
    """Issue 29, a real ENOSPC: refilter stops with one line when OUT's disk fills part way; once
    there is room, the same command finishes it, equal to a clean run at that threshold."""
    argv, _ = job
    assert mount("-o", "remount,size=64m", str(tmpfs))
    out = tmpfs / "out"
    assert subprocess.run([*argv, "-o", str(out)], capture_output=True, timeout=300).returncode == 0
    clean = tmp_path / "clean-5.3"
    threshold = [*argv[:argv.index("--threshold") + 1], "5.3", *argv[argv.index("--threshold") + 2:]]
    assert subprocess.run([*threshold, "-o", str(clean)], capture_output=True, timeout=300).returncode == 0
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * (free - 1_200_000))  # room for about one new file
    refilter = [sys.executable, "-m", "aesthetic_dask", "refilter", str(out), "--threshold", "5.3", "--no-report"]
    full = subprocess.run(refilter, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1 and "No space left on device" in one_error_line(full.stderr)
    assert json.loads((out / "manifest.json").read_text())["status"] == "refiltering"
    (tmpfs / "filler").unlink()
    again = subprocess.run(refilter, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    got, want = consumer_view(out), consumer_view(clean)
    assert got[:3] == want[:3]
    pd.testing.assert_frame_equal(got[3], want[3])
