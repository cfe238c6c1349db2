"""The interface every input kind offers (:class:`InputKind`), what planning one gives back
(:class:`KindPlan`), and what the planner is told (:class:`InputOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from ..image_reader import MAX_SIDECAR_BYTES


@dataclass(frozen=True)
class InputOptions:
    """How a job (or the notebook) reads its inputs: what a kind's planner and reader are told."""

    column: str  # the column its rows are read by: the embedding column (score) or the image column (run)
    partition_rows: int
    exclude: tuple[str, ...] = ()  # never read as input (the job's OUT, --write-shards)
    storage_options: dict[str, Any] | None = None
    footer_cache: dict[str, list[Any]] | None = None  # what earlier runs read of Parquet footers (a job's OUT keeps it)
    reserved: tuple[str, ...] = ()  # columns the job writes: an input's column of that name is read as NAME_input
    canonical: pa.DataType | None = None  # the read column's one type across inputs (None: unified from the files)
    json_fields: dict[str, pa.DataType] = field(default_factory=dict)  # WebDataset sidecar fields as typed columns
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES  # a WebDataset sample's text and JSON members above it are errors


@dataclass
class KindPlan:
    """One kind's part of a job's inputs: its partitions, the schema its rows are read with, what it
    could not read (input -> reason: each a recorded :class:`errors.DataError`), the inputs named
    twice, and the Parquet footers read (for the job's footer cache)."""

    kind: InputKind
    parts: list[Any]
    schema: pa.Schema | None
    failed: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    footers: dict[str, list[Any]] = field(default_factory=dict)


class InputKind:
    """One input format. Its module says what it claims, how it plans parts (in the client), how a
    worker reads one part's rows (the pipeline's reader: image kinds hand the worker's decode pool
    their source of the part) and how the notebook reads it lazily."""

    name: ClassVar[str]
    job: ClassVar[str]  # the job that reads it: "run" (images) or "score" (embeddings)
    suffixes: ClassVar[tuple[str, ...]] = ()  # the listed files it claims

    def claims(self, path: str) -> bool:
        """Whether a listed file is this kind's."""
        return path.lower().endswith(self.suffixes)

    def claims_whole(self, argument: str, storage_options: dict[str, Any] | None) -> bool:
        """Whether an INPUT argument is read whole by this kind (a folder of its own layout), not listed."""
        return False

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        """Its partitions of ``inputs`` (the files it claims, or the arguments it reads whole)."""
        raise NotImplementedError

    def columns(self, plan: KindPlan, opts: InputOptions) -> pa.Schema:
        """The input columns its rows carry into the job's output files (beside what the job adds)."""
        raise NotImplementedError

    def rows(self, plan: KindPlan, opts: InputOptions, **scoring: Any) -> Any:
        """The pipeline's reader of its parts (``read(part) -> rows.ScoredRows``), given how the
        job scores (``scoring``: the heads, and for image kinds the CLIP and the embed options)."""
        raise NotImplementedError

    def frame(self, plan: KindPlan, opts: InputOptions) -> Any:
        """The notebook's lazy Dask frame of its parts (``dd.from_map`` with a declared meta)."""
        raise NotImplementedError
