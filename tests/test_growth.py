"""Growing datasets and thresholds chosen afterwards (issue 18): a re-run over grown inputs runs only
the new partitions, a replaced input is redone, a gone input's output is kept, and `refilter`
re-splits from the recorded scores without CLIP."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aesthetic_dask.cli import main
from aesthetic_dask.errors import EXIT_OK, EXIT_USAGE
from conftest import assert_one_clear_line, photo_bytes, write_embeddings, write_shard


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def kept(out: Path, d: str = "kept") -> pd.DataFrame:
    if not list((out / d).glob("*.parquet")):
        return pd.DataFrame()
    df = pd.read_parquet(out / d)
    return df.sort_values("key").reset_index(drop=True)


def same_output(a: Path, b: Path) -> None:
    """OUT ``a`` holds what a clean run ``b`` does: rows, scores, totals, histogram."""
    ma, mb = manifest(a), manifest(b)
    assert ma["totals"] == mb["totals"] and ma["score_histogram"] == mb["score_histogram"]
    pd.testing.assert_frame_equal(kept(a), kept(b))


def embeddings(path: Path, seed: int, n: int = 200, prefix: str = "") -> Path:
    rng = np.random.default_rng(seed)
    return write_embeddings(path, rng.standard_normal((n, 768)).astype(np.float32), prefix=prefix or f"{path.stem}-")


def score(tmp_path, tiny_weights, inp, out, *extra) -> int:
    return main(["score", str(inp), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--model-dir", str(tmp_path / "models"), "--no-report", *map(str, extra)])


def first_run(tmp_path, tiny_weights, stem: str, files: int = 3) -> tuple[Path, Path]:
    """``files`` embedding files scored at 5 into OUT: (the input directory, OUT)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(files):
        embeddings(inp / f"{stem}{i}.parquet", i)
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    return inp, out


def test_new_inputs_are_new_work_and_out_equals_a_clean_run(tmp_path, tiny_weights, capsys):
    inp, out = first_run(tmp_path, tiny_weights, "day1-")
    for i in range(2):
        embeddings(inp / f"day2-{i}.parquet", 10 + i)  # the next night's data, in the same directory
    capsys.readouterr()
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    run = manifest(out)["this_run"]
    assert run["partitions_processed"] == 2 and run["partitions_new"] == 2 and run["partitions_skipped"] == 3
    assert "2 new" in capsys.readouterr().err
    assert score(tmp_path, tiny_weights, inp, tmp_path / "clean", "--threshold", "5") == EXIT_OK
    same_output(out, tmp_path / "clean")


def test_a_replaced_input_is_redone_never_skipped(tmp_path, tiny_weights):
    inp, out = first_run(tmp_path, tiny_weights, "f")
    embeddings(inp / "f1.parquet", 99, n=150, prefix="again-")  # re-crawled: same name, new content
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    run = manifest(out)["this_run"]
    assert run["partitions_changed"] == 1 and run["partitions_processed"] == 1
    assert score(tmp_path, tiny_weights, inp, tmp_path / "clean", "--threshold", "5") == EXIT_OK
    same_output(out, tmp_path / "clean")
    assert not kept(out)["key"].str.startswith("f1-").any()


def test_a_replaced_shard_is_redone_in_the_run_job(tmp_path, tiny_clip, tiny_weights):
    shards = tmp_path / "shards"
    write_shard(shards / "a.tar", [("a0.jpg", photo_bytes("coffee")), ("a1.jpg", photo_bytes("rocket"))])
    write_shard(shards / "b.tar", [("b0.jpg", photo_bytes("chelsea"))])
    args = ["run", str(shards), "--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained",
            str(tiny_clip["checkpoint"]), "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir",
            str(tmp_path / "models"), "--threshold", "0", "--no-report"]
    out = tmp_path / "out"
    assert main([*args, "-o", str(out)]) == EXIT_OK
    write_shard(shards / "b.tar", [("b9.jpg", photo_bytes("astronaut")), ("b8.jpg", photo_bytes("camera"))])
    write_shard(shards / "c.tar", [("c0.jpg", photo_bytes("coffee"))])
    assert main([*args, "-o", str(out)]) == EXIT_OK
    run = manifest(out)["this_run"]
    assert (run["partitions_changed"], run["partitions_new"], run["partitions_skipped"]) == (1, 1, 1)
    assert main([*args, "-o", str(tmp_path / "clean")]) == EXIT_OK
    same_output(out, tmp_path / "clean")


def test_gone_inputs_keep_their_output_unless_pruned(tmp_path, tiny_weights, capsys):
    inp, out = first_run(tmp_path, tiny_weights, "f")
    before = manifest(out)
    (inp / "f2.parquet").unlink()  # the source moved
    capsys.readouterr()
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    m = manifest(out)
    assert m["missing_inputs"] == [str(inp / "f2.parquet")] and m["partitions"]["missing"] == 1
    assert m["totals"] == before["totals"] and len(kept(out)) == before["totals"]["rows_kept"]
    assert m["inputs"][str(inp / "f2.parquet")]["missing"] is True
    assert "inputs gone:" in capsys.readouterr().err
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5", "--prune-missing") == EXIT_OK
    m = manifest(out)
    assert m["missing_inputs"] == [] and not kept(out)["key"].str.startswith("f2-").any()
    assert score(tmp_path, tiny_weights, inp, tmp_path / "clean", "--threshold", "5") == EXIT_OK
    same_output(out, tmp_path / "clean")


def test_refilter_up_and_down_equals_a_clean_run_at_that_threshold(tmp_path, tiny_weights):
    inp = tmp_path / "in"
    for i in range(3):
        embeddings(inp / f"f{i}.parquet", i, n=400)
    out = tmp_path / "out"
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5.2", "--keep-rejected") == EXIT_OK
    for t in ("5.5", "4.9", "5.2"):  # up, then below the recorded one, then back
        assert main(["refilter", str(out), "--threshold", t, "--no-report"]) == EXIT_OK
        clean = tmp_path / f"clean-{t}"
        assert score(tmp_path, tiny_weights, inp, clean, "--threshold", t, "--keep-rejected") == EXIT_OK
        same_output(out, clean)
        pd.testing.assert_frame_equal(kept(out, "rejected"), kept(clean, "rejected"))
        m = manifest(out)
        assert m["settings"]["score_threshold"] == float(t) and m["status"] == "done"
        assert m["fingerprint"] == manifest(clean)["fingerprint"]
    # The refiltered OUT is the job's at the new threshold: the same command resumes it.
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5.2", "--keep-rejected") == EXIT_OK
    assert manifest(out)["this_run"]["partitions_processed"] == 0


def test_lowering_without_the_rejected_rows_and_a_threshold_only_rerun_name_the_fix(tmp_path, tiny_weights):
    inp = tmp_path / "in"
    embeddings(inp / "f.parquet", 0)
    out = tmp_path / "out"
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5.2") == EXIT_OK
    base = [sys.executable, "-m", "aesthetic_dask"]
    proc = subprocess.run([*base, "refilter", str(out), "--threshold", "4"], capture_output=True, text=True, timeout=120)
    assert_one_clear_line(proc, EXIT_USAGE, "--keep-rejected")
    proc = subprocess.run([*base, "score", str(inp), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                           "--model-dir", str(tmp_path / "models"), "--threshold", "6"], capture_output=True, text=True,
                          timeout=120)
    assert_one_clear_line(proc, EXIT_USAGE, f"aesthetic-dask refilter {out} --threshold 6")
    assert main(["refilter", str(out), "--threshold", "6", "--no-report"]) == EXIT_OK  # raising always works


def test_a_killed_refilter_is_finished_by_running_it_again(tmp_path, tiny_weights, monkeypatch):
    from aesthetic_dask import refilter as refilter_module

    inp = tmp_path / "in"
    for i in range(4):
        embeddings(inp / f"f{i}.parquet", i)
    out = tmp_path / "out"
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5", "--keep-rejected") == EXIT_OK
    real, calls = refilter_module._resplit, []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-way
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(refilter_module, "_resplit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        refilter_module.refilter(str(out), 5.6, report=False)
    assert manifest(out)["status"] == "refiltering"
    # No job mistakes the mix for a finished OUT.
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5", "--keep-rejected") == EXIT_USAGE
    monkeypatch.setattr(refilter_module, "_resplit", real)
    calls.clear()
    manifest_after, code = refilter_module.refilter(str(out), 5.6, report=False)
    assert code == EXIT_OK and manifest_after["this_run"]["partitions_processed"] == 2  # the other two were done
    assert score(tmp_path, tiny_weights, inp, tmp_path / "clean", "--threshold", "5.6", "--keep-rejected") == EXIT_OK
    same_output(out, tmp_path / "clean")


def test_refilter_runs_on_the_base_install_without_torch(tmp_path, tiny_weights):
    inp = tmp_path / "in"
    embeddings(inp / "f.parquet", 0)
    out = tmp_path / "out"
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5", "--keep-rejected") == EXIT_OK
    code = ("import sys\n"
            "for m in ('torch', 'torchvision', 'open_clip'):\n"
            "    sys.modules[m] = None  # importing any of them now fails\n"
            "from aesthetic_dask.cli import main\n"
            f"raise SystemExit(main(['refilter', {str(out)!r}, '--threshold', '5.4']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert manifest(out)["settings"]["score_threshold"] == 5.4 and (out / "report.html").exists()


@pytest.mark.parametrize("threshold, says", [("1e6", "nothing will be kept"), ("-1000000", "every valid row will be kept")])
def test_a_threshold_outside_the_heads_range_is_said_before_the_work(tmp_path, tiny_weights, threshold, says):
    inp = tmp_path / "in"
    embeddings(inp / "f.parquet", 0)
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(tmp_path / "out"),
                           "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "m"),
                           "--threshold", threshold, "--no-report"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if says in line)
    assert warning < next(i for i, line in enumerate(lines) if "partitions to run" in line or "done" in line)
    assert sum(says in line for line in lines) == 1


def test_a_registered_heads_typical_range(tmp_path):
    from aesthetic_dask.preparation import threshold_note
    from aesthetic_dask.models.heads import AestheticPredictor
    from conftest import random_state_dict
    from aesthetic_dask.models.heads import PredictorSpec

    head = AestheticPredictor.from_state_dict(random_state_dict(), PredictorSpec())
    name = "sac+logos+ava1-l14-linearMSE"
    assert "nothing will be kept" in threshold_note(50, head, name) and "1..10" in threshold_note(50, head, name)
    assert "every valid row" in threshold_note(0.5, head, name)  # NeMo's default keeps everything
    assert threshold_note(5.5, head, name) is None


def test_the_nightly_pattern_through_jobs_scheduled(tmp_path, tiny_weights):
    """jobs/scheduled.py with one YAML, every night: the second night runs only the new file."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    inp = tmp_path / "in"
    embeddings(inp / "night1.parquet", 1)
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({"job": "score", "inputs": [str(inp)], "output": str(tmp_path / "out"),
                                    "score_threshold": 5.0, "keep_rejected": True, "model_dir": str(tmp_path / "models"),
                                    "aesthetic_weights": str(tiny_weights["safetensors"]), "report": False}))
    nightly = [sys.executable, str(repo / "jobs" / "scheduled.py"), str(spec)]
    assert subprocess.run(nightly, capture_output=True, text=True, timeout=180).returncode == 0
    embeddings(inp / "night2.parquet", 2)
    proc = subprocess.run(nightly, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    run = manifest(tmp_path / "out")["this_run"]
    assert run["partitions_new"] == 1 and run["partitions_skipped"] == 1


@pytest.mark.parametrize("damage", ["deleted", "torn", "emptied"])
def test_a_lost_or_torn_manifest_is_rebuilt_from_the_records(tmp_path, tiny_weights, damage):
    """Issue 29: the records are the truth, the manifest is derived: a re-run resumes from them
    (nothing redone) and writes the manifest a clean run does; files of another job, or records
    that do not name their job, are refused in one line and never removed."""
    inp, out = first_run(tmp_path, tiny_weights, "f")
    before = manifest(out)
    path = out / "manifest.json"
    {"deleted": path.unlink, "torn": lambda: path.write_text(path.read_text()[:200]),
     "emptied": lambda: path.write_text("")}[damage]()
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    after = manifest(out)
    assert after["this_run"]["partitions_processed"] == 0 and after["this_run"]["manifest_rebuilt_from_records"] == 3
    for key in ("totals", "inputs", "score_histogram", "fingerprint", "status", "partitions"):
        assert after[key] == before[key], key
    # Another job's command finds records that are not its own: refused, nothing touched.
    path.unlink()
    other = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(out),
                            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "5", "--keep-rejected"],
                           capture_output=True, text=True, timeout=120)
    assert_one_clear_line(other, EXIT_USAGE, "its manifest.json is missing and it has records of a different job")
    # Records written before they named their job: not guessed either.
    for record in (out / "_parts").glob("*.json"):
        data = json.loads(record.read_text())
        data.pop("job")
        record.write_text(json.dumps(data))
    old = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(out),
                          "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "5"],
                         capture_output=True, text=True, timeout=120)
    assert_one_clear_line(old, EXIT_USAGE, "no partition record naming this job; pass --overwrite")
    assert len(kept(out)) == before["totals"]["rows_kept"]


@pytest.mark.parametrize("how", ["cp -p", "rsync -t", "tar -x"])
def test_an_input_rewritten_with_its_size_and_mtime_restored_is_redone(tmp_path, tiny_weights, how):
    """Issue 29: what a user (or cp -p, rsync -t, tar -x) can set back does not identify a local
    file; its inode and change time do."""
    import os
    import shutil
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    def version(path: Path, sign: float) -> Path:  # uncompressed: the same rows give the same size
        emb = np.random.default_rng(1).standard_normal((200, 768)).astype(np.float32) * sign
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": [f"k{i:03d}" for i in range(200)], "embedding": list(emb)}), path,
                       compression="none")
        return path

    inp, out = tmp_path / "in", tmp_path / "out"
    embeddings(inp / "f0.parquet", 0)
    target = version(inp / "f1.parquet", 1.0)
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "0") == EXIT_OK
    scores_before = kept(out).set_index("key")["aesthetic_score"]
    stat = target.stat()
    same_size = version(tmp_path / "staging" / "f1.parquet", -1.0)
    assert same_size.stat().st_size == stat.st_size
    if how == "cp -p":  # rewritten in place: the same inode
        shutil.copyfile(same_size, target)
    elif how == "rsync -t":  # a temporary file renamed over it
        shutil.copyfile(same_size, inp / ".f1.parquet.tmp")
        os.replace(inp / ".f1.parquet.tmp", target)
    else:
        with tarfile.open(tmp_path / "a.tar", "w") as tar:
            tar.add(same_size, arcname="f1.parquet")
        target.unlink()
        with tarfile.open(tmp_path / "a.tar") as tar:
            tar.extractall(inp, filter="data")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime, restored
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "0") == EXIT_OK
    assert manifest(out)["this_run"]["partitions_changed"] == 1
    scores_after = kept(out).set_index("key")["aesthetic_score"]
    assert (scores_after["k000":"k199"] != scores_before["k000":"k199"]).all()  # the new values, scored


def test_records_from_before_inode_identities_are_not_redone(tmp_path, tiny_weights):
    """Compatibility: a record holding the older size-and-mtime identity still matches its unchanged input."""
    inp, out = first_run(tmp_path, tiny_weights, "f")
    for record in (out / "_parts").glob("*.json"):
        data = json.loads(record.read_text())
        assert ";ino=" in data["input"] and ";ctime=" in data["input"]
        data["input"] = data["input"].split(";ino=", 1)[0]
        record.write_text(json.dumps(data))
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    assert manifest(out)["this_run"]["partitions_processed"] == 0


def test_a_rerun_reads_the_footers_of_new_and_changed_inputs_only(tmp_path, tiny_weights, monkeypatch):
    """Issue 32: OUT keeps what each input's footer said, by the input's identity; a nightly re-run
    plans unchanged inputs from it (no footer read), and a new or rewritten one from its footer."""
    from aesthetic_dask import parquet_plan

    inp, out = first_run(tmp_path, tiny_weights, "f", files=4)
    read, real = [], parquet_plan.open_footer
    monkeypatch.setattr(parquet_plan, "open_footer", lambda url, *a: read.append(Path(url).name) or real(url, *a))
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    assert read == [] and manifest(out)["this_run"]["partitions_skipped"] == 4
    embeddings(inp / "f9.parquet", 9)  # tonight's file
    embeddings(inp / "f1.parquet", 99, n=150, prefix="again-")  # and one rewritten
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    assert sorted(read) == ["f1.parquet", "f9.parquet"]
    assert score(tmp_path, tiny_weights, inp, tmp_path / "clean", "--threshold", "5") == EXIT_OK
    same_output(out, tmp_path / "clean")
    (out / "_parts" / "_inputs.json.gz").write_bytes(b"not gzip")  # a damaged cache is only a cache
    read.clear()
    assert score(tmp_path, tiny_weights, inp, out, "--threshold", "5") == EXIT_OK
    assert len(read) == 5 and manifest(out)["this_run"]["partitions_processed"] == 0
