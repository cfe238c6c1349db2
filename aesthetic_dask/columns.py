"""The columns each stage writes (NeMo Curator's ``outputs()``), declared once; the reserved sets
that protect them are derived here.

An input column named like one a job writes is read as ``NAME_input``; a ``--json-fields`` or
``--extra-scores`` name may not take one.
"""

from __future__ import annotations

# What each stage adds to the rows it passes on.
SHARD_COLUMNS = ("key", "source", "image", "image_ext", "caption", "json")  # read: a WebDataset sample
EMBEDDING_COLUMN = "embedding"
EMBED_COLUMNS = (EMBEDDING_COLUMN,)  # embed
SCORE_COLUMN, ERROR_COLUMN = "aesthetic_score", "error"
SCORE_COLUMNS = (SCORE_COLUMN, ERROR_COLUMN)  # score: the score, and why a row has none
SOURCE_COLUMN, ROW_COLUMN = "source", "row"
PROVENANCE_COLUMNS = (SOURCE_COLUMN, ROW_COLUMN)  # write: where an error row came from (OUT/errors/)


def written_by(job: str) -> tuple[str, ...]:
    """Columns the ``score`` or ``run`` job writes over its rows: an input column of that name is
    read as ``NAME_input``."""
    return SCORE_COLUMNS + (EMBED_COLUMNS if job == "run" else ())


# An --extra-scores column may take none of these.
RESERVED_SCORE_NAMES = SCORE_COLUMNS + EMBED_COLUMNS + PROVENANCE_COLUMNS
# A --json-fields name may not take a column a shard's rows already have or the job writes.
RESERVED_SAMPLE_COLUMNS = tuple(dict.fromkeys(SHARD_COLUMNS + SCORE_COLUMNS + EMBED_COLUMNS + PROVENANCE_COLUMNS))


def unit(job: str) -> str:
    """What a job's rows are called in its summary, progress bar and report: ``run`` scores images."""
    return "images" if job == "run" else "rows"
