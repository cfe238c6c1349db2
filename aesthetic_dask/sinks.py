"""The sinks, registered once, and what goes through all of them: which of OUT's files a job
writes, and removing partitions' files (redone, no longer planned, ``--prune-missing``,
``--overwrite``).

Each sink declares its files (:attr:`directories`: OUT's directories holding one file per
partition, named after it) and removes them (``remove``): a sink that writes elsewhere, as
``--write-shards`` does, finds its files on the partition's record. Removal asks every
registered sink, not only this run's, so a partition redone without ``--write-shards`` or
without samples loses what an earlier run of it wrote. A new sink is its module and one entry
in :data:`SINKS`.
"""

from __future__ import annotations

from .output import OutputLayout, partition_files
from .parquet_sink import ParquetSink
from .records import FOOTERS_NAME, INDEX_NAME, stem
from .samples import SamplesSink
from .shard_sink import ShardSink

SINKS = (ParquetSink, SamplesSink, ShardSink)
# OUT's directories of partition files, as the sinks declare them (kept, rejected, errors, samples).
PARTITION_DIRS = tuple(d for sink in SINKS for d in sink.directories)
JOB_FILES = ("manifest.json", "report.html", "job.log", "_lock.json")  # OUT's own files, besides the partitions'


def written_by_a_job(layout: OutputLayout, path: str) -> bool:
    """Whether ``path`` (under OUT) is something a job writes: its layout and file names."""
    relative = path.removeprefix(layout.root.rstrip("/") + "/")
    if relative in JOB_FILES:
        return True
    directory, _, name = relative.partition("/")
    if directory == "_tmp":
        return True
    if "/" in name:
        return False
    return (directory in PARTITION_DIRS and name.endswith(".parquet")) or \
        (directory == "_parts" and (name.endswith(".json") or name in (INDEX_NAME, FOOTERS_NAME)))


def remove_partitions(layout: OutputLayout, names: set[str], existing: set[str],
                      listed: dict[str, list[str]] | None = None) -> None:
    """Remove every sink's files of partitions ``names`` and their records (``listed``: the files
    their records list, where a sink wrote outside OUT's partition directories)."""
    if not names:
        return
    doomed = [p for sink in SINKS for p in sink.remove(layout, names, existing, listed or {})]
    doomed += partition_files(layout, ("_parts",), names, existing)
    layout.remove(sorted(set(doomed)))


def unlisted(layout: OutputLayout, name: str, files: list[str], existing: set[str]) -> list[str]:
    """Partition ``name``'s files in the sinks' directories that its record (``files``) no longer
    lists, e.g. a rejected file a refilter emptied: removed after the record is written."""
    listed = {layout.path(f) for f in files}
    mine = (layout.path(d, f"{name}.parquet") for d in PARTITION_DIRS)  # by name: no scan of OUT per partition
    return [p for p in mine if p in existing and p not in listed]


def remove_unplanned(layout: OutputLayout, planned: set[str], existing: set[str], listed: dict[str, list[str]]) -> list[str]:
    """Remove the files and records of partitions this job no longer plans (``listed``: what the
    records read list); return their names. E.g. a different partitioning of the same inputs:
    its files would otherwise be read as kept rows twice."""
    names = {stem(p) for p in partition_files(layout, (*PARTITION_DIRS, "_parts"), None, existing)} - planned
    remove_partitions(layout, names, existing, listed)
    return sorted(names)


def reset_output(layout: OutputLayout) -> None:
    """Remove everything a job writes under OUT (for --overwrite)."""
    for d in (*PARTITION_DIRS, "_parts", *(("_tmp",) if layout.local else ())):
        if layout.fs.exists(layout.path(d)):
            layout.fs.rm(layout.path(d), recursive=True)
    layout.remove([layout.manifest] if layout.fs.exists(layout.manifest) else [])
