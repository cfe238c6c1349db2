"""What both jobs prepare in the client before any task: their heads, their :class:`job.Job`
(fingerprinted settings and what the manifest records), the identity of each input partition,
and what to say before the work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from . import versions
from .config import output_settings
from .filters import parse_all
from .job import Job, Work
from .models.load import load_extra_heads, load_head
from .output import OutputLayout, WriteOptions
from .partition import process


# The packages whose versions every manifest records; each job adds the ones its stages use.
VERSIONED_PACKAGES = ("aesthetic-dask", "dask", "distributed", "pandas", "pyarrow", "numpy", "safetensors", "huggingface_hub")


def threshold_note(threshold: float, predictor: Any, weights: str) -> str | None:
    """One line, before any work, when ``threshold`` is outside the head's range: a registered
    head's typical scores, else the bounds its weights allow. None when it is inside."""
    from .models.registry import REGISTRY

    entry = REGISTRY.get(weights)
    low, high = entry.typical_scores if entry else predictor.score_bounds()
    where = f"{weights} scores land in {low:g}..{high:g}" if entry else \
        f"no embedding can score outside {low:.2f}..{high:.2f} with {weights}"
    if threshold > high:
        return f"warning: threshold {threshold:g} is above the head's range ({where}): nothing will be kept"
    if threshold <= low:
        return f"warning: threshold {threshold:g} is below the head's range ({where}): every valid row will be kept"
    return None


def with_identities(parts: list[Any], storage_options: dict[str, Any] | None = None) -> list[Any]:
    """``parts`` carrying the identity of what each will read (its file's, and a clip-retrieval
    part's metadata file's), listed once per directory."""
    todo = [p for p in parts if p.identity is None or getattr(p, "metadata", None)]  # (planning may have listed them)
    paths = {p.source for p in todo} | {p.metadata for p in todo if getattr(p, "metadata", None)}
    ids = versions.identities(sorted(paths), storage_options)
    return [dataclasses.replace(p, identity="|".join(filter(None, (ids.get(p.source), ids.get(getattr(p, "metadata", None)))))
                                or None) if p.identity is None or getattr(p, "metadata", None) else p for p in parts]


def kind_work(plans: list[Any], reading: Any, scoring: dict[str, Any], common: dict[str, Any]) -> list[Work]:
    """One :class:`job.Work` per input kind planned (:class:`sources.kind.KindPlan`): its parts, with
    their identities, through the one partition pipeline (:func:`partition.process`) with the
    kind's reader (given how the job scores) and the job's sinks (``common``)."""
    return [Work(with_identities(plan.parts, reading.storage_options), process,
                 dict(rows=plan.kind.rows(plan, reading, **scoring), **common)) for plan in plans if plan.parts]


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES + extra:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Heads:
    """The job's heads, loaded in the client: the main one, the ``extra_scores`` ones, and what
    the manifest records of each."""

    predictor: Any
    weights: dict[str, Any]
    extras: dict[str, Any]
    extra_info: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, config: Any) -> Heads:
        predictor, weights = load_head(config.aesthetic_weights, config.resolved_model_dir)
        extras, extra_info = load_extra_heads(config.extra_scores, config.resolved_model_dir, predictor.embed_dim)
        return cls(predictor, weights, extras, extra_info)

    def write_options(self, config: Any, embedding_column: str, columns: Any = None) -> Any:
        """How the job's partitions are split and written (``columns``: the input columns every
        partition's files hold, see :func:`output.uniform`)."""
        return WriteOptions(config.score_threshold, embedding_column, config.keep_embeddings, config.keep_rejected,
                            self.predictor.embed_dim, tuple(self.extras), parse_all(config.filters, self.extras),
                            samples=config.report_samples, columns=columns)


def stamp(work: list[Any], job: Job, heads: Heads, threshold: float, clip: dict[str, Any] | None = None) -> None:
    """Every partition's files carry the job's provenance (:mod:`.provenance`; its run id exists
    once the :class:`Job` does)."""
    from . import provenance

    version = job.info["versions"].get("aesthetic-dask")  # read once, for the manifest
    for w in work:
        opts = w.kwargs["opts"]
        stamped = provenance.metadata(provenance.describe(job.kind, heads, threshold, job.run_id, clip, version,
                                                          opts.filters))
        w.kwargs["opts"] = dataclasses.replace(opts, metadata=stamped)


def new_job(kind: str, config: Any, layout: OutputLayout, heads: Heads, inputs: list[str], started: float,
            failed_inputs: dict[str, str], duplicate_inputs: list[str], derived: dict[str, Any] | None = None,
            info: dict[str, Any] | None = None, versions: tuple[str, ...] = (), notes: list[str] = ()) -> Job:
    """The :class:`Job` of either job kind: its fingerprinted settings (:func:`config.output_settings`
    with the heads' sha256 and ``derived``) and what its manifest records (with ``inputs``);
    ``notes`` are said before the work."""
    # The inputs are not in it: a dataset may grow (and partitions record what they read).
    settings = output_settings(config, kind, weights_sha256=heads.weights["sha256"],
                               extra_scores_sha256={k: v["sha256"] for k, v in heads.extra_info.items()},
                               **(derived or {}))
    return Job(
        kind=kind, layout=layout, settings=settings,
        info={"config": config.to_dict(), "inputs_listed": inputs, "weights": heads.weights,
              "extra_scores": heads.extra_info, **(info or {}),
              "versions": package_versions(versions)},
        failed_inputs=failed_inputs, duplicate_inputs=duplicate_inputs, started=started, report=config.report,
        note="\n".join(filter(None, [*notes, threshold_note(config.score_threshold, heads.predictor,
                                                              heads.weights["name"])])) or None,
    )
