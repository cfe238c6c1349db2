"""What downstream tools read (issue 30): every reader on every output shape, WebDataset brace
patterns over --write-shards, provenance in the files, an earlier OUT among the inputs, the right
refusal first, a registered head copied into model_dir, `score --batch-size`."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aesthetic_dask import provenance
from aesthetic_dask.cli import main
from conftest import REAL_WEIGHTS, assert_one_clear_line, photo_bytes, write_embeddings, write_shard

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DIRS = ("kept", "rejected", "errors")


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def clip_args(tiny_clip, tiny_weights, tmp_path) -> list[str]:
    return ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models"), "--no-report"]


@pytest.fixture
def mixed_inputs(tmp_path) -> Path:
    """Shards and image Parquet in one job (two schemas), a shard whose samples are all errors (a
    partition that keeps nothing), and errors in the others."""
    d = tmp_path / "in"
    write_shard(d / "00000.tar", [(f"a{i}.jpg", photo_bytes(PHOTOS[i % 4])) for i in range(5)] + [("bad.jpg", b"junk")])
    write_shard(d / "00001.tar", [(f"b{i}.jpg", photo_bytes(PHOTOS[i % 4])) for i in range(4)])
    write_shard(d / "00002.tar", [("c0.jpg", b"junk"), ("c1.jpg", b"more junk")])
    table = pa.table({"key": ["p0", "p1", "p2"], "image": [photo_bytes("coffee"), b"junk", photo_bytes("rocket", "PNG")],
                      "caption": ["one", "two", "three"], "width": pa.array([1, 2, 3], pa.int32())})
    pq.write_table(table, d / "imgs.parquet")
    return d


def read_with_every_reader(directory: Path, tmp_path: Path) -> dict[str, int | str]:
    """Rows each reader finds under ``directory`` (or the error it raised, as text)."""
    import dask.dataframe as dd
    import duckdb
    import pandas as pd
    import polars as pl
    from datasets import load_dataset

    pattern = str(directory / "*.parquet")
    readers = {
        "pandas": lambda: len(pd.read_parquet(directory)),
        "pyarrow": lambda: pq.read_table(directory).num_rows,
        "polars": lambda: pl.read_parquet(pattern).height,
        "duckdb": lambda: duckdb.sql(f"select count(*) from read_parquet('{pattern}')").fetchall()[0][0],
        "dask": lambda: len(dd.read_parquet(str(directory))),
        "datasets": lambda: load_dataset("parquet", data_files=pattern, split="train",
                                         cache_dir=str(tmp_path / "hf-cache")).num_rows,
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, read in readers.items():
            try:
                out[name] = read()
            except Exception as exc:  # noqa: BLE001 - reported as the reader's failure
                out[name] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.mark.parametrize("threshold", ["0", "100"], ids=["one-empty-partition-mixed-schemas", "no-rows-kept"])
def test_every_reader_reads_every_output_directory_with_the_manifests_counts(tmp_path, mixed_inputs, tiny_clip,
                                                                            tiny_weights, monkeypatch, threshold):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["run", str(mixed_inputs), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", threshold, "--keep-rejected"]) == 0
    totals = manifest(out)["totals"]
    expected = {"kept": totals["rows_kept"], "rejected": totals["rows_below_threshold"], "errors": totals["rows_error"]}
    assert totals["rows_error"] == 4 and totals["rows_in"] == 15
    for d in DIRS:
        files = sorted((out / d).glob("*.parquet"))
        assert len(files) == 4, d  # every partition's file, in every directory
        assert len({pq.read_schema(f).remove_metadata() for f in files}) == 1, f"{d}: one schema for every file"
        counts = read_with_every_reader(out / d, tmp_path)
        if expected[d] == 0:
            # Every reader but `datasets` gives the empty table; `datasets` refuses any split with
            # no rows, its own rule (docs/output.md).
            assert counts.pop("datasets").startswith("ValueError: Instruction \"train\" corresponds to no data")
        assert counts == {name: expected[d] for name in counts}, (d, counts)


def test_write_shards_follow_the_inputs_for_webdataset_brace_patterns(tmp_path, mixed_inputs, tiny_clip, tiny_weights):
    import webdataset as wds

    shards = tmp_path / "wds"
    out = tmp_path / "out"
    assert main(["run", str(mixed_inputs), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", "0", "--write-shards", str(shards)]) == 0
    names = sorted(p.name for p in shards.iterdir())
    assert names == sorted(f"{stem}{suffix}" for stem in ("00000", "00001", "00002", "imgs-00000")
                           for suffix in (".tar", ".parquet", "_stats.json"))
    samples = list(wds.WebDataset(str(shards / "{00000..00002}.tar"), shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)])
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)
    rows = list(wds.WebDataset(str(shards / "imgs-{00000..00000}.tar"), shardshuffle=False))
    assert sorted(r["__key__"] for r in rows) == ["p0", "p2"]
    by_key = {r["__key__"]: r for r in rows}
    assert "jpg" in by_key["p0"] and "png" in by_key["p2"]
    assert json.loads(by_key["p0"]["json"])["caption"] == "one" and "aesthetic_score" in json.loads(by_key["p0"]["json"])
    stats = json.loads((shards / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["rows_error"]) == (6, 5, 1)
    assert stats["input"].endswith("00000.tar") and stats["status_dict"]["kept"] == 5
    assert pq.read_table(shards / "00000.parquet").column("key").to_pylist() == [f"a{i}" for i in range(5)]
    assert pq.read_table(shards / "00002.parquet").num_rows == 0  # nothing kept: an empty tar, no hole in the pattern
    # A re-run finds every companion file and redoes nothing.
    assert main(["run", str(mixed_inputs), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", "0", "--write-shards", str(shards)]) == 0
    assert manifest(out)["this_run"]["partitions_processed"] == 0
    import gzip  # the image Parquet's footer is kept for the next run (issue 32)

    footers = json.loads(gzip.decompress((out / "_parts" / "_inputs.json.gz").read_bytes()))
    assert list(footers) == [str(mixed_inputs / "imgs.parquet")] and footers[str(mixed_inputs / "imgs.parquet")][1] == [3]


def test_shard_names_keep_the_relative_path_and_suffix_only_what_collides():
    from aesthetic_dask.image_reader import ShardPart
    from aesthetic_dask.shard_sink import shard_names

    parts = [ShardPart("/d/in/00000.tar"), ShardPart("/d/in/sub/00000.tar"), ShardPart("/d/in/x/a.tar"),
             ShardPart("/d/in/x/a.tar.gz")]
    names = {p.source: n for p, n in zip(parts, (shard_names(parts)[p.name] for p in parts))}
    assert names["/d/in/00000.tar"] == "00000" and names["/d/in/sub/00000.tar"] == "sub/00000"
    assert names["/d/in/x/a.tar"].startswith("x/a-") and names["/d/in/x/a.tar.gz"].startswith("x/a-")
    assert names["/d/in/x/a.tar"] != names["/d/in/x/a.tar.gz"]
    assert shard_names([ShardPart("s3://bucket/shards/00007.tar")])[ShardPart("s3://bucket/shards/00007.tar").name] \
        == "00007"


def test_every_file_carries_its_provenance_and_refilter_restamps_it(tmp_path, rng, tiny_weights):
    inp = tmp_path / "in"
    write_embeddings(inp / "f.parquet", rng.standard_normal((50, 768)).astype(np.float32))
    out = tmp_path / "out"
    args = ["score", str(inp), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
            "--model-dir", str(tmp_path / "models"), "--threshold", "5.2", "--keep-rejected", "--no-report"]
    assert main(args) == 0
    run_id = manifest(out)["this_run"]["run_id"]
    for d in (*DIRS, "samples"):
        (path,) = (out / d).glob("*.parquet")
        info = provenance.read(str(path))
        assert info["head"]["sha256"] == manifest(out)["weights"]["sha256"] and info["head"]["name"]
        assert info["score_threshold"] == 5.2 and info["run_id"] == run_id and info["job"] == "score"
        assert info["clip"] is None  # score: the embeddings were made elsewhere
    assert main(["refilter", str(out), "--threshold", "5.5", "--no-report"]) == 0
    (kept,) = (out / "kept").glob("*.parquet")
    info = provenance.read(str(kept))
    assert info["score_threshold"] == 5.5 and info["run_id"] == manifest(out)["this_run"]["run_id"] != run_id


def test_run_files_name_the_clip_and_the_demo_flag(tmp_path, mixed_inputs, tiny_clip, tiny_weights):
    out = tmp_path / "out"
    assert main(["run", str(mixed_inputs), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", "0"]) == 0
    info = provenance.read(str(next((out / "kept").glob("*.parquet"))))
    assert info["clip"] == {"model": "tiny-clip", "pretrained": str(tiny_clip["checkpoint"]), "demo": False}


def test_an_earlier_jobs_out_inside_an_input_directory_is_skipped_in_one_line(tmp_path, rng, tiny_weights):
    inp = tmp_path / "in"
    write_embeddings(inp / "f.parquet", rng.standard_normal((30, 768)).astype(np.float32))
    common = ["--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models"),
              "--threshold", "0", "--no-report"]
    assert main(["score", str(inp), "-o", str(inp / "old-out"), *common]) == 0  # an OUT left inside the inputs
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(inp), "-o", str(tmp_path / "out"), *common],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "old-out" in line]
    assert len(lines) == 1 and "earlier aesthetic-dask job's output" in lines[0]
    assert manifest(tmp_path / "out")["totals"]["rows_in"] == 30


@pytest.mark.parametrize("head", ["name", "file"])
def test_offline_the_embedding_space_refusal_comes_before_any_availability_check(tmp_path, head):
    if head == "file" and not REAL_WEIGHTS.is_file():
        pytest.skip("real weights not present")
    weights = "sac+logos+ava1-l14-linearMSE" if head == "name" else str(REAL_WEIGHTS)
    write_shard(tmp_path / "in" / "00000.tar", [("a.jpg", photo_bytes("coffee"))])
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "run", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                           "--clip-model", "ViT-L-14", "--clip-pretrained", "laion2b_s32b_b82k", "--aesthetic-weights", weights,
                           "--model-dir", str(tmp_path / "empty-models")], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_one_clear_line(proc, 2, "was trained on the embeddings of CLIP --clip-model ViT-L-14-quickgelu --clip-pretrained openai")


def test_a_registered_heads_pth_copied_into_model_dir_is_found_by_name(tmp_path, rng):
    if not REAL_WEIGHTS.is_file():
        pytest.skip("real weights not present")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(REAL_WEIGHTS, models / "my-copy.pth")  # any name: found by its sha256
    write_embeddings(tmp_path / "in" / "f.parquet", rng.standard_normal((20, 768)).astype(np.float32))
    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                           "--aesthetic-weights", "sac+logos+ava1-l14-linearMSE", "--model-dir", str(models), "--no-report"],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    weights = manifest(tmp_path / "out")["weights"]
    from aesthetic_dask.models.fetch import sha256_file

    assert weights["name"] == "sac+logos+ava1-l14-linearMSE" and weights["sha256"] == sha256_file(REAL_WEIGHTS)
    assert weights["path"].startswith(str(models))  # read from the copy (or its conversion), nothing fetched


def test_score_takes_batch_size_and_it_changes_scores_only_in_their_last_bit(tmp_path, rng, tiny_weights):
    write_embeddings(tmp_path / "in" / "f.parquet", rng.standard_normal((101, 768)).astype(np.float32))
    frames = []
    for batch in ("1", "7", "4096"):
        out = tmp_path / f"out-{batch}"
        assert main(["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                     "--model-dir", str(tmp_path / "models"), "--threshold", "0", "--batch-size", batch, "--no-report"]) == 0
        frames.append(pq.read_table(out / "kept").column("aesthetic_score").to_numpy())
    # The BLAS sums in another order for another row count: float32 rounding, as between CPU and GPU.
    np.testing.assert_allclose(frames[0], frames[1], rtol=0, atol=2e-6)
    np.testing.assert_allclose(frames[0], frames[2], rtol=0, atol=2e-6)
