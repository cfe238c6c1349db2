"""Part of issue 29: settings and commands that must refuse in one line, never a traceback or a lost
file: a config file that is not UTF-8; `report -o` aimed at one of OUT's own files or an input."""

import json
import subprocess
import sys

import numpy as np

from aesthetic_dask.cli import main
from conftest import assert_one_clear_line, write_embeddings


def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_bytes(b"score_threshold: 5\ncaption: \xff\xfe caf\xe9\n")
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path), "-o", str(tmp_path / "out"),
                           "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert_one_clear_line(proc, 2, "not a UTF-8 text file")


def test_report_output_never_overwrites_outs_own_files_or_an_input(tmp_path, rng, tiny_weights):
    inp = tmp_path / "in" / "f.parquet"
    write_embeddings(inp, rng.standard_normal((20, 768)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["score", str(inp.parent), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--model-dir", str(tmp_path / "models"), "--threshold", "0", "--no-report"]) == 0
    kept = next((out / "kept").glob("*.parquet"))
    before = {p: p.read_bytes() for p in (kept, out / "manifest.json", inp)}
    for target, says in ((kept, "one of the job's own files"), (out / "manifest.json", "one of the job's own files"),
                         (inp, "one of the job's inputs")):
        proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "report", str(out), "-o", str(target)],
                              capture_output=True, text=True, timeout=120)
        assert_one_clear_line(proc, 2, says)
    assert all(p.read_bytes() == data for p, data in before.items())
    # OUT/report.html itself and a file elsewhere are fine.
    for target in (out / "report.html", tmp_path / "elsewhere.html"):
        assert main(["report", str(out), "-o", str(target)]) == 0 and target.read_text().startswith("<!DOCTYPE")
    assert json.loads((out / "manifest.json").read_text())["totals"]["rows_in"] == 20


def test_a_fifo_among_the_inputs_never_hangs_a_job(tmp_path, rng, tiny_weights):
    """A FIFO named `*.parquet` (or a socket or device) used to hang `score` and `run` with no
    output (issue 29): named directly it is refused in one line; found in a directory it is
    skipped, said in one line, and the rest is read."""
    import os

    inp = tmp_path / "in"
    write_embeddings(inp / "f.parquet", rng.standard_normal((20, 768)).astype(np.float32))
    os.mkfifo(inp / "pipe.parquet")
    common = ["--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models"),
              "--threshold", "0", "--no-report"]
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp / "pipe.parquet"),
                           "-o", str(tmp_path / "out1"), *common], capture_output=True, text=True, timeout=60)
    assert_one_clear_line(proc, 2, "a FIFO, not a regular file")
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(tmp_path / "out2"), *common],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "pipe.parquet" in line][0].startswith("note: skipped")
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["totals"]["rows_in"] == 20
