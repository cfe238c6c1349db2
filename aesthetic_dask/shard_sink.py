"""The ``--write-shards DIR`` sink: each partition's kept samples as a WebDataset tar named after its
input, with img2dataset's companions beside it.

- **Names follow the inputs**: a shard's tar keeps its path relative to the inputs' common root
  (``in/00000.tar`` -> ``DIR/00000.tar``, ``in/a/00001.tar.gz`` -> ``DIR/a/00001.tar``), so the
  brace patterns WebDataset and img2dataset users write (``DIR/{00000..00099}.tar``) find them.
  An image-Parquet file's partitions are ``STEM-00000.tar``, ``STEM-00001.tar``, ... Only names
  that would still collide get a suffix (``-`` and 8 hex digits of the input's path).
- **Beside each tar**, as img2dataset writes: ``NAME_stats.json`` (counts, reasons, times) and
  ``NAME.parquet`` (the tar's samples: its kept rows, with their scores).
- Every partition gets its tar, an empty one where nothing was kept: a brace pattern never meets
  a hole.
- Shards' members are copied with their original bytes (:func:`write_kept_shard`); an
  image-Parquet row becomes ``KEY.EXT`` (its image bytes, the extension from the image's format)
  and ``KEY.json`` (its other columns and scores).
- ``refilter`` to a higher threshold re-splits them (:func:`resplit`): the tar's own rows file says
  each sample's score, so neither the inputs nor CLIP are needed. A lower threshold would need the
  images of samples the tar never held, so it is refused for a job with ``--write-shards``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import provenance, storage
from .columns import EMBEDDING_COLUMN, ERROR_COLUMN
from .errors import InputError
from .image_reader import SHARD_SUFFIXES, image_values
from .output import OutputLayout, WriteOptions, rows_to_write, write_parquet_file
from .tar_stream import ShardBomb, TarStream, iter_members, open_shard, safe_member_name
from .storage import write_json
from .parquet_plan import PARQUET_SUFFIXES
from .filters import table_keep_mask

# Pillow's format names -> the extensions WebDataset consumers decode by.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def shard_names(parts: list[Any]) -> dict[str, str]:
    """Part name -> its tar's name under DIR (without ``.tar``), decided once in the client."""
    sources = sorted({p.source for p in parts})
    root = _common_root(sources)
    wanted: dict[str, str] = {}
    by_file: dict[str, list[Any]] = {}
    for part in parts:
        by_file.setdefault(part.source, []).append(part)
    for source, file_parts in by_file.items():
        relative = _strip_suffix(_path(source)[len(root):].lstrip("/")) if root else _strip_suffix(posixpath.basename(_path(source)))
        if len(file_parts) == 1 and not hasattr(file_parts[0], "start"):
            wanted[file_parts[0].name] = relative
        else:  # rows of a Parquet file: one tar per partition, in row order
            for i, part in enumerate(sorted(file_parts, key=lambda p: p.start)):
                wanted[part.name] = f"{relative}-{i:05d}"
    taken: dict[str, list[str]] = {}
    for name, stem in wanted.items():
        taken.setdefault(stem, []).append(name)
    source_of = {p.name: p.source for p in parts}
    return {name: stem if len(taken[stem]) == 1 else f"{stem}-{hashlib.sha256(source_of[name].encode()).hexdigest()[:8]}"
            for name, stem in wanted.items()}


def _path(source: str) -> str:
    return source.split("://", 1)[1] if "://" in source else source


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(SHARD_SUFFIXES + PARQUET_SUFFIXES, key=len, reverse=True):  # .tar.gz before .tar
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _common_root(sources: list[str]) -> str:
    schemes = {s.split("://", 1)[0] if "://" in s else "" for s in sources}
    if len(schemes) != 1 or not sources:
        return ""
    return posixpath.commonpath([posixpath.dirname(_path(s)) for s in sources]).rstrip("/")


@dataclass(frozen=True)
class ShardSink:
    """``--write-shards DIR``: one tar per partition, its name decided in the client (``names``:
    part name -> name under DIR, :func:`shard_names`); image Parquet rows take their bytes from
    ``image_column``."""

    directory: str
    names: dict[str, str]
    image_column: str | None = None
    storage_options: dict[str, Any] | None = None
    directories: ClassVar[tuple[str, ...]] = ()  # its files are outside OUT: the records list them

    def write(self, part: Any, scored: Any, record: Any, layout: OutputLayout, opts: WriteOptions) -> None:
        # Full paths or URLs on the record: checked on resume like the rest.
        record.files += write_shard_outputs(
            self.directory, self.names[part.name], part, scored.table, scored.keep, scored.is_error, opts, layout,
            scored.started, record.error_reasons, image_column=None if scored.from_tar else self.image_column,
            storage_options=self.storage_options, sample_indices=scored.rows if scored.from_tar else None)

    def resplit(self, record: Any, how: Any) -> None:
        resplit(record.files, how.threshold, how.criteria, how.run_id, how.layout.tmp, how.layout.storage_options)

    @staticmethod
    def remove(layout: OutputLayout, names: set[str], existing: set[str], listed: dict[str, list[str]]) -> list[str]:
        """The tars (and their ``_stats.json`` and ``.parquet``) the records of ``names`` list, where they still are."""
        files = [layout.file(f) for name in names for f in listed.get(name, ()) if storage.is_url(f) or f.startswith("/")]
        return [p for p in files if p in existing or layout.fs.exists(p)]


def write_shard_outputs(directory: str, stem: str, part: Any, table: pa.Table, keep: np.ndarray, is_error: np.ndarray,
                        opts: WriteOptions, layout: OutputLayout, started: float, reasons: dict[str, Any],
                        image_column: str | None = None, storage_options: dict[str, Any] | None = None,
                        sample_indices: np.ndarray | None = None) -> list[str]:
    """Write ``DIR/STEM.tar`` (the kept samples), ``STEM.parquet`` and ``STEM_stats.json``; return
    their paths (URLs) for the partition's record. ``table`` is the scored partition, ``keep`` and
    ``is_error`` the keep rule's masks over it; shards give ``sample_indices`` (each row's sample
    index in the tar), image Parquet its ``image_column``."""
    target = storage.join(directory, f"{stem}.tar")
    if sample_indices is not None:
        write_kept_shard(part.source, set(sample_indices[keep].tolist()), target, layout.tmp, storage_options)
    else:
        _write_rows_tar(part, image_column, table, keep, target, layout.tmp, storage_options)
    rows_path = storage.join(directory, f"{stem}.parquet")
    fs, path = storage.split(rows_path, storage_options)
    write_parquet_file(rows_to_write(table, keep, opts), fs, path, layout.tmp, dict(opts.metadata))
    ended = time.time()
    stats = {
        "input": part.source,
        "count": table.num_rows,
        "successes": int(keep.sum()),
        "rows_below_threshold": int((~keep & ~is_error).sum()),
        "rows_error": int(is_error.sum()),
        "score_threshold": opts.threshold,
        **({"filters": [str(c) for c in opts.filters]} if opts.filters else {}),
        "status_dict": {"kept": int(keep.sum()), "below_threshold": int((~keep & ~is_error).sum()),
                        **{reason: entry["count"] if isinstance(entry, dict) else entry for reason, entry in reasons.items()}},
        "start_time": started,
        "end_time": ended,
        "duration": round(ended - started, 3),
    }
    stats_path = storage.join(directory, f"{stem}_stats.json")
    fs, path = storage.split(stats_path, storage_options)
    write_json(path, stats, layout.tmp, fs)
    return [target, rows_path, stats_path]


def write_kept_shard(source: str, kept: set[int], target: str, tmp_dir: str | None,
                     storage_options: dict[str, Any] | None = None) -> None:
    """Copy the regular-file members of the kept samples (by sample index: a key may repeat
    non-consecutively in a tar) with their original bytes into a new tar, streamed and written
    whole or not at all (:func:`storage.atomic_open`). Members are written afresh: a safe name
    (:func:`tar_stream.safe_member_name`: a naive extraction stays in its directory), mode
    0644, the original mtime; no owner, link or PAX header of the source is carried over."""
    src_fs, src_path = storage.split(source, storage_options)
    dst_fs, dst_path = storage.split(target, storage_options)
    with src_fs.open(src_path, "rb") as raw, open_shard(stream := TarStream(raw)) as src, \
            storage.atomic_open(dst_fs, dst_path, tmp_dir, durable=False) as out, tarfile.open(fileobj=out, mode="w|") as dst:
        try:
            for index, _, _, member in iter_members(src, stream):
                if index in kept and member.isfile() and not member.issparse():
                    copy = tarfile.TarInfo(safe_member_name(member.name))
                    copy.size, copy.mtime, copy.mode = member.size, member.mtime, 0o644
                    dst.addfile(copy, src.extractfile(member))
        except (tarfile.TarError, EOFError, OSError, ShardBomb):
            pass  # a truncated source or a bomb: its readable part was what got scored


def _write_rows_tar(part: Any, column: str, table: pa.Table, keep: np.ndarray, target: str, tmp_dir: str | None,
                    storage_options: dict[str, Any] | None) -> None:
    """The kept rows of an image-Parquet partition as ``KEY.EXT`` and ``KEY.json`` members."""
    from PIL import Image

    from .embeddings_reader import read_parquet_rows

    images = read_parquet_rows(part.source, part.start, part.stop, part.row_groups, storage_options, columns=[column],
                               group_start=part.group_start)
    values = image_values(images.column(column))
    rows = table.drop_columns([c for c in (ERROR_COLUMN, EMBEDDING_COLUMN) if c in table.column_names])
    records = rows.to_pylist()
    fs, path = storage.split(target, storage_options)
    with storage.atomic_open(fs, path, tmp_dir, durable=False) as out, tarfile.open(fileobj=out, mode="w|") as tar:
        for i in np.flatnonzero(keep):
            data = values[i]
            key = safe_member_name(str(records[i].get("key") or f"{part.start + i:010d}"))
            try:
                with Image.open(io.BytesIO(data)) as image:
                    ext = EXTENSIONS.get(image.format, (image.format or "bin").lower())
            except Exception:  # noqa: BLE001 - scored, so it decoded; the extension is a courtesy
                ext = "bin"
            meta = json.dumps(records[i], default=str).encode()
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(payload))


def resplit(files: list[str], threshold: float, criteria: tuple[Any, ...], run_id: str, tmp_dir: str | None,
            storage_options: dict[str, Any] | None = None) -> None:
    """Re-split the ``--write-shards`` tars among a partition's ``files`` at a higher ``threshold``
    (with the job's ``criteria``, which its rows already pass):
    the tar keeps the samples whose row in ``STEM.parquet`` (its samples, in order, with their
    scores) is kept, then that file and ``STEM_stats.json`` follow. Tar first: a refilter killed
    between them leaves a tar that already holds exactly the rows kept at ``threshold``, which a
    second pass tells by its sample count and leaves as it is."""
    for tar in (f for f in files if f.endswith(".tar")):
        stem = tar[: -len(".tar")]
        fs, rows_path = storage.split(f"{stem}.parquet", storage_options)
        with fs.open(rows_path, "rb") as f:
            rows = pq.read_table(f)
        keep = table_keep_mask(rows, threshold, criteria)[0]
        held = _sample_count(tar, storage_options)
        if held == len(rows) and not keep.all():
            write_kept_shard(tar, set(np.flatnonzero(keep).tolist()), tar, tmp_dir, storage_options)
        elif held not in (len(rows), int(keep.sum())):
            raise InputError(f"{tar}: holds {held} samples but {stem}.parquet lists {len(rows)}; it was changed "
                             "outside aesthetic-dask: re-run the job with --overwrite")
        metadata = provenance.restamped(rows.schema.metadata, threshold, run_id)
        write_parquet_file(rows.filter(pa.array(keep)), fs, rows_path, tmp_dir, metadata)
        _restate(f"{stem}_stats.json", int(keep.sum()), threshold, tmp_dir, storage_options)


def _sample_count(tar: str, storage_options: dict[str, Any] | None) -> int:
    fs, path = storage.split(tar, storage_options)
    with fs.open(path, "rb") as raw, open_shard(stream := TarStream(raw)) as members:
        return len({index for index, *_ in iter_members(members, stream)})


def _restate(stats_url: str, kept: int, threshold: float, tmp_dir: str | None,
             storage_options: dict[str, Any] | None) -> None:
    """``STEM_stats.json`` with the tar's new count of kept samples (the rest of its rows are below)."""
    fs, path = storage.split(stats_url, storage_options)
    stats = json.loads(fs.cat_file(path))
    below = stats["count"] - stats["rows_error"] - kept
    stats.update(successes=kept, rows_below_threshold=below, score_threshold=threshold)
    stats["status_dict"].update(kept=kept, below_threshold=below)
    write_json(path, stats, tmp_dir, fs)
