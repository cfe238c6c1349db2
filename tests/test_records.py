"""Issue 32: the record index a re-run reads instead of every record is a cache, a third of the
records' size: what it gives back is exactly what the records say, and an index of an earlier
format, or a stale entry, costs reads, never a wrong record."""

import gzip
import json

import numpy as np

from aesthetic_dask.cli import main
from aesthetic_dask.output import OutputLayout
from aesthetic_dask.partition import Record
from aesthetic_dask.records import index_path, read_records_counted, write_index
from conftest import write_embeddings


def finished_out(tmp_path, rng, tiny_weights):
    for i in range(4):
        write_embeddings(tmp_path / "in" / f"f{i}.parquet", rng.standard_normal((30, 768)).astype(np.float32), f"f{i}-")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--threshold", "5", "--keep-rejected", "--partition-rows", "10", "--no-report"]) == 0
    return OutputLayout(out)


def from_files(layout):
    """Every record as its own file says it (the index set aside)."""
    listing = {p: i for p, i in layout.listing().items() if p != index_path(layout)}
    records, read = read_records_counted(layout, listing)
    assert read == len(records) == 12
    return records


def as_records(records):
    """Records as the jobs take them (missing fields at their defaults), less their stage timings
    (which the index leaves out)."""
    return {n: {k: v for k, v in Record.from_json(r).to_json().items() if k != "stage_s"} for n, r in records.items()}


def test_the_index_gives_back_exactly_what_the_records_say(tmp_path, rng, tiny_weights):
    layout = finished_out(tmp_path, rng, tiny_weights)
    truth = from_files(layout)
    # One record of an older version names no job, one an external file: both survive the index.
    name = sorted(truth)[0]
    truth[name]["job"] = None
    truth[name]["files"].append(str(tmp_path / "elsewhere" / "x.tar"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.tar").write_bytes(b"")
    (tmp_path / "out" / "_parts" / f"{name}.json").write_text(json.dumps(truth[name]))
    write_index(layout, truth)
    records, read = read_records_counted(layout, layout.listing())
    assert read == 0 and as_records(records) == as_records(truth)
    whole = sum(len(json.dumps(r)) for r in truth.values())
    assert len(gzip.decompress((tmp_path / "out" / "_parts" / "_index.json.gz").read_bytes())) < whole / 2


def test_an_index_of_an_earlier_format_or_a_stale_entry_costs_reads_not_correctness(tmp_path, rng, tiny_weights):
    layout = finished_out(tmp_path, rng, tiny_weights)
    truth = from_files(layout)
    listing = layout.listing()
    # The first format: keyed by path, records whole.
    old = {p: [0, truth[p.rsplit("/", 1)[-1][:-5]]] for p in listing if p.endswith(".json") and "/_parts/" in p}
    (tmp_path / "out" / "_parts" / "_index.json.gz").write_bytes(gzip.compress(json.dumps({"records": old}).encode()))
    records, read = read_records_counted(layout, layout.listing())
    assert read == 12 and as_records(records) == as_records(truth)
    write_index(layout, truth)
    name = sorted(truth)[3]
    changed = dict(truth[name], rows_kept=truth[name]["rows_kept"] + 1000)  # rewritten since (e.g. by refilter)
    (tmp_path / "out" / "_parts" / f"{name}.json").write_text(json.dumps(changed) + " ")
    records, read = read_records_counted(layout, layout.listing())
    assert read == 1 and records[name]["rows_kept"] == changed["rows_kept"]
