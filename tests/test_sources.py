"""The input kinds behind one interface, registered once (issue 31): a job's inputs are listed once and
each file goes to the kind that claims it; a file named explicitly that no kind claims is read by the
job's first kind (never dropped); the notebook's readers plan through the same kinds as the jobs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    assert [type(k) for k in for_job("score")] == [ParquetEmbeddings, ClipRetrievalFolders]


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
