"""Operating it like a well-behaved Dask tool (issue 13): clear failures, fast offline behaviour, a
light `score` path, Dask's conventions, truthful numbers."""

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aesthetic_dask import __version__
from aesthetic_dask.config import load_config
from aesthetic_dask.models import checkpoint, registry
from aesthetic_dask.cli import main
from conftest import assert_one_clear_line, photo_bytes, run_cli_process, write_embeddings, write_shard

DEFAULT_HEAD = load_config().aesthetic_weights  # conf/default.yaml: the one default


def cli(*argv, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "aesthetic_dask", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def inp(tmp_path, rng):
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((40, 768)).astype(np.float32))
    return tmp_path / "in"


@pytest.fixture
def private_cache(tmp_path):
    """XDG_CACHE_HOME of the command: where a run without a usable OUT logs."""
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scheduler", "localhost"], "--scheduler localhost: not a scheduler address"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler tcp://127.0.0.1:1: no scheduler answered within"),
        (["--scheduler-file", "{tmp}/nope.json"], "--scheduler-file {tmp}/nope.json: no such file"),
        (["--threshold", "nan"], "score_threshold (--threshold) must be a finite number"),
        (["--n-workers", "0"], "n_workers (--n-workers) must be >= 1"),
    ],
)
def test_bad_cluster_and_option_values_are_one_line_exit_2_and_never_hang(tmp_path, inp, tiny_weights, private_cache, extra, message):
    # "Never hangs" is the call's own timeout (a hung client raises TimeoutExpired), not wall-clock time.
    proc = cli("score", inp, "-o", tmp_path / "out", "--aesthetic-weights", tiny_weights["safetensors"],
               *[e.format(tmp=tmp_path) for e in extra], env=private_cache, timeout=45)
    assert_one_clear_line(proc, 2, message.format(tmp=tmp_path))
    # Nothing was done: no OUT holding only a log; the details are in a per-run file in the user's cache.
    assert not (tmp_path / "out").exists()
    if extra[0].startswith("--scheduler"):  # (a bad option value is refused before anything is logged)
        logs = list((tmp_path / "cache" / "aesthetic-dask" / "logs").glob("run-*.log"))
        assert len(logs) == 1 and str(logs[0]) in proc.stderr


def test_output_that_is_a_file_is_bad_usage(tmp_path, inp, tiny_weights, private_cache):
    (tmp_path / "out").write_text("I am a file")
    proc = cli("score", inp, "-o", tmp_path / "out", "--aesthetic-weights", tiny_weights["safetensors"], env=private_cache)
    assert_one_clear_line(proc, 2, f"-o {tmp_path / 'out'}: exists and is not a directory")
    assert not Path("/tmp/aesthetic-dask.log").exists() or "I am a file" not in Path("/tmp/aesthetic-dask.log").read_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"aesthetic-dask {__version__}"


def test_a_cached_verified_head_is_used_offline_without_any_network_wait(tmp_path, inp, tiny_weights, monkeypatch, capsys):
    """Only the safetensors conversion of the pinned sha256 is in model_dir: no download is tried."""
    digest = hashlib.sha256(tiny_weights["pth"].read_bytes()).hexdigest()
    entry = registry.REGISTRY[DEFAULT_HEAD]
    pinned = tuple(dataclasses.replace(s, sha256=digest) if s.sha256 else s for s in entry.sources)
    monkeypatch.setitem(registry.REGISTRY, DEFAULT_HEAD, dataclasses.replace(entry, sources=pinned))
    models = tmp_path / "models"
    checkpoint._write_converted(tiny_weights["state"], checkpoint.converted_path(models, digest))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was tried although a verified copy is cached")

    monkeypatch.setattr("aesthetic_dask.network.reachable", no_network)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    # No wait is possible: any network attempt fails the test (no_network above).
    assert main(["score", str(inp), "-o", str(tmp_path / "out"), "--model-dir", str(models)]) == 0
    assert main(["download", "--model-dir", str(models), "--skip-clip"]) == 0
    assert main(["download", "--model-dir", str(models), "--list"]) == 0
    listing = capsys.readouterr().out
    assert f"{DEFAULT_HEAD}  [cached: " in listing and "ava+logos-l14-reluMSE  [not cached]" in listing


def test_an_unreachable_hub_fails_in_seconds_before_any_task(tmp_path, private_cache):
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee"))])
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused at once
    env = private_cache | {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    # Behaviour, not wall-clock time on a shared machine: each call is bounded by its timeout (a
    # retrying client would hang past it), and neither leaves an OUT behind.
    proc = cli("run", tmp_path / "s.tar", "-o", tmp_path / "out", "--model-dir", tmp_path / "models",
               "--aesthetic-weights", "ava+logos-l14-linearMSE", env=env, timeout=60)
    assert_one_clear_line(proc, 2, "its host is unreachable")
    proc = cli("run", tmp_path / "s.tar", "-o", tmp_path / "out", "--model-dir", tmp_path / "models", env=env, timeout=60)
    assert proc.returncode == 2 and "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_score_job_never_imports_torch(tmp_path, inp, tiny_weights):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['open_clip'] = None\n"
            "from aesthetic_dask.cli import main\n"
            f"raise SystemExit(main(['score', {str(inp)!r}, '-o', {str(tmp_path / 'out')!r}, '--aesthetic-weights', {str(tiny_weights['pth'])!r},"
            f" '--model-dir', {str(tmp_path / 'models')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # a .pth head, read without torch


def test_a_fully_skipped_rerun_reports_truthful_numbers_and_the_dashboard(tmp_path, inp, tiny_weights, capsys):
    conf = tmp_path / "dash.yaml"
    conf.write_text("dashboard: 'true'\n")  # (auto starts it only in a terminal)
    argv = ["score", str(inp), "-o", str(tmp_path / "out"), "--aesthetic-weights", str(tiny_weights["safetensors"]),
            "--config", str(conf)]
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 8787))  # Dask's default dashboard port, taken: no warning may leak
    except OSError:
        pass
    try:
        assert main(argv) == 0
        capsys.readouterr()
        assert main(argv) == 0
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert "nothing processed in this run" in err and "1 planned: 0 run now, 1 skipped (finished before), 0 failed" in err
    assert "rows/s" not in err and "already in use" not in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["this_run"]["partitions_processed"] == 0 and m["this_run"]["rows_processed"] == 0
    link = m["cluster"]["dashboard_link"]
    assert link.startswith("http://") and ":8787/" not in link and m["cluster"]["workers"] == 1
    assert m["cluster"]["threads"] >= 1 and m["cluster"]["scheduler_address"]
    assert f"dashboard: {m['cluster']['dashboard_link']}" in err  # printed when the job starts


def test_without_a_dashboard_no_link_is_reported_and_port_8787_is_left_alone(tmp_path, inp, tiny_weights, capsys):
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 8787))
    except OSError:
        pass
    try:
        assert main(["score", str(inp), "-o", str(tmp_path / "out"), "--aesthetic-weights", str(tiny_weights["safetensors"])]) == 0
    finally:
        busy.close()
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["cluster"]["dashboard_link"] is None and "dashboard: none" in err and "already in use" not in err


def test_verbose_shows_the_jobs_lines_not_distributeds(tmp_path, inp, tiny_weights):
    proc = cli("score", inp, "-o", tmp_path / "out", "--aesthetic-weights", tiny_weights["safetensors"], "-v")
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert any("partition a.parquet-" in line for line in lines)
    assert not [line for line in lines if "distributed." in line], proc.stderr


def test_elapsed_covers_the_whole_command(tmp_path, shards_for_timing, tiny_clip, tiny_weights):
    out = tmp_path / "out"
    t0 = time.time()
    proc = cli("run", shards_for_timing, "-o", out, "--clip-model-config", tiny_clip["config"], "--clip-pretrained",
               tiny_clip["checkpoint"], "--aesthetic-weights", tiny_weights["safetensors"], timeout=120)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    elapsed = m["timings"]["elapsed_s"]
    assert elapsed >= m["timings"]["plan_s"] + m["timings"]["compute_s"] and elapsed <= wall
    assert m["this_run"]["rows_processed"] == 3


@pytest.fixture
def shards_for_timing(tmp_path):
    return write_shard(tmp_path / "s.tar", [(f"{i}.jpg", photo_bytes("coffee")) for i in range(3)])


def test_out_that_is_not_a_jobs_is_never_touched(tmp_path, tiny_weights, rng):
    """Issue 19: `-o mydocs --overwrite` on a user's directory is refused, naming foreign files,
    and leaves it byte for byte as it was (no job.log either); so is a run without --overwrite."""
    import hashlib

    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((20, 768)).astype(np.float32))
    docs = tmp_path / "mydocs"
    (docs / "kept").mkdir(parents=True)
    (docs / "kept" / "list.txt").write_text("my list")
    (docs / "thesis.txt").write_text("chapter 1")
    (docs / "sub").mkdir()
    (docs / "sub" / "x.bin").write_bytes(b"\0\1")
    (docs / "important.parquet").write_bytes(b"PAR1")

    def snapshot():
        return {str(p.relative_to(docs)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
                for p in docs.rglob("*")}

    before = snapshot()
    for extra in (["--overwrite"], []):
        proc = run_cli_process(["score", str(tmp_path / "in"), "-o", str(docs), "--aesthetic-weights",
                                str(tiny_weights["safetensors"]), *extra])
        assert_one_clear_line(proc, 2, "holds files no aesthetic-dask job wrote (important.parquet, kept/list.txt, sub/x.bin")
        assert snapshot() == before
    # A job's own OUT is still replaced by --overwrite.
    out = tmp_path / "out"
    argv = ["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"])]
    assert run_cli_process(argv).returncode == 0
    assert run_cli_process(argv + ["--threshold", "6", "--overwrite"]).returncode == 0


def test_flags_are_never_abbreviated():
    proc = run_cli_process(["score", "in", "-o", "out", "--model", "tiny.json"])
    assert proc.returncode == 2 and "unrecognized arguments: --model tiny.json (did you mean --model-dir?)" in proc.stderr


def test_one_line_errors_say_the_thing_once_and_name_the_right_command(tmp_path, tiny_weights, tiny_clip, rng):
    missing = run_cli_process(["score", str(tmp_path / "shrads"), "-o", str(tmp_path / "o1"),
                               "--aesthetic-weights", str(tiny_weights["safetensors"])])
    assert_one_clear_line(missing, 2, f"input {tmp_path / 'shrads'}: no such file or directory")
    assert missing.stderr.count("shrads") == 1 and "cannot list it" not in missing.stderr
    emb = write_embeddings(tmp_path / "emb" / "a.parquet", rng.standard_normal((5, 768)).astype(np.float32))
    wrong = run_cli_process(["run", str(emb), "-o", str(tmp_path / "o2"), "--clip-model-config", str(tiny_clip["config"]),
                             "--clip-pretrained", str(tiny_clip["checkpoint"]), "--aesthetic-weights",
                             str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models")])
    assert_one_clear_line(wrong, 2, "it holds embeddings ('embedding'): score them with `aesthetic-dask score`")


def test_the_quickstart_offline_runs_the_main_job_on_the_demo_clip(tmp_path, tiny_weights):
    """The README's first command where the CLIP weights cannot be had: the main job still runs,
    on the demo CLIP, and every place that shows its scores says they mean nothing."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", AESTHETIC_WEIGHTS=str(tiny_weights["safetensors"]))
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "quickstart.py"), str(tmp_path / "qs")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "HF_HUB_OFFLINE is set" in said and "--demo-clip" in said
    assert "aesthetic-dask run: done (demo CLIP: the scores mean nothing)" in said
    assert "DEMO CLIP (random weights; these scores mean nothing). Top of" in said
    assert proc.stderr.strip().splitlines()[-1].startswith("quickstart: run (the main job): done on the demo CLIP")
    m = json.loads((tmp_path / "qs" / "run" / "manifest.json").read_text())
    assert m["clip"]["demo"] is True and m["totals"]["rows_in"] == 8 and m["status"] == "done"
    assert "(demo CLIP)" in (tmp_path / "qs" / "run" / "report.html").read_text()
    assert json.loads((tmp_path / "qs" / "score" / "manifest.json").read_text())["status"] == "done"
