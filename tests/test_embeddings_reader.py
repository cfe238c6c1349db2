from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aesthetic_dask.sources.readers import read_embeddings
from aesthetic_dask.sources.registry import plan_embeddings
from aesthetic_dask.errors import InputError
from conftest import write_embeddings


def test_row_groups_are_grouped_into_partitions(tmp_path, rng):
    write_embeddings(tmp_path / "a.parquet", rng.standard_normal((100, 768)).astype(np.float32), row_group_size=10)
    plan = plan_embeddings([str(tmp_path)], partition_rows=25)
    assert [(p.start, p.stop) for p in plan.parts] == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
    ddf = read_embeddings(str(tmp_path / "*.parquet"), partition_rows=25)
    df = ddf.compute(scheduler="sync")
    assert df.index.tolist() == list(range(100)) and df["key"].iloc[42] == "k00042"
    assert str(df["embedding"].dtype) == "list<item: float>[pyarrow]"
    assert len({p.name for p in plan.parts}) == 5


def test_a_huge_row_group_is_split_into_streamed_row_ranges(tmp_path, rng):
    """Issue 32: files written by other tools often have one row group of millions of rows; it
    becomes partitions of about partition_rows, each read in batches (memory: bench_scale.py).
    Row groups up to twice partition_rows stay whole (names of such OUTs do not change)."""
    emb = rng.standard_normal((1000, 768)).astype(np.float32)
    write_embeddings(tmp_path / "one.parquet", emb, row_group_size=1000)
    write_embeddings(tmp_path / "mixed.parquet", emb[:530], row_group_size=150)  # 150, 150, 150, 80
    plan = plan_embeddings([str(tmp_path / "one.parquet")], partition_rows=100)
    assert [(p.start, p.stop, p.row_groups, p.group_start) for p in plan.parts] == \
        [(s, s + 100, (0,), 0) for s in range(0, 1000, 100)]
    plan = plan_embeddings([str(tmp_path / "mixed.parquet")], partition_rows=100)
    assert all(p.group_start is None for p in plan.parts)
    df = read_embeddings(str(tmp_path / "one.parquet"), partition_rows=100).compute(scheduler="sync")
    assert df["key"].tolist() == [f"k{i:05d}" for i in range(1000)]
    np.testing.assert_array_equal(np.stack(df["embedding"].map(lambda e: np.asarray(e, np.float32))), emb)
    projected = read_embeddings(str(tmp_path / "one.parquet"), partition_rows=100)[["key"]].compute(scheduler="sync")
    assert projected["key"].iloc[537] == "k00537"


def test_files_with_different_columns_share_one_schema(tmp_path, rng):
    write_embeddings(tmp_path / "a.parquet", rng.standard_normal((5, 768)).astype(np.float32), "a")
    write_embeddings(tmp_path / "b.parquet", rng.standard_normal((5, 768)).astype(np.float16).astype(np.float32), "b", width=pa.array(range(5)))
    df = read_embeddings(str(tmp_path)).compute(scheduler="sync")
    assert list(df.columns) == ["key", "caption", "embedding", "width"]
    assert df["width"].isna().sum() == 5 and df["width"].notna().sum() == 5


def test_clip_retrieval_folder(tmp_path, rng):
    root = tmp_path / "laion"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for n, rows in enumerate((30, 12)):
        emb = rng.standard_normal((rows, 768)).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", emb)
        pq.write_table(pa.table({"url": [f"http://x/{n}/{i}" for i in range(rows)], "caption": ["c"] * rows}), root / "metadata" / f"metadata_{n}.parquet")
    plan = plan_embeddings([str(root)], partition_rows=16)
    assert [(p.source.split("/")[-1], p.start, p.stop) for p in plan.parts] == [
        ("img_emb_0.npy", 0, 16), ("img_emb_0.npy", 16, 30), ("img_emb_1.npy", 0, 12)
    ]
    df = read_embeddings(str(root), partition_rows=16).compute(scheduler="sync")
    assert len(df) == 42 and df["url"].iloc[20] == "http://x/0/20"
    first = np.load(root / "img_emb" / "img_emb_0.npy")[20].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(df["embedding"].iloc[20], np.float32), first)


@pytest.mark.parametrize("dtype", ["<f4", ">f2"])
def test_a_fortran_order_npy_reads_the_same_rows(tmp_path, rng, dtype):
    """Issue 29: a valid column-major .npy (np.save of a transposed view) is read, not refused."""
    root = tmp_path / "laion"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    emb = rng.standard_normal((37, 768)).astype(dtype)
    np.save(root / "img_emb" / "img_emb_0.npy", np.asfortranarray(emb))
    assert np.load(root / "img_emb" / "img_emb_0.npy").flags.f_contiguous
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(37)]}), root / "metadata" / "metadata_0.parquet")
    df = read_embeddings(str(root), partition_rows=10).compute(scheduler="sync")
    assert len(df) == 37 and df["url"].iloc[23] == "u23"
    np.testing.assert_array_equal(np.stack(df["embedding"].map(lambda e: np.asarray(e, np.float32))),
                                  emb.astype(np.float32))


def test_unusable_clip_retrieval_pairs_are_failed_inputs_like_a_bad_parquet(tmp_path, rng):
    """One taxonomy: a misaligned pair, a bad .npy and a bad metadata Parquet are all unreadable
    inputs (recorded, exit 3), as a bad Parquet footer is; the readable pair still plans."""
    root = tmp_path / "laion"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for n, rows in enumerate((3, 2, 2, 4)):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", rng.standard_normal((rows, 768)).astype(np.float32))
        pq.write_table(pa.table({"url": [f"u{i}" for i in range(2 if n == 0 else rows)]}), root / "metadata" / f"metadata_{n}.parquet")
    (root / "img_emb" / "img_emb_1.npy").write_bytes(b"not numpy")
    (root / "metadata" / "metadata_2.parquet").write_bytes(b"PAR1 not parquet")
    plan = plan_embeddings([str(root)])
    assert [(Path(p.source).name, p.rows) for p in plan.parts] == [("img_emb_3.npy", 4)]
    failed = {Path(k).name: v for k, v in plan.failed.items()}
    assert "3 rows but" in failed["img_emb_0.npy"] and "metadata_0.parquet has 2" in failed["img_emb_0.npy"]
    assert "not a readable .npy array" in failed["img_emb_1.npy"]
    assert "not a readable Parquet file" in failed["img_emb_2.npy"]


def test_missing_inputs_and_columns_are_input_errors(tmp_path, rng):
    with pytest.raises(InputError, match="no such file or directory"):
        plan_embeddings([str(tmp_path / "nope.parquet")])
    with pytest.raises(InputError, match="matches no file"):
        plan_embeddings([str(tmp_path / "*.parquet")])
    write_embeddings(tmp_path / "a.parquet", rng.standard_normal((2, 768)).astype(np.float32))
    with pytest.raises(InputError, match=r"a.parquet: no column 'emb' \(columns: key, caption, embedding\)"):
        plan_embeddings([str(tmp_path)], "emb")
    with pytest.raises(InputError, match="column 'key' has type string, expected list<float>"):
        plan_embeddings([str(tmp_path)], "key")


def test_unreadable_parquet_is_recorded_not_fatal(tmp_path, rng):
    write_embeddings(tmp_path / "a.parquet", rng.standard_normal((2, 768)).astype(np.float32))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    plan = plan_embeddings([str(tmp_path)])
    assert len(plan.parts) == 1
    assert list(plan.failed) == [str(tmp_path / "broken.parquet")]
    assert "not a readable Parquet file" in plan.failed[str(tmp_path / "broken.parquet")]


def test_a_wide_file_is_conformed_column_for_column(tmp_path, rng):
    """5,000 columns (the conform step was quadratic in them: benchmarks/bench_hostile.py times
    it); every column lands in its place, renamed inputs and absent ones included."""
    from aesthetic_dask.embeddings_reader import INPUT_NAME_KEY, conform

    n = 5000
    table = pa.table({f"c{i}": pa.array([i, i + 1], pa.int64()) for i in range(n)})
    schema = pa.schema([pa.field(f"c{i}", pa.int64()) for i in reversed(range(n))]
                       + [pa.field("aesthetic_score_input", pa.int32(), metadata={INPUT_NAME_KEY: b"c7"}),
                          pa.field("absent", pa.string())])
    got = conform(table, schema)
    assert got.column_names == [f"c{i}" for i in reversed(range(n))] + ["aesthetic_score_input", "absent"]
    assert got.column(f"c{n - 1}").to_pylist() == [n - 1, n] and got.column("c0").to_pylist() == [0, 1]
    assert got.column("aesthetic_score_input").type == pa.int32() and got.column("aesthetic_score_input").to_pylist() == [7, 8]
    assert got.column("absent").null_count == 2
