"""The partitions' completion records (``OUT/_parts/NAME.json``) and their index.

A record is written last, after its partition's files, and is the truth a re-run resumes from.
Reading 100,000 of them one by one costs 100,000 requests on an object store, so a finished job
also writes ``OUT/_parts/_index.json.gz``: every record with the version (:func:`versions.identity`,
as the one listing of OUT reports it) of the file it was taken from. A re-run lists OUT once,
takes each record whose file is still that version from the index, and reads only the others
(new since, rewritten by ``refilter``, or from a run the index missed). The index is a cache: a
missing, stale or unreadable one costs requests, never correctness.
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

from . import storage, versions

log = logging.getLogger("aesthetic_dask")

INDEX_NAME = "_index.json.gz"
INDEX_FORMAT = 2  # an index of another format is read as none: the records are read one by one, once
# The index's shorthand for a record's own files (DIR/NAME.parquet is stored as DIR): the sinks'
# directories (sinks.PARTITION_DIRS) as of index format 2; a directory not here is stored in full.
_OWN_DIRS = ("kept", "rejected", "errors", "samples")
FOOTERS_NAME = "_inputs.json.gz"  # what each Parquet input's footer said, by its identity (parquet_plan)


def write_record(layout: Any, record: dict[str, Any]) -> None:
    """A partition's record (its JSON form) as ``OUT/_parts/NAME.json``: its completion marker,
    written last, after its data files are in place.

    Durability costs one sync per partition, not one per file: its local data files were written
    without fsync and are made durable here together (:func:`storage.sync_files`: one syncfs);
    the record itself needs none (a record lost to a power cut only means the partition is
    redone). Object stores commit each object on upload."""
    if layout.local:
        storage.sync_files(layout.file(f) for f in record.get("files", []) if not storage.is_url(f))
    storage.write_json(storage.join(layout.records, f"{record['name']}.json"), record, layout.tmp, layout.fs, durable=False)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while an OUT's listing and records become objects:
    hundreds of thousands of long-lived objects made at once (none in a cycle) set it scanning
    them again and again, 40% of a 100,000-partition preparation (bench_scale.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def index_path(layout: Any) -> str:
    return storage.join(layout.records, INDEX_NAME)


def footers_path(layout: Any) -> str:
    return storage.join(layout.records, FOOTERS_NAME)


def read_records(layout: Any, existing: set[str] | dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Records of finished partitions whose files are all in place, by name.

    ``existing``: the one listing of OUT (:meth:`OutputLayout.listing`; with each file's details,
    the index is used). An unreadable record, a record of a failed partition, or one whose output
    files went missing means "not finished": resume trusts complete records alone.
    """
    return read_records_counted(layout, existing)[0]


def read_records_counted(layout: Any, existing: set[str] | dict[str, dict[str, Any]] | None = None
                         ) -> tuple[dict[str, dict[str, Any]], int]:
    """:func:`read_records`, and how many records were read from their own files (0: the index
    held them all)."""
    existing = layout.listing() if existing is None else existing
    prefix = layout.records + "/"  # (once: a layout path is built per call, 50,000 calls for 5,000 records)
    paths = sorted(p for p in existing if p.startswith(prefix) and p.endswith(".json"))
    contents: dict[str, Any] = {}
    if isinstance(existing, dict) and index_path(layout) in existing:
        index, job = _read_index(layout)
        for path in paths:
            name = stem(path)
            entry = index.get(name)
            if entry is not None and entry[0] == versions.identity(existing[path]):
                contents[path] = _unpacked(name, entry[1], job)
    unread = [p for p in paths if p not in contents]
    if unread:
        contents.update(layout.fs.cat(unread, on_error="omit"))
    parsed = {}
    for path, data in contents.items():
        try:
            parsed[path] = json.loads(data) if isinstance(data, (bytes, str)) else data
        except ValueError:
            continue
    external = _external_files(layout, parsed.values())
    root = layout.root.rstrip("/") + "/"
    records = {}
    for path, rec in parsed.items():
        try:
            if rec.get("failure") or rec["name"] != stem(path):
                continue
            # Relative entries are OUT's own files (the common case, joined here without the layout's helpers).
            files = [root + f if not (f.startswith("/") or storage.is_url(f)) else layout.file(f) for f in rec.get("files", [])]
            if all(f in existing or f in external for f in files):
                records[rec["name"]] = rec
        except (KeyError, TypeError, AttributeError):
            continue
    return records, len(unread)


def _external_files(layout: Any, contents: Any) -> set[str]:
    """The files records list outside OUT (``--write-shards``) that exist: one listing per
    directory, not a request per file."""
    wanted: dict[tuple[int, str], set[str]] = {}
    filesystems: dict[int, Any] = {}
    for rec in contents:
        try:
            for listed in rec.get("files", []):
                if not (listed.startswith("/") or storage.is_url(listed)):
                    continue  # one of OUT's own
                fs, path = storage.split(listed, layout.storage_options) if storage.is_url(listed) \
                    else (layout.fs, layout.file(listed))
                if fs is layout.fs and path.startswith(layout.root + "/"):
                    continue
                filesystems[id(fs)] = fs
                wanted.setdefault((id(fs), path.rsplit("/", 1)[0]), set()).add(path)
        except (ValueError, TypeError, AttributeError):
            continue
    found: set[str] = set()
    for (key, directory), paths in wanted.items():
        fs = filesystems[key]
        try:
            fs.invalidate_cache(directory)
            listed = {fs._strip_protocol(p).rstrip("/") for p in fs.ls(directory, detail=False)}
        except OSError:
            listed = set()
        found |= paths & listed
    return found


def _read_index(layout: Any) -> tuple[dict[str, list[Any]], str | None]:
    """(name -> [its record file's identity, the record packed], the job most records name)."""
    try:
        index = json.loads(gzip.decompress(layout.fs.cat_file(index_path(layout))))
        if index.get("format") == INDEX_FORMAT:
            return index["records"], index.get("job")
        log.info("%s: its record index is of an earlier version; reading the records one by one", layout.root_url)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, gzip.BadGzipFile):
        log.info("%s: its record index is unreadable; reading the records one by one", layout.root_url)
    return {}, None


def write_index(layout: Any, records: dict[str, dict[str, Any]]) -> None:
    """Index ``records`` (name -> record as JSON) by the version of each one's file, as one listing
    of ``OUT/_parts`` reports it now."""
    try:
        listed = layout.fs.find(layout.records, detail=True)
    except FileNotFoundError:
        return
    jobs = Counter(r.get("job") for r in records.values())
    job = jobs.most_common(1)[0][0] if jobs else None
    entries = {stem(path): [versions.identity(info), _packed(records[stem(path)], job)] for path, info in listed.items()
               if path.endswith(".json") and stem(path) in records}
    data = gzip.compress(json.dumps({"format": INDEX_FORMAT, "job": job, "records": entries}, separators=(",", ":"),
                                    default=str).encode(), compresslevel=3)
    storage.write_bytes(layout.fs, index_path(layout), data, layout.tmp)


def read_footers(layout: Any) -> dict[str, list[Any]]:
    """The footer cache a finished job left (input -> [identity, row group sizes, schema]); empty
    if there is none or it is unreadable: a cache, validated input by input against its identity."""
    try:
        return json.loads(gzip.decompress(layout.fs.cat_file(footers_path(layout))))
    except (OSError, ValueError, TypeError, EOFError, gzip.BadGzipFile):
        return {}


def write_footers(layout: Any, footers: dict[str, list[Any]]) -> None:
    data = gzip.compress(json.dumps(footers, separators=(",", ":")).encode(), compresslevel=3)
    storage.write_bytes(layout.fs, footers_path(layout), data, layout.tmp)


def _packed(record: dict[str, Any], job: str | None) -> dict[str, Any]:
    """A record as the index holds it, a third of its size (decoding the index is most of a no-op
    re-run's cost): no per-stage timings, no empty fields, no name (the index's key), no job
    when it is the index's, OUT's own files by their directory (``kept`` for
    ``kept/NAME.parquet``), histograms cut to the span of bins that count."""
    name = record["name"]
    out = {k: v for k, v in record.items() if v is not None and v != {} and k not in ("stage_s", "name", "job")}
    if record.get("job") != job:
        out["job"] = record.get("job")  # None too: a record naming no job stays so
    own = {f"{d}/{name}.parquet": d for d in _OWN_DIRS}
    out["files"] = [own.get(f, f) for f in record.get("files", [])]
    if record.get("histogram") is not None:
        out["histogram"] = _span(record["histogram"])
    if record.get("extra_histograms"):
        out["extra_histograms"] = {c: _span(h) for c, h in record["extra_histograms"].items()}
    return out


def _unpacked(name: str, record: dict[str, Any], job: str | None) -> dict[str, Any]:
    record["name"] = name
    record.setdefault("job", job)
    record.setdefault("error_reasons", {})
    record["files"] = [f"{f}/{name}.parquet" if f in _OWN_DIRS else f for f in record.get("files", [])]
    record["histogram"] = _whole(record.get("histogram"))
    record["extra_histograms"] = {c: _whole(h) for c, h in (record.get("extra_histograms") or {}).items()}
    return record


def _span(counts: list[int] | None) -> list[Any] | None:
    """[bins, first counted bin, the counts from it to the last counted bin]."""
    if counts is None:
        return None
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return [len(counts), 0, []]
    return [len(counts), nonzero[0], counts[nonzero[0]:nonzero[-1] + 1]]


def _whole(packed: list[Any] | None) -> list[int] | None:
    if packed is None:
        return None
    size, first, counts = packed
    return [0] * first + counts + [0] * (size - first - len(counts))


def stem(path: str) -> str:
    """A file's name without its last suffix: a partition's name, from any of its files."""
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
