"""refilter survives any interruption (issue 29): stopped at any of its writes (a kill, a full disk)
and run again, possibly stopped again, the finished OUT equals a clean run at the new threshold:
rows, totals, histogram, rejected rows, status. With and without --keep-rejected; the
--write-shards tars are re-split too. Many seeds: ``benchmarks/bench_faults.py``."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from aesthetic_dask.cli import main
from aesthetic_dask.errors import EXIT_OK
from aesthetic_dask.refilter import refilter
from conftest import assert_one_clear_line, photo_bytes, write_embeddings, write_shard
from faults import Killed, full_disk, stopped_at_write

# case -> (--keep-rejected, the job's threshold, the refilter's)
# (The test head's scores land in about 5.0..5.5.)
CASES = {"up": (True, 5.25, 5.4), "down": (True, 5.25, 5.1), "up-without-rejected": (False, 5.25, 5.4)}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def rows(out: Path, d: str) -> pd.DataFrame:
    return pd.read_parquet(out / d).sort_values("key").reset_index(drop=True)


def same_out(out: Path, clean: Path, keep_rejected: bool) -> None:
    m, c = manifest(out), manifest(clean)
    assert m["status"] == c["status"] == "done"
    assert m["totals"] == c["totals"] and m["inputs"].keys() == c["inputs"].keys()
    assert m["score_histogram"] == c["score_histogram"] and m["fingerprint"] == c["fingerprint"]
    t = m["totals"]
    assert t["rows_in"] == t["rows_kept"] + t["rows_below_threshold"] + t["rows_error"]
    for d in ("kept", "rejected") if keep_rejected else ("kept",):
        pd.testing.assert_frame_equal(rows(out, d), rows(clean, d))
    assert not (out / "_tmp").exists() and not (out / "_lock.json").exists()


def score(tmp_path: Path, weights, inp: Path, out: Path, threshold: float, keep_rejected: bool) -> None:
    argv = ["score", str(inp), "-o", str(out), "--aesthetic-weights", str(weights["safetensors"]),
            "--threshold", str(threshold), "--no-report", "--n-workers", "1", "--threads-per-worker", "2"]
    assert main(argv + (["--keep-rejected"] if keep_rejected else [])) == EXIT_OK


@pytest.fixture(scope="module")
def outs(tmp_path_factory, tiny_weights):
    """case -> (the job's OUT at its threshold, a clean OUT at the refilter's, writes a refilter makes)."""
    base = tmp_path_factory.mktemp("refilter")
    rng = np.random.default_rng(29)
    inp = base / "in"
    for i in range(4):  # 4 partitions, one with an error row and scores on both sides of each threshold
        emb = rng.standard_normal((60, 768)).astype(np.float32)
        emb[7] = np.nan
        write_embeddings(inp / f"f{i}.parquet", emb, prefix=f"f{i}-")
    built = {}
    for case, (keep_rejected, before, after) in CASES.items():
        job, clean = base / f"{case}-job", base / f"{case}-clean"
        score(base, tiny_weights, inp, job, before, keep_rejected)
        score(base, tiny_weights, inp, clean, after, keep_rejected)
        trial = base / f"{case}-count"
        shutil.copytree(job, trial)
        with stopped_at_write(None, False, Killed()) as writes:
            refilter(str(trial), after, report=False)
        built[case] = (job, clean, writes[0])
    return built | {"inputs": inp, "weights": tiny_weights}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", CASES)
def test_a_refilter_stopped_at_any_write_and_run_again_equals_a_clean_run(tmp_path, outs, case, seed):
    keep_rejected, _, threshold = CASES[case]
    job, clean, writes = outs[case]
    out = tmp_path / "out"
    shutil.copytree(job, out)
    pick = random.Random(f"{case}-{seed}")
    for _ in range(pick.choice((1, 2))):  # stopped once, or again while finishing
        error = pick.choice((Killed(), full_disk(), KeyboardInterrupt()))
        with stopped_at_write(pick.randrange(writes), pick.random() < 0.5, error):
            try:
                refilter(str(out), threshold, report=False)
            except (Killed, OSError, KeyboardInterrupt):
                pass
    _, code = refilter(str(out), threshold, report=False)
    assert code == EXIT_OK
    same_out(out, clean, keep_rejected)
    # And the job at the new threshold resumes it with nothing to do.
    score(tmp_path, outs["weights"], outs["inputs"], out, threshold, keep_rejected)
    assert manifest(out)["this_run"]["partitions_processed"] == 0


def test_without_rejected_rows_the_totals_still_add_up_and_the_summary_names_refilter(tmp_path, outs):
    job, clean, _ = outs["up-without-rejected"]
    out = tmp_path / "out"
    shutil.copytree(job, out)
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "refilter", str(out), "--threshold", "5.4",
                           "--no-report"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("aesthetic-dask refilter (of a score job): done")
    elapsed = next(line for line in proc.stderr.splitlines() if "elapsed:" in line)
    assert float(elapsed.split()[-1].rstrip("s")) == pytest.approx(manifest(out)["this_run"]["elapsed_s"], abs=0.1)
    same_out(out, clean, keep_rejected=False)
    # Its records now name the job at 5.4: a lost manifest is rebuilt from them by that job.
    (out / "manifest.json").unlink()
    score(tmp_path, outs["weights"], outs["inputs"], out, 5.4, False)
    assert manifest(out)["this_run"]["manifest_rebuilt_from_records"] == 4
    same_out(out, clean, keep_rejected=False)


def test_a_partition_left_between_two_thresholds_is_refused_in_one_line(tmp_path, outs):
    """Files an older version's killed refilter left apart (rows in neither): said, never guessed."""
    from aesthetic_dask import provenance

    job, _, _ = outs["up"]
    out = tmp_path / "out"
    shutil.copytree(job, out)
    kept = sorted((out / "kept").glob("*.parquet"))[0]
    table = pq.read_table(kept)
    pq.write_table(table.replace_schema_metadata(provenance.restamped(table.schema.metadata, 5.3, "old")), kept)
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "refilter", str(out), "--threshold", "5.4"],
                          capture_output=True, text=True, timeout=120)
    assert_one_clear_line(proc, 2, "the rows between are in neither file")


# --write-shards: the tars, their rows files and stats follow the refilter.

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def shard_files(directory: Path) -> dict:
    """What each tar holds (member names), its rows file's keys, its stats' counts."""
    import tarfile

    out = {}
    for tar in sorted(directory.glob("*.tar")):
        stem = tar.name[: -len(".tar")]
        with tarfile.open(tar) as t:
            members = sorted(t.getnames())
        stats = json.loads((directory / f"{stem}_stats.json").read_text())
        keys = pq.read_table(directory / f"{stem}.parquet").column("key").to_pylist()
        out[stem] = (members, sorted(keys), stats["successes"], stats["rows_below_threshold"], stats["score_threshold"])
    return out


@pytest.fixture
def image_inputs(tmp_path) -> Path:
    import pyarrow as pa

    d = tmp_path / "in"
    write_shard(d / "00000.tar", [(f"a{i}.jpg", photo_bytes(PHOTOS[i % 5])) for i in range(7)] + [("bad.jpg", b"junk")])
    write_shard(d / "00001.tar", [(f"b{i}.jpg", photo_bytes(PHOTOS[(i + 2) % 5])) for i in range(6)])
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(6)],
                             "image": [photo_bytes(PHOTOS[i % 5]) for i in range(6)]}), d / "imgs.parquet")
    return d


def test_refilter_re_splits_the_write_shards_tars_even_when_stopped(tmp_path, image_inputs, tiny_clip, tiny_weights):
    clip = ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models"),
            "--no-report"]

    def run(name: str, threshold: float) -> Path:
        assert main(["run", str(image_inputs), "-o", str(tmp_path / name), *clip, "--threshold", str(threshold),
                     "--write-shards", str(tmp_path / f"{name}-wds")]) == EXIT_OK
        return tmp_path / name

    out = run("out", 0)
    scores = np.sort(rows(out, "kept")["aesthetic_score"].to_numpy())
    higher = float(scores[len(scores) // 2])  # about half the samples move below
    clean = run("clean", higher)
    before = shard_files(tmp_path / "out-wds")
    for at in (1, 3):  # stopped after the first tar, then after a rows file
        with stopped_at_write(at, True, Killed()):
            with pytest.raises(Killed):
                refilter(str(out), higher, report=False)
    _, code = refilter(str(out), higher, report=False)
    assert code == EXIT_OK
    after, expected = shard_files(tmp_path / "out-wds"), shard_files(tmp_path / "clean-wds")
    assert after == expected and after != before
    assert set(after) == {"00000", "00001", "imgs-00000"}
    assert manifest(out)["totals"] == manifest(clean)["totals"]
    # Lowering would need samples the tars never held: refused in one line, nothing touched.
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "refilter", str(out), "--threshold", "0"],
                          capture_output=True, text=True, timeout=120)
    assert_one_clear_line(proc, 2, "--write-shards tars")
    assert shard_files(tmp_path / "out-wds") == after
