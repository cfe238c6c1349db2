"""Production runs: kill and resume, a real loopback cluster losing a worker, scheduled entry point."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import photo_bytes, write_shard

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    photos = [photo_bytes(n) for n in PHOTOS]
    for s in range(12):
        members = []
        for i in range(24):
            key = f"{s:03d}{i:05d}"
            members += [(f"{key}.jpg", photos[(s + i) % len(photos)]), (f"{key}.txt", f"photo {key}".encode())]
        if s == 5:
            members.append((f"{s:03d}99999.jpg", b"not an image"))
        write_shard(d / "shards" / f"shard-{s:05d}.tar", members)
    return d / "shards"


def run_argv(shards, out, tiny_clip, tiny_weights, *extra):
    return [sys.executable, "-m", "aesthetic_dask", "run", str(shards), "-o", str(out), "--threshold", "5.43",
            "--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(out.parent / "models"),
            "--keep-rejected", *map(str, extra)]


def snapshot(out: Path) -> dict:
    """What a consumer sees: every row of kept/rejected/errors, and the manifest's counts."""
    m = json.loads((out / "manifest.json").read_text())
    tables = {}
    for d in ("kept", "rejected", "errors"):
        if (out / d).exists():
            df = pd.read_parquet(out / d)
            tables[d] = df.sort_values(list(df.columns[:2])).reset_index(drop=True)
    return {"tables": tables, "totals": m["totals"], "inputs": m["inputs"], "done": sorted(m["partitions"]["done_names"]), "status": m["status"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["totals"] == b["totals"] and a["inputs"] == b["inputs"] and a["done"] == b["done"] and a["status"] == b["status"]
    assert a["tables"].keys() == b["tables"].keys()
    for name in a["tables"]:
        pd.testing.assert_frame_equal(a["tables"][name], b["tables"][name])


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(list((out / "_parts").glob("*.json"))) if (out / "_parts").exists() else 0
        if done >= n or proc.poll() is not None:
            return done
        time.sleep(0.02)
    raise TimeoutError(f"no {n} finished partitions in {timeout}s")


def test_sigkill_mid_run_then_rerun_gives_the_clean_output(tmp_path, many_shards, tiny_clip, tiny_weights):
    clean = tmp_path / "clean"
    assert subprocess.run(run_argv(many_shards, clean, tiny_clip, tiny_weights), capture_output=True, timeout=300).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(run_argv(many_shards, out, tiny_clip, tiny_weights, "--threads-per-worker", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert done < 12, "the job finished before it could be killed"
    # Whatever was left is never a partial file: every Parquet file in place reads whole.
    for f in (out / "kept").glob("*.parquet"):
        pd.read_parquet(f)
    rerun = subprocess.run(run_argv(many_shards, out, tiny_clip, tiny_weights), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same(snapshot(out), snapshot(clean))
    assert not (out / "_tmp").exists()
    assert sorted(p.name for p in (out / "kept").iterdir()) == sorted(p.name for p in (clean / "kept").iterdir())


@pytest.fixture
def loopback_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1; always torn down."""
    from conftest import loopback_dask

    with loopback_dask(tmp_path, workers=2) as (scheduler_file, _, workers):
        yield scheduler_file, workers


def test_job_on_a_real_cluster_survives_a_killed_worker(tmp_path, many_shards, tiny_clip, tiny_weights, loopback_cluster):
    scheduler_file, workers = loopback_cluster
    local = tmp_path / "local"
    assert subprocess.run(run_argv(many_shards, local, tiny_clip, tiny_weights), capture_output=True, timeout=300).returncode == 0

    out = tmp_path / "cluster"
    proc = subprocess.Popen(run_argv(many_shards, out, tiny_clip, tiny_weights, "--scheduler-file", scheduler_file),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = wait_for_records(out, 1, proc)
    assert done < 12, "the job finished before a worker could be killed"
    os.killpg(workers[0].pid, signal.SIGKILL)  # the worker and its nanny, mid-run
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert_same(snapshot(out), snapshot(local))
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
        assert len(client.scheduler_info()["workers"]) == 1  # the job neither starts nor stops workers


def test_scheduled_entry_point_reads_conf_and_the_environment(tmp_path, tiny_weights, rng, loopback_cluster):
    import yaml

    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import scheduled
    finally:
        sys.path.pop(0)
    from conftest import write_embeddings

    scheduler_file, _ = loopback_cluster
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((50, 768)).astype("float32"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"job": "score", "inputs": [str(tmp_path / "in")], "output": str(tmp_path / "out"),
                                    "score_threshold": 5.0, "aesthetic_weights": str(tiny_weights["safetensors"])}))
    argv = scheduled.build_argv(str(spec), str(tmp_path / "options.yaml"))
    assert argv[:4] == ["score", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    assert yaml.safe_load((tmp_path / "options.yaml").read_text())["score_threshold"] == 5.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SCHEDULER")}
    local = subprocess.run([sys.executable, str(REPO / "jobs" / "scheduled.py"), str(spec)], capture_output=True, text=True,
                           timeout=120, env=env)
    assert local.returncode == 0, local.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["totals"]["rows_in"] == 50 and m["cluster"]["scheduler_address"].startswith("inproc://")
    assert not (tmp_path / "out" / "scheduled-config.yaml").exists()
    # Dask's own variable: the job runs on that cluster (the CLI honours it, not only jobs/).
    address = json.loads(scheduler_file.read_text())["address"]
    remote = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path / "in"), "-o", str(tmp_path / "remote"),
                             "--aesthetic-weights", str(tiny_weights["safetensors"])], capture_output=True, text=True,
                            timeout=120, env=env | {"DASK_SCHEDULER_ADDRESS": address})
    assert remote.returncode == 0, remote.stderr
    m = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert m["cluster"]["scheduler_address"] == address and m["cluster"]["workers"] == 2


def test_score_job_through_a_scheduler_address(tmp_path, tiny_weights, loopback_cluster, rng):
    from conftest import write_embeddings

    scheduler_file, _ = loopback_cluster
    address = json.loads(scheduler_file.read_text())["address"]
    for i in range(3):
        write_embeddings(tmp_path / "in" / f"{i}.parquet", rng.standard_normal((40, 768)).astype("float32"), f"f{i}-")
    common = [str(tmp_path / "in"), "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "5.43", "--keep-rejected"]
    local = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", *common, "-o", str(tmp_path / "local")], capture_output=True, timeout=120)
    remote = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", *common, "-o", str(tmp_path / "remote"), "--scheduler", address],
                            capture_output=True, text=True, timeout=120)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert_same(snapshot(tmp_path / "remote"), snapshot(tmp_path / "local"))
