"""Results a scheduler can trust (issue 7): failures never "done", complete fingerprints, inputs and
outputs that cannot corrupt each other, one implementation of each stage."""

import json
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import aesthetic_dask as ad
from aesthetic_dask.cli import main
from aesthetic_dask.config import OUTPUT_OPTIONS, RUNTIME_OPTIONS, Config
from aesthetic_dask.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, DataError, job_outcome
from conftest import loopback_dask, photo_bytes, write_embeddings, write_shard

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def clip_args(tiny_clip, tiny_weights, tmp_path):
    return ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models")]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def good_shard(path: Path, prefix: str) -> Path:
    members = []
    for i, name in enumerate(PHOTOS):
        members += [(f"{prefix}{i:04d}.jpg", photo_bytes(name)), (f"{prefix}{i:04d}.txt", name.encode())]
    return write_shard(path, members)


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    good_shard(d / "a.tar", "a")
    good_shard(d / "b.tar", "b")
    (d / "c.tar").write_bytes(b"this is not a tar archive " * 40)
    return d


def run_cli(tmp_path, tiny_clip, tiny_weights, *args) -> int:
    return main(["run", *map(str, args), *clip_args(tiny_clip, tiny_weights, tmp_path), "--threshold", "0"])


# --- Failures are never "done" ---------------------------------------------------------------------


def test_a_failed_partition_is_retried_and_a_repaired_input_completes_the_job(tmp_path, shard_dir, tiny_clip, tiny_weights, capsys):
    out = tmp_path / "out"
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_PARTIAL
    m = manifest(out)
    assert m["status"] == "partial" and m["partitions"] == {**m["partitions"], "done": 2, "failed": 1}
    assert not any("c-" in p.name for p in (out / "_parts").iterdir()), "a failed partition left a completion marker"
    assert "not a tar archive" in capsys.readouterr().err

    # The same command again: the failure is retried, never remembered as done.
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_PARTIAL
    m = manifest(out)
    assert m["status"] == "partial" and m["this_run"]["partitions_processed"] == 1 and m["this_run"]["partitions_skipped"] == 2
    err = capsys.readouterr().err
    assert "failed partition:" in err and "c.tar" in err and "not a tar archive" in err

    good_shard(shard_dir / "c.tar", "c")  # the input is repaired
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_OK
    m = manifest(out)
    assert m["status"] == "done" and m["partitions"]["done"] == 3 and m["partitions"]["failed"] == 0
    assert m["totals"]["rows_in"] == 12 and len(pd.read_parquet(out / "kept")) == 12


def test_a_shard_lost_to_an_exception_has_rows_unknown_not_zero(tmp_path, shard_dir, tiny_clip, tiny_weights, monkeypatch, capsys):
    from aesthetic_dask.pipeline import stage

    (shard_dir / "c.tar").unlink()
    real_embed = stage.embed_source

    def flaky(source, *args, **kwargs):
        if source.source.endswith("b.tar"):
            raise RuntimeError("NFS hiccup")
        return real_embed(source, *args, **kwargs)

    monkeypatch.setattr(stage, "embed_source", flaky)
    out = tmp_path / "out"
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_PARTIAL
    m = manifest(out)
    b = next(v for k, v in m["inputs"].items() if k.endswith("b.tar"))
    assert b["rows_unknown_partitions"] == 1 and b["partitions_failed"] == 1 and "RuntimeError: NFS hiccup" in b["failures"][0]
    assert m["totals"]["rows_in"] == 4 and m["totals"]["rows_unknown_partitions"] == 1
    err = capsys.readouterr().err
    assert "rows unknown in 1 failed partitions" in err and "NFS hiccup" in err
    assert "NFS hiccup" in (out / "job.log").read_text()

    monkeypatch.setattr(stage, "embed_source", real_embed)  # the hiccup is over
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_OK
    assert manifest(out)["totals"]["rows_in"] == 8


def test_every_partition_failing_with_an_exception_is_exit_1(tmp_path, tiny_weights, rng, monkeypatch):
    from aesthetic_dask.sources import parquet_embeddings

    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((10, 768)).astype(np.float32))

    def boom(*args, **kwargs):
        raise MemoryError("worker out of memory")

    monkeypatch.setattr(parquet_embeddings, "score_table", boom)
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"])]) == EXIT_FAILED
    m = manifest(out)
    assert m["status"] == "failed" and "MemoryError: worker out of memory" in next(iter(m["inputs"].values()))["failures"][0]


@pytest.mark.parametrize("kind", ["parquet footer", "npy", "metadata parquet"])
def test_an_only_input_that_is_unreadable_is_exit_3_with_one_line_naming_it(tmp_path, tiny_weights, rng, kind):
    if kind == "parquet footer":
        bad = tmp_path / "in" / "only.parquet"
        bad.parent.mkdir()
        bad.write_bytes(b"PAR1 garbage")
        inp = bad
    else:
        inp = tmp_path / "laion"
        (inp / "img_emb").mkdir(parents=True)
        (inp / "metadata").mkdir()
        np.save(inp / "img_emb" / "img_emb_0.npy", rng.standard_normal((3, 768)).astype(np.float32))
        pq.write_table(pa.table({"url": ["a", "b", "c"]}), inp / "metadata" / "metadata_0.parquet")
        bad = inp / "img_emb" / "img_emb_0.npy"
        if kind == "npy":
            bad.write_bytes(b"not numpy")
        else:
            (inp / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1 garbage")
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(tmp_path / "out"),
                           "--aesthetic-weights", str(tiny_weights["safetensors"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "unreadable input:" in line]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
    assert manifest(tmp_path / "out")["status"] == "partial"


def test_job_outcome_is_decided_in_one_place():
    assert job_outcome(3, 3, [], 0) == ("done", EXIT_OK)
    assert job_outcome(3, 2, ["data"], 0) == ("partial", EXIT_PARTIAL)
    assert job_outcome(3, 2, ["error"], 0) == ("partial", EXIT_PARTIAL)
    assert job_outcome(0, 0, [], 1) == ("partial", EXIT_PARTIAL)
    assert job_outcome(2, 0, ["error", "error"], 0) == ("failed", EXIT_FAILED)
    assert job_outcome(2, 0, ["error", "data"], 0) == ("partial", EXIT_PARTIAL)
    assert DataError("x").exit_code == EXIT_PARTIAL


# --- Fingerprints ----------------------------------------------------------------------------------


def test_every_option_is_declared_output_affecting_or_runtime():
    declared = set(RUNTIME_OPTIONS) | set(OUTPUT_OPTIONS["score"]) | set(OUTPUT_OPTIONS["run"])
    assert {f.name for f in fields(Config)} == declared
    assert not set(RUNTIME_OPTIONS) & (set(OUTPUT_OPTIONS["score"]) | set(OUTPUT_OPTIONS["run"]))


def test_run_refuses_a_changed_partitioning_precision_or_model_config_and_never_doubles_rows(tmp_path, tiny_clip, tiny_weights, capsys):
    images = [photo_bytes(PHOTOS[i % 4]) for i in range(24)]
    pq.write_table(pa.table({"key": [f"p{i:02d}" for i in range(24)], "image": pa.array(images, pa.binary())}),
                   tmp_path / "images.parquet", row_group_size=4)
    out = tmp_path / "out"
    base = [tmp_path / "images.parquet", "-o", out]
    assert run_cli(tmp_path, tiny_clip, tiny_weights, *base, "--partition-rows", "8") == EXIT_OK
    assert run_cli(tmp_path, tiny_clip, tiny_weights, *base, "--partition-rows", "4") == 2
    assert "changed: partition_rows" in capsys.readouterr().err
    assert run_cli(tmp_path, tiny_clip, tiny_weights, *base, "--partition-rows", "8", "--config", _yaml(tmp_path, clip_precision="fp32")) == 2
    assert "clip_precision" in capsys.readouterr().err
    edited = json.loads(tiny_clip["config"].read_text())
    config_copy = tmp_path / "cfg" / tiny_clip["config"].name
    config_copy.parent.mkdir()
    config_copy.write_text(json.dumps(edited | {"quick_gelu": True, "init_logit_scale": 2.0}))
    argv = ["run", *map(str, base), "--partition-rows", "8", *clip_args(tiny_clip, tiny_weights, tmp_path), "--threshold", "0"]
    argv[argv.index("--clip-model-config") + 1] = str(config_copy)
    assert main(argv) == 2
    assert "clip_model_config" in capsys.readouterr().err
    assert run_cli(tmp_path, tiny_clip, tiny_weights, *base, "--partition-rows", "4", "--overwrite") == EXIT_OK
    assert len(pd.read_parquet(out / "kept")) == 24 and len(list((out / "kept").iterdir())) == 6
    assert manifest(out)["settings"]["clip_compute"] == "cpu-fp32"


def _yaml(tmp_path: Path, **options) -> str:
    import yaml

    path = tmp_path / f"conf-{len(list(tmp_path.glob('conf-*')))}.yaml"
    path.write_text(yaml.safe_dump(options))
    return str(path)


def test_files_of_partitions_no_longer_planned_are_removed(tmp_path, tiny_weights, rng):
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((30, 768)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "0"]
    assert main(argv) == EXIT_OK
    (kept,) = (out / "kept").iterdir()
    stray = out / "kept" / "a-00000000-0000000000-0000000015.parquet"  # e.g. from another partitioning
    stray.write_bytes(kept.read_bytes())
    (out / "_parts" / f"{stray.stem}.json").write_text(json.dumps({"name": stray.stem, "files": [f"kept/{stray.name}"]}))
    assert main(argv) == EXIT_OK
    assert not stray.exists() and not (out / "_parts" / f"{stray.stem}.json").exists()
    assert len(pd.read_parquet(out / "kept")) == 30


# --- Inputs and outputs cannot corrupt each other -------------------------------------------------


def test_an_out_inside_the_input_directory_is_never_read_as_input(tmp_path, tiny_weights, rng):
    inp = tmp_path / "inp"
    write_embeddings(inp / "a.parquet", rng.standard_normal((200, 768)).astype(np.float32))
    argv = ["score", str(inp), "-o", str(inp / "out"), "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "0"]
    assert main(argv) == EXIT_OK
    assert main(argv) == EXIT_OK  # the identical command is a resume, not "changed: inputs"
    m = manifest(inp / "out")
    assert m["this_run"]["partitions_skipped"] == 1 and m["this_run"]["partitions_processed"] == 0
    assert main(argv + ["--overwrite"]) == EXIT_OK
    m = manifest(inp / "out")
    assert m["totals"]["rows_in"] == 200 and m["status"] == "done"
    kept = pd.read_parquet(inp / "out" / "kept")
    assert len(kept) == 200 and kept["key"].is_unique


def test_an_input_named_inside_out_is_refused(tmp_path, tiny_weights, rng):
    from conftest import assert_one_clear_line, run_cli_process

    write_embeddings(tmp_path / "out" / "kept" / "x.parquet", rng.standard_normal((3, 768)).astype(np.float32))
    proc = run_cli_process(["score", str(tmp_path / "out" / "kept" / "x.parquet"), "-o", str(tmp_path / "out"),
                            "--aesthetic-weights", str(tiny_weights["safetensors"])])
    assert_one_clear_line(proc, 2, "lies inside the job's output directory")


def test_inputs_named_twice_are_read_once_and_reported(tmp_path, tiny_weights, rng, capsys, monkeypatch):
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((20, 768)).astype(np.float32))
    (tmp_path / "link.parquet").symlink_to(tmp_path / "in" / "a.parquet")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["score", "in/a.parquet", str(tmp_path / "in" / "a.parquet"), "link.parquet", "in", "-o", str(out),
                 "--aesthetic-weights", str(tiny_weights["safetensors"])]) == EXIT_OK
    m = manifest(out)
    assert m["totals"]["rows_in"] == 20 and len(m["duplicate_inputs"]) == 3
    assert "inputs named twice:   3 (each read once)" in capsys.readouterr().err


def test_relative_inputs_reach_workers_in_another_directory(tmp_path, tiny_weights, rng):
    """A real `dask scheduler` + `dask worker` started elsewhere: relative paths are made absolute
    in the client, so the workers find them."""
    demo = tmp_path / "demo" / "embeddings"
    for i in range(2):
        write_embeddings(demo / f"part-{i:05d}.parquet", rng.standard_normal((30, 768)).astype(np.float32), f"f{i}-")
    workers_cwd = tmp_path / "elsewhere"
    workers_cwd.mkdir()
    with loopback_dask(tmp_path, cwd=workers_cwd) as (_, address, _):
        proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", "demo/embeddings", "-o", "demo/out",
                               "--aesthetic-weights", str(tiny_weights["safetensors"]), "--scheduler", address, "--threshold", "0"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = manifest(tmp_path / "demo" / "out")
    assert m["totals"]["rows_in"] == 60 and len(m["inputs"]) == 2 and m["cluster"]["workers"] == 1
    assert all(Path(k).is_absolute() for k in m["inputs"])


# --- One implementation of each stage; the runner ------------------------------------------------


def test_the_notebook_api_and_the_job_give_the_same_rows(tmp_path, shard_dir, tiny_clip, tiny_weights):
    (shard_dir / "c.tar").unlink()
    out = tmp_path / "out"
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out, "--threshold", "5.4", "--keep-embeddings") == EXIT_OK
    cfg = ad.load_config(clip_model_config=str(tiny_clip["config"]), clip_pretrained=str(tiny_clip["checkpoint"]),
                         aesthetic_weights=str(tiny_weights["safetensors"]), model_dir=str(tmp_path / "models"))
    lazy = ad.filter_by_score(ad.score_embeddings(ad.embed_images(ad.read_webdataset(str(shard_dir)), cfg), cfg), 5.4)
    api = lazy.compute(scheduler="sync").sort_values("key").reset_index(drop=True)
    job = pd.read_parquet(out / "kept").sort_values("key").reset_index(drop=True)
    assert list(api["key"]) == list(job["key"]) and len(job) > 0
    np.testing.assert_array_equal(np.stack(api["embedding"].to_numpy()), np.stack(job["embedding"].to_numpy()))
    np.testing.assert_array_equal(api["aesthetic_score"].to_numpy(np.float32), job["aesthetic_score"].to_numpy(np.float32))


def test_the_lazy_shard_reader_raises_on_a_broken_shard_instead_of_hiding_it(tmp_path, shard_dir):
    ddf = ad.read_webdataset(str(shard_dir))
    with pytest.raises(DataError, match="c.tar: not a tar archive"):
        ddf.compute(scheduler="sync")


def test_filter_by_score_never_keeps_an_error_row():
    df = pd.DataFrame({"aesthetic_score": np.array([6.0, 7.0, np.nan, 4.0], np.float32),
                       "error": pd.array([None, "image is bad", "null embedding", None], pd.ArrowDtype(pa.string()))})
    assert ad.filter_by_score(df, 5.0).index.tolist() == [0]


def test_keep_embeddings_with_invalid_rows_writes_them_to_errors(tmp_path, tiny_weights, rng):
    rows = [list(map(float, r)) for r in rng.standard_normal((6, 768)).astype(np.float32)]
    rows[1] = rows[1][:100]
    rows[2] = None
    pq.write_table(pa.table({"key": list("abcdef"), "embedding": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "e.parquet")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "e.parquet"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--threshold", "0", "--keep-embeddings", "--keep-rejected"]) == EXIT_OK
    assert len(pd.read_parquet(out / "kept")) == 4 and sorted(pd.read_parquet(out / "errors")["key"]) == ["b", "c"]
    assert pq.read_schema(next((out / "kept").iterdir())).field("embedding").type == pa.list_(pa.float32(), 768)


class _Part:
    def __init__(self, i):
        self.name, self.source, self.rows = f"part-{i:03d}", f"/data/{i}", 1


_LOCK, _STATE, _KEYS = threading.Lock(), {"now": 0, "max": 0}, {}


def _tracked_process(part):
    from distributed import get_worker

    _KEYS[part.name] = get_worker().get_current_task()
    with _LOCK:
        _STATE["now"] += 1
        _STATE["max"] = max(_STATE["max"], _STATE["now"])
    time.sleep(0.02)
    with _LOCK:
        _STATE["now"] -= 1
    if part.name == "part-007":
        raise ValueError("bad part")
    return {"name": part.name}


def test_submit_parts_names_keys_after_partitions_and_bounds_tasks_in_flight():
    from distributed import Client, LocalCluster

    from aesthetic_dask.job import Work
    from aesthetic_dask.submit import submit_parts

    work = Work([_Part(i) for i in range(20)], _tracked_process, {})
    with LocalCluster(n_workers=1, threads_per_worker=8, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        results = list(submit_parts(client, [(p, work) for p in work.parts], "run1", "score", retries=0, max_in_flight=3))
    assert 2 <= _STATE["max"] <= 3
    assert len(results) == 20 and sorted(p.name for p, _, _ in results) == [f"part-{i:03d}" for i in range(20)]
    assert [(p.name, str(e)) for p, r, e in results if e is not None] == [("part-007", "bad part")]
    assert _KEYS["part-003"] == ("aesthetic-score-run1", "part-003")  # grouped and named on the dashboard


def test_a_shard_deleted_after_listing_has_rows_unknown(tmp_path, shard_dir, tiny_clip, tiny_weights, monkeypatch):
    """Read in a decode process, a shard gone since the client listed it is "rows unknown", never 0."""
    from aesthetic_dask.sources import registry
    from aesthetic_dask.sources.listing import InputFiles

    (shard_dir / "c.tar").unlink()
    real = registry.list_inputs
    monkeypatch.setattr(registry, "list_inputs", lambda *a, **k: InputFiles(real(*a, **k).files + [str(shard_dir / "gone.tar")]))
    out = tmp_path / "out"
    assert run_cli(tmp_path, tiny_clip, tiny_weights, shard_dir, "-o", out) == EXIT_PARTIAL
    m = manifest(out)
    gone = m["inputs"][str(shard_dir / "gone.tar")]
    assert gone["rows_unknown_partitions"] == 1 and gone["partitions_failed"] == 1 and "cannot read" in gone["failures"][0]
    assert m["totals"]["rows_unknown_partitions"] == 1 and m["totals"]["rows_in"] == 8


def test_two_parts_with_one_output_name_are_refused(tmp_path):
    """The plan's names must be unique: two partitions writing one file would lose rows."""
    from aesthetic_dask.image_reader import ShardPart
    from aesthetic_dask.job import Job
    from aesthetic_dask.output import OutputLayout

    job = Job("run", OutputLayout(tmp_path / "out"), {}, {})
    same = ShardPart(str(tmp_path / "a.tar"))
    with pytest.raises(Exception, match=f"inputs {same.source} and {same.source} map to the same output name {same.name}"):
        job.prepare([same, same], {same.source}, overwrite=False)
    assert not (tmp_path / "out").exists()


def test_output_names_are_unique_by_construction_and_stable():
    """The stem and a 32-bit digest collided for data.0028584.tar and data.0055774.tar (30% likely
    at 56k same-stem shards): names now keep the whole file name, plus a digest of its directory."""
    from aesthetic_dask.image_reader import ShardPart
    from aesthetic_dask.naming import source_name
    from aesthetic_dask.parquet_plan import ParquetPart

    assert ShardPart("/d/data.0028584.tar").name != ShardPart("/d/data.0055774.tar").name
    shards = [f"s3://bucket/crawl/data.{i:07d}.tar" for i in range(200_000)]
    assert len({source_name(s) for s in shards}) == len(shards)
    # Same file name in other directories, a .tar and a .tar.gz, other protocols: all distinct.
    near = ["/a/x.tar", "/b/x.tar", "/a/x.tar.gz", "s3://a/x.tar", "gs://a/x.tar", "/a/sub/x.tar", "/a/x", "/a/x.tar/"]
    assert len({source_name(s) for s in near}) == len(near)
    # A plain file name whatever the input is called, and readable: what Parquet readers list.
    odd = source_name("/d/_hidden [v2]*?.tar")
    assert odd == f"%5Fhidden %5Bv2%5D%2A%3F.tar-{source_name('/d/z')[-16:]}" and "/" not in odd
    assert not source_name("/d/.dot.tar").startswith(".")
    long = source_name("/d/" + "y" * 300 + ".tar")
    assert len(long) < 130 and long != source_name("/d/" + "y" * 301 + ".tar")
    # A pure function of the path: the same here as in a fresh interpreter (no hash seed).
    import subprocess
    import sys

    again = subprocess.run([sys.executable, "-c", "from aesthetic_dask.naming import source_name; "
                            "print(source_name('/d/data.0028584.tar'))"], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == source_name("/d/data.0028584.tar") == ShardPart("/d/data.0028584.tar").name
    assert ParquetPart("/d/e.parquet", 0, 10).name == f"{source_name('/d/e.parquet')}-0000000000-0000000010"


_DAMAGE: dict = {}


def _damaging_process(part, **kwargs):
    """The score job's partition function; the first call truncates one input and deletes another
    (module-level: the task is pickled by reference)."""
    if not _DAMAGE["done"].is_set():
        _DAMAGE["done"].set()
        files, originals = _DAMAGE["files"], _DAMAGE["originals"]
        files[3].write_bytes(originals[files[3]][: len(originals[files[3]]) // 2])
        files[4].unlink()
    return _DAMAGE["real"](part, **kwargs)


def test_an_input_deleted_or_truncated_mid_run_is_that_partitions_failure(tmp_path, rng, tiny_weights, monkeypatch):
    """After planning, one input is truncated and one deleted while the job runs: each is its own
    partition's failure with the reason; every other partition finishes; a re-run after the
    inputs are back completes the job."""
    from aesthetic_dask import preparation  # where each job's Work gets its partition function

    files = [write_embeddings(tmp_path / "emb" / f"p{i}.parquet", rng.standard_normal((40, 768)).astype(np.float32), f"p{i}-")
             for i in range(5)]
    originals = {f: f.read_bytes() for f in files}
    real = preparation.process
    _DAMAGE.update(real=real, files=files, originals=originals, done=threading.Event())
    monkeypatch.setattr(preparation, "process", _damaging_process)
    out = tmp_path / "out"
    argv = ["score", str(tmp_path / "emb"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
            "--threshold", "0", "--threads-per-worker", "1", "--no-report"]
    assert main(argv) == EXIT_PARTIAL
    m = manifest(out)
    assert m["partitions"]["done"] == 3 and m["partitions"]["failed"] == 2
    truncated, deleted = m["inputs"][str(files[3])], m["inputs"][str(files[4])]
    assert truncated["partitions_failed"] == 1 and deleted["partitions_failed"] == 1
    assert "p3.parquet" in truncated["failures"][0] and "p4.parquet" in deleted["failures"][0]
    assert "No such file" in deleted["failures"][0] or "not found" in deleted["failures"][0].lower()
    assert m["totals"]["rows_kept"] == 120
    for f in files[3:]:  # the damaged inputs are back
        f.write_bytes(originals[f])
    monkeypatch.setattr(preparation, "process", real)
    assert main(argv) == EXIT_OK
    m = manifest(out)
    assert m["totals"]["rows_in"] == m["totals"]["rows_kept"] == 200 and m["this_run"]["partitions_skipped"] == 3
