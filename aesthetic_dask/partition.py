"""One partition's unit of work, shared by every job and input kind: the one pipeline
(:func:`process`: read and score its rows, hand them to the sinks, write its record last), its
record, its failure, its completion marker.

The record holds the counts, the files written, and a ``failure`` if the input could not be read
whole. Only a partition without a failure leaves ``OUT/_parts/NAME.json``, written last, after
its data files: resume trusts those markers alone, so a failed partition is retried by a re-run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from .errors import FAILURE_DATA, FAILURE_ERROR, DataError
from .lock import committing_as
from .filters import table_keep_mask
from .output import OutputLayout, WriteOptions
from .records import write_record
from .stage_stats import Stats


@dataclass
class Record:
    """One partition's record: its counts, the files it wrote, the score histograms and error
    reasons it contributes, and a ``failure`` if its input could not be read whole. Written as
    ``OUT/_parts/NAME.json`` (its completion marker) and collected by the client."""

    name: str
    source: str
    rows_in: int | None = None  # None: rows unknown (a shard lost before it was read)
    rows_kept: int | None = None
    rows_below_threshold: int | None = None
    rows_error: int | None = None
    rows_failing_filters: dict[str, int] | None = None  # --filter: valid rows failing each criterion
    files: list[str] = field(default_factory=list)  # relative to OUT, or full paths/URLs (--write-shards)
    histogram: list[int] | None = None
    extra_histograms: dict[str, list[int]] = field(default_factory=dict)
    error_reasons: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    failure_kind: str | None = None
    note: str | None = None
    start: int | None = None  # a Parquet row range
    stop: int | None = None
    clip_compute: str | None = None  # the run job: what the model computed in, and the decoder
    image_decoder: str | None = None
    stats: Stats = field(default_factory=Stats)
    worker: dict[str, Any] | None = None  # the worker's model and pool
    seconds: float = 0.0
    # Wall-clock end (epoch seconds): with ``seconds``, when the partition ran, e.g. to see how
    # many tasks shared a GPU at once.
    finished_at: float | None = None
    run_id: str | None = None  # the run that processed it
    job: str | None = None  # the fingerprint of the job it belongs to: a lost manifest is rebuilt from these
    input: str | None = None  # the identity of what it read (versions.identity): a change redoes it
    threshold: float | None = None  # the threshold its kept/rejected split is at (refilter changes it)

    @classmethod
    def of(cls, part: Any) -> Record:
        return cls(part.name, str(part.source), input=getattr(part, "identity", None))

    @classmethod
    def failed(cls, part: Any, reason: str, kind: str = FAILURE_ERROR) -> Record:
        """A partition that could not be processed at all. Its rows count as errors when their
        number is known (a Parquet row range); a shard lost before it was read has ``rows_in:
        None`` ("rows unknown"), never a silent 0."""
        rows = getattr(part, "rows", None)
        known = 0 if rows is not None else None
        return cls(part.name, str(part.source), rows, known, known, rows, failure=reason, failure_kind=kind,
                   input=getattr(part, "identity", None))

    def wrote(self, written: dict[str, Any]) -> None:
        """What :func:`parquet_sink.split_and_write` wrote: counts, files, histograms, error reasons."""
        for key, value in written.items():
            setattr(self, key, value)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        out["stage_s"] = self.stats.seconds
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        record = cls(**({"source": ""} | {k: v for k, v in data.items() if k in _RECORD_FIELDS}))
        record.stats = Stats(data.get("stage_s"))
        return record


_RECORD_FIELDS = frozenset(f.name for f in fields(Record)) - {"stats"}


def finish_record(layout: OutputLayout, record: Record, started: float) -> Record:
    """Time the record and, if the partition is complete, write its completion marker (last)."""
    record.seconds = round(time.perf_counter() - started, 4)
    record.finished_at = round(time.time(), 4)
    if record.failure:
        record.failure_kind = record.failure_kind or FAILURE_DATA
    else:
        record.run_id, record.job = committing_as()  # its commit fenced by the run's lease (lock.holding)
        write_record(layout, record.to_json())
    return record


class Sink(Protocol):
    """Where a scored partition's rows go (:class:`parquet_sink.ParquetSink`: kept/rejected/errors;
    :class:`samples.SamplesSink`: the report's samples; :class:`shard_sink.ShardSink`:
    ``--write-shards`` tars): each writes its files whole, lists them on the record (which is
    written last, so a partition is done only when every sink is), and re-splits them for
    ``refilter``."""

    def write(self, part: Any, scored: Any, record: Record, layout: OutputLayout, opts: WriteOptions) -> None: ...

    def resplit(self, record: Record, how: Any) -> None: ...  # how: parquet_sink.Resplit


def process(part: Any, rows: Any, out: str, opts: WriteOptions, sinks: tuple[Sink, ...],
            storage_options: dict[str, Any] | None = None) -> Record:
    """The one partition pipeline, for every job and input kind: read and score the partition's
    rows (``rows.read(part)``, a :mod:`.rows` reader), give them to each of ``sinks`` in turn, then
    write its record, last. A partition that cannot be read at all is a failed record whose rows
    (where known) count as errors, with the reason; one whose source stopped early keeps the rows
    read and fails with why."""
    t0, started = time.perf_counter(), time.time()
    layout = OutputLayout(out, storage_options)
    try:
        scored = rows.read(part)
    except DataError as exc:
        return finish_record(layout, Record.failed(part, str(exc), FAILURE_DATA), t0)
    scored.started = started
    scored.keep, scored.is_error = table_keep_mask(scored.table, opts.threshold, opts.filters)
    record = Record.of(part)
    for key, value in scored.facts.items():
        setattr(record, key, value)
    with record.stats.time("write_s"):
        for sink in sinks:
            sink.write(part, scored, record, layout, opts)
    record.failure, record.note = scored.failure, scored.note
    return finish_record(layout, record, t0)
