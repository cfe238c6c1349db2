"""The input kinds behind one interface, registered once (issue 31): a job's inputs are listed once and
each file goes to the kind that claims it; a file named explicitly that no kind claims is read by the
job's first kind (never dropped); the notebook's readers plan through the same kinds as the jobs."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aesthetic_dask.sources.arrow_embeddings import ArrowEmbeddings
from aesthetic_dask.sources.clip_retrieval import ClipRetrievalFolders
from aesthetic_dask.sources.image_parquet import ImageParquet
from aesthetic_dask.sources.kind import InputKind, InputOptions
from aesthetic_dask.sources.parquet_embeddings import ParquetEmbeddings
from aesthetic_dask.sources.readers import read_embeddings, read_image_parquet, read_webdataset
from aesthetic_dask.sources.registry import KINDS, for_job, plan_embeddings, plan_inputs
from aesthetic_dask.sources.shards import Shards
from conftest import photo_bytes, write_embeddings, write_shard


def test_every_kind_is_registered_once_for_its_job():
    assert all(isinstance(kind, InputKind) for kind in KINDS) and len({kind.name for kind in KINDS}) == len(KINDS)
    assert [type(k) for k in for_job("run")] == [Shards, ImageParquet]
    assert [type(k) for k in for_job("score")] == [ParquetEmbeddings, ArrowEmbeddings, ClipRetrievalFolders]


def test_a_run_over_mixed_inputs_gives_each_file_to_its_kind_and_an_unclaimed_one_to_shards(tmp_path):
    write_shard(tmp_path / "in" / "a.tar", [("k0.jpg", photo_bytes("coffee"))])
    write_shard(tmp_path / "odd.shard", [("k1.jpg", photo_bytes("camera"))])  # named explicitly, no known suffix
    pq.write_table(pa.table({"key": ["p0"], "image": [photo_bytes("rocket")]}), tmp_path / "in" / "b.parquet")
    opts = InputOptions("image", 100)
    planned = plan_inputs(for_job("run"), [str(tmp_path / "in"), str(tmp_path / "odd.shard")], opts)
    by_kind = {plan.kind.name: sorted(p.source.rsplit("/", 1)[-1] for p in plan.parts) for plan in planned.plans}
    assert by_kind == {"webdataset": ["a.tar", "odd.shard"], "image-parquet": ["b.parquet"]}
    assert len(planned.files) == 3 and not planned.failed


def test_a_score_input_named_explicitly_is_read_as_parquet_or_failed_in_one_line_never_dropped(tmp_path, rng):
    data = write_embeddings(tmp_path / "emb.parquet", rng.standard_normal((5, 768)).astype(np.float32))
    named = tmp_path / "emb.data"
    named.write_bytes(data.read_bytes())
    (tmp_path / "notes.txt").write_text("not parquet")
    planned = plan_embeddings([str(named), str(tmp_path / "notes.txt")])
    assert [(p.source, p.rows) for p in planned.parts] == [(str(named), 5)]
    assert list(planned.failed) == [str(tmp_path / "notes.txt")] and "\n" not in planned.failed[str(tmp_path / "notes.txt")]


def test_the_notebook_readers_plan_what_the_jobs_plan(tmp_path, rng):
    write_embeddings(tmp_path / "e" / "a.parquet", rng.standard_normal((30, 768)).astype(np.float32), row_group_size=10)
    assert read_embeddings(str(tmp_path / "e"), partition_rows=10).npartitions == \
        len(plan_embeddings([str(tmp_path / "e")], partition_rows=10).parts) == 3
    write_shard(tmp_path / "s" / "a.tar", [("k0.jpg", photo_bytes("coffee")), ("k0.txt", b"a cup")])
    frame = read_webdataset(str(tmp_path / "s")).compute(scheduler="sync")
    assert frame["key"].tolist() == ["k0"] and frame["caption"].tolist() == ["a cup"]
    pq.write_table(pa.table({"key": ["p0", "p1"], "image": [photo_bytes("rocket"), None]}), tmp_path / "p.parquet")
    images = read_image_parquet(str(tmp_path / "p.parquet")).compute(scheduler="sync")
    assert images["key"].tolist() == ["p0", "p1"] and images["image"].iloc[0] == photo_bytes("rocket")


# A new input kind is one module and one registration: Arrow IPC files of embeddings (sources/arrow_embeddings.py).

def _arrow_copies(tmp_path, table: pa.Table) -> dict:
    """The same rows as Parquet, Feather v2 (IPC file format, 3 batches) and an IPC stream (as Hugging
    Face datasets' save_to_disk writes), each in its own directory."""
    import pyarrow.feather as feather

    paths = {}
    for name, suffix in (("parquet", ".parquet"), ("feather", ".feather"), ("stream", ".arrow")):
        path = tmp_path / name / f"data{suffix}"
        path.parent.mkdir(parents=True)
        if name == "parquet":
            pq.write_table(table, path)
        elif name == "feather":
            feather.write_feather(table, path, chunksize=25)
        else:
            with pa.ipc.new_stream(path, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=40):
                    writer.write_batch(batch)
        paths[name] = path
    return paths


def test_arrow_ipc_embeddings_score_exactly_as_the_same_rows_in_parquet(tmp_path, rng, tiny_weights):
    from aesthetic_dask.cli import main

    table = pq.read_table(write_embeddings(tmp_path / "src.parquet", rng.standard_normal((70, 768)).astype(np.float32)))
    outs = {}
    for name, path in _arrow_copies(tmp_path, table).items():
        outs[name] = tmp_path / f"out-{name}"
        assert main(["score", str(path.parent), "-o", str(outs[name]), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                     "--threshold", "0", "--partition-rows", "30", "--keep-rejected", "--no-report"]) == 0
    import json

    def kept(out):
        return pq.read_table(out / "kept").to_pandas().sort_values("key").reset_index(drop=True)

    base = json.loads((outs["parquet"] / "manifest.json").read_text())
    for name in ("feather", "stream"):
        m = json.loads((outs[name] / "manifest.json").read_text())
        assert m["totals"] == base["totals"] and m["partitions"]["done"] == 3  # 70 rows by 30
        # (float32 matrix products may round the last bit otherwise when batches are cut otherwise)
        pd.testing.assert_frame_equal(kept(outs[name]), kept(outs["parquet"]), rtol=1e-6)


def test_arrow_ipc_embeddings_read_lazily_and_an_unreadable_file_is_a_failed_input(tmp_path, rng):
    table = pq.read_table(write_embeddings(tmp_path / "src.parquet", rng.standard_normal((50, 768)).astype(np.float32)))
    paths = _arrow_copies(tmp_path, table)
    frame = read_embeddings(str(paths["stream"]), partition_rows=20)
    assert frame.npartitions == 3
    got = frame.compute(scheduler="sync")
    want = read_embeddings(str(paths["parquet"])).compute(scheduler="sync")
    assert got["key"].tolist() == want["key"].tolist() and got.index.tolist() == list(range(50))
    (paths["feather"].parent / "broken.arrow").write_bytes(b"not arrow at all")
    planned = plan_embeddings([str(paths["feather"].parent)])
    assert len(planned.parts) == 1 and list(planned.failed) == [str(paths["feather"].parent / "broken.arrow")]
    assert planned.failed[str(paths["feather"].parent / "broken.arrow")].startswith("not a readable Arrow IPC file")
