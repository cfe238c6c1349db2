import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aesthetic_dask.cli import main
from conftest import assert_one_clear_line, run_cli_process, write_embeddings


@pytest.fixture
def dataset(tmp_path, rng):
    """Two Parquet files (one with two row groups), with invalid rows of every kind in the second."""
    a = rng.standard_normal((120, 768)).astype(np.float32)
    write_embeddings(tmp_path / "in" / "a.parquet", a, "a", row_group_size=60)
    rows = [list(map(float, r)) for r in rng.standard_normal((40, 768)).astype(np.float32)]
    rows[0] = None
    rows[1] = rows[1][:100]
    rows[2] = [0.0] * 768
    rows[3] = [float("nan")] * 768
    rows[4] = [float("inf")] + rows[4][1:]
    table = pa.table({"key": [f"b{i:05d}" for i in range(40)], "caption": ["c"] * 40, "embedding": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "in" / "b.parquet")
    return tmp_path


def run_cli(*args) -> int:
    return main(["score", *map(str, args)])


def test_score_job_writes_the_layout_and_counts_add_up(dataset, tiny_weights, capsys):
    out = dataset / "out"
    code = run_cli(dataset / "in", "-o", out, "--threshold", "5.43", "--aesthetic-weights", tiny_weights["pth"],
                   "--model-dir", dataset / "models", "--keep-rejected", "--partition-rows", "60")
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    assert t["rows_in"] == 160 and t["rows_error"] == 5
    assert t["rows_kept"] + t["rows_below_threshold"] + t["rows_error"] == t["rows_in"]
    for counts in m["inputs"].values():
        assert counts["rows_kept"] + counts["rows_below_threshold"] + counts["rows_error"] == counts["rows_in"]
    assert m["partitions"]["planned"] == m["partitions"]["done"] == 3
    assert m["weights"]["sha256"] and m["weights"]["folded"] is True
    assert m["config"]["score_threshold"] == 5.43 and "dask" in m["versions"] and m["status"] == "done"

    kept = pd.read_parquet(out / "kept")
    rejected = pd.read_parquet(out / "rejected")
    errors = pd.read_parquet(out / "errors")
    assert list(kept.columns) == ["key", "caption", "aesthetic_score"]
    assert len(kept) == t["rows_kept"] and (kept["aesthetic_score"] >= 5.43).all() and len(kept) > 20
    assert len(rejected) == t["rows_below_threshold"] and (rejected["aesthetic_score"] < 5.43).all() and len(rejected) > 20
    assert str(kept["aesthetic_score"].dtype) == "float32"
    assert sorted(errors["key"]) == ["b00000", "b00001", "b00002", "b00003", "b00004"]
    assert set(errors.columns) == {"source", "row", "key", "caption", "error"}
    assert errors.set_index("key").loc["b00001", "error"] == "embedding has 100 values, expected 768"
    assert errors["source"].str.endswith("b.parquet").all() and sorted(errors["row"]) == [0, 1, 2, 3, 4]
    assert set(kept["key"]) | set(rejected["key"]) | set(errors["key"]) == {f"a{i:05d}" for i in range(120)} | {f"b{i:05d}" for i in range(40)}
    # Every reader sees exactly the kept rows in OUT/kept/.
    import dask.dataframe as dd

    assert len(dd.read_parquet(out / "kept")) == len(kept)
    assert pq.ParquetDataset(out / "kept").read().num_rows == len(kept)
    assert not (out / "_tmp").exists()
    assert "kept (>= threshold)" in capsys.readouterr().err


def test_keep_embeddings_writes_fixed_size_float32(dataset, tiny_weights):
    out = dataset / "out"
    assert run_cli(dataset / "in" / "a.parquet", "-o", out, "--threshold", "0", "--aesthetic-weights", tiny_weights["safetensors"], "--keep-embeddings") == 0
    schema = pq.read_schema(next((out / "kept").glob("*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 768)
    kept = pd.read_parquet(out / "kept")
    assert len(kept) == 120


def test_rerun_skips_done_partitions_and_a_changed_config_needs_overwrite(dataset, tiny_weights):
    out = dataset / "out"
    args = [dataset / "in", "-o", out, "--aesthetic-weights", tiny_weights["safetensors"], "--threshold", "5.4"]
    assert run_cli(*args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "kept").iterdir()}
    first = pd.read_parquet(out / "kept").sort_values("key").reset_index(drop=True)
    assert run_cli(*args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "kept").iterdir()} == before
    # A partition whose output file went missing is not "done": the re-run redoes it alone.
    lost = sorted((out / "kept").iterdir())[0]
    lost.unlink()
    assert run_cli(*args) == 0
    assert lost.exists() and pd.read_parquet(out / "kept").sort_values("key").reset_index(drop=True).equals(first)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "kept").iterdir() if p != lost} == {k: v for k, v in before.items() if k != lost.name}
    assert run_cli(dataset / "in", "-o", out, "--aesthetic-weights", tiny_weights["safetensors"], "--threshold", "5.5") == 2
    assert run_cli(dataset / "in", "-o", out, "--aesthetic-weights", tiny_weights["safetensors"], "--threshold", "5.5", "--overwrite") == 0
    again = pd.read_parquet(out / "kept")
    assert (again["aesthetic_score"] >= 5.5).all() and 0 < len(again) < len(first)


def test_unreadable_input_file_gives_exit_3_and_is_reported(dataset, tiny_weights):
    (dataset / "in" / "c.parquet").write_bytes(b"garbage")
    out = dataset / "out"
    assert run_cli(dataset / "in", "-o", out, "--aesthetic-weights", tiny_weights["safetensors"]) == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "partial" and any(k.endswith("c.parquet") for k in m["failed_inputs"])
    assert m["totals"]["rows_in"] == 160


def test_corrupt_data_pages_fail_that_partition_only(dataset, tiny_weights):
    data = bytearray((dataset / "in" / "a.parquet").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xff" * 4096  # the footer stays readable; a data page does not
    (dataset / "in" / "a.parquet").write_bytes(bytes(data))
    out = dataset / "out"
    assert run_cli(dataset / "in", "-o", out, "--aesthetic-weights", tiny_weights["safetensors"], "--partition-rows", "60") == 3
    m = json.loads((out / "manifest.json").read_text())
    a = next(v for k, v in m["inputs"].items() if k.endswith("a.parquet"))
    b = next(v for k, v in m["inputs"].items() if k.endswith("b.parquet"))
    assert a["rows_in"] == 120 and a["failures"] and "cannot read rows" in a["failures"][0]
    assert a["rows_error"] + a["rows_kept"] + a["rows_below_threshold"] == 120
    assert b["rows_in"] == 40 and "failures" not in b
    # A failed partition is never "done": a re-run retries it.
    assert m["status"] == "partial" and m["partitions"]["done"] == 2 and m["partitions"]["failed"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/missing.parquet"], "input {d}/missing.parquet: no such file or directory"),
        (["{d}/in", "--embedding-column", "vec"], "no column 'vec'"),
        (["{d}/in", "--aesthetic-weights", "{d}/in/a.parquet"], "expected a .pth or .safetensors file"),
        (["{d}/in", "--aesthetic-weights", "{d}/nope.pth"], "no such file, and not a registered name"),
        (["{d}/in", "--config", "{d}/nope.yaml"], "cannot read config file"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(dataset, tiny_weights, args, message):
    argv = [a.format(d=dataset) for a in args]
    if "--aesthetic-weights" not in argv:
        argv += ["--aesthetic-weights", str(tiny_weights["safetensors"])]
    proc = run_cli_process(["score", *argv, "-o", str(dataset / "out")])
    assert_one_clear_line(proc, 2, message.format(d=dataset))


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", "x.parquet", "-o", "out", "--threshold", "high"])
    assert exc.value.code == 2
    assert "invalid float value" in capsys.readouterr().err
