"""The input kinds, registered once (:data:`KINDS`), and planning a job's inputs over them: INPUT
arguments are listed once (a folder a kind reads whole is given to it as is), each listed file
goes to the kind that claims it, and each kind plans its own. The ``score`` job's kinds share one
schema (:func:`plan_embeddings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..columns import written_by
from ..errors import InputError
from .arrow_embeddings import ArrowEmbeddings
from .clip_retrieval import ClipRetrievalFolders
from .image_parquet import ImageParquet
from .kind import InputKind, InputOptions, KindPlan
from .listing import InputFiles, list_inputs
from .parquet_embeddings import ParquetEmbeddings, embedding_schema
from .shards import Shards

KINDS: tuple[InputKind, ...] = (Shards(), ImageParquet(), ParquetEmbeddings(), ArrowEmbeddings(), ClipRetrievalFolders())


def for_job(job: str) -> tuple[InputKind, ...]:
    """The kinds ``job`` (``run`` or ``score``) reads, in the order their partitions run."""
    return tuple(kind for kind in KINDS if kind.job == job)


@dataclass
class InputsPlan:
    """A job's inputs, planned: one :class:`KindPlan` per kind found among them."""

    plans: list[KindPlan]
    files: list[str]  # every input file (and folder read whole), as listed
    duplicates: list[str] = field(default_factory=list)  # spellings that named an input already listed
    notes: list[str] = field(default_factory=list)  # e.g. an earlier job's OUT skipped
    schema: pa.Schema | None = None  # the score kinds' one schema (plan_embeddings)

    @property
    def parts(self) -> list[Any]:
        return [p for plan in self.plans for p in plan.parts]

    @property
    def failed(self) -> dict[str, str]:
        return {k: v for plan in self.plans for k, v in plan.failed.items()}

    @property
    def footers(self) -> dict[str, list[Any]]:
        return {k: v for plan in self.plans for k, v in plan.footers.items()}


def plan_inputs(kinds: tuple[InputKind, ...], inputs: list[str] | str, opts: InputOptions) -> InputsPlan:
    """``inputs`` (files, directories, globs, folders a kind reads whole; local or URLs) planned by ``kinds``."""
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    whole = {arg: kind for arg in inputs for kind in kinds if kind.claims_whole(arg, opts.storage_options)}
    rest = [arg for arg in inputs if arg not in whole]
    suffixes = tuple(dict.fromkeys(s for kind in kinds for s in kind.suffixes))
    listed = list_inputs(rest, suffixes, opts.exclude, opts.storage_options) if rest else InputFiles([])
    # A file named explicitly that no kind claims by its name is the job's first kind's (a shard for
    # `run`, Parquet for `score`), which says in one line if it cannot read it: never dropped.
    owner = {f: next((kind for kind in kinds if kind.claims(f)), kinds[0]) for f in listed.files}
    plans = []
    for kind in kinds:
        mine = [f for f in listed.files if owner[f] is kind] + [arg for arg, k in whole.items() if k is kind]
        if mine:
            plans.append(kind.plan(mine, opts))
    duplicates = listed.duplicates + [d for plan in plans for d in plan.duplicates]
    return InputsPlan(plans, listed.files + list(whole), duplicates, listed.notes())


def plan_embeddings(
    inputs: list[str] | str,
    embedding_column: str = "embedding",
    partition_rows: int = 131072,
    exclude: tuple[str, ...] = (),
    reserved: tuple[str, ...] = written_by("score"),
    storage_options: dict[str, Any] | None = None,
    footer_cache: dict[str, list[Any]] | None = None,
) -> InputsPlan:
    """Partitions and the one schema of Parquet embedding files/dirs/globs and clip-retrieval
    folders (the ``score`` job's kinds). ``exclude``: directories never read as input (the job's OUT)."""
    opts = InputOptions(embedding_column, partition_rows, tuple(exclude), storage_options, footer_cache, reserved)
    planned = plan_inputs(for_job("score"), inputs, opts)
    schemas = [(plan.kind.name, plan.schema) for plan in planned.plans if plan.schema is not None]
    if not schemas and not planned.failed:
        shown = [inputs] if isinstance(inputs, (str, Path)) else inputs
        raise InputError(f"no embedding files found in {', '.join(map(str, shown))}")
    planned.schema = embedding_schema(schemas, opts)
    for plan in planned.plans:
        plan.schema = planned.schema  # every partition is read with the one schema
    return planned
