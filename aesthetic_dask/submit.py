"""Submitting partitions to a Dask cluster: one named task each, a bounded number in flight, results
as they complete; the progress bar; what the cluster is."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterator

log = logging.getLogger("aesthetic_dask")


def _call(process: Callable[..., Any], part: Any, kwargs: dict[str, Any], run_id: str | None = None,
          job_fingerprint: str | None = None) -> Any:
    """The task: one partition through its process function, its commits fenced by the job's
    lease on OUT (:func:`lock.check_held`), its record stamped with the run and the job."""
    from .lock import holding

    with holding(run_id, job_fingerprint, kwargs.get("out"), kwargs.get("storage_options")):
        return process(part, **kwargs)


def submit_parts(
    client: Any,
    tasks: list[tuple[Any, Any]],  # (part, job.Work)
    run_id: str,
    kind: str,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    max_in_flight: int = 64,
    job_fingerprint: str | None = None,
) -> Iterator[tuple[Any, dict[str, Any] | None, BaseException | None]]:
    """Run each ``(part, work)`` as one task; yield ``(part, record, None)`` or ``(part, None, exception)``.

    At most ``max_in_flight`` tasks exist at once, so a job over 10^6 shards holds a bounded
    graph. Keys are ``(aesthetic-KIND-RUNID, partition name)``: grouped and named on the dashboard,
    and never shared with another job on the same cluster.
    """
    from distributed import as_completed

    prefix = f"aesthetic-{kind}-{run_id}"
    pending = iter(tasks)
    by_key: dict[Any, Any] = {}
    running = as_completed()

    def top_up() -> None:
        while running.count() < max_in_flight:
            try:
                part, work = next(pending)
            except StopIteration:
                return
            future = client.submit(_call, work.process, part, work.kwargs, run_id, job_fingerprint, key=(prefix, part.name),
                                   retries=retries, resources=resources, pure=False)
            by_key[future.key] = part
            running.add(future)

    top_up()
    for future in running:
        part = by_key.pop(future.key)
        if future.status == "finished":
            yield part, future.result(), None
        else:
            try:
                exc = future.exception()
            except BaseException as cancelled:  # noqa: BLE001 - a cancelled future raises instead
                exc = cancelled
            yield part, None, exc
        future.release()
        top_up()


def cluster_info(client: Any) -> dict[str, Any]:
    """Which cluster ran the job (for the manifest and the summary)."""
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        return {
            "scheduler_address": info.get("address") or client.scheduler.address,
            "dashboard_link": _dashboard_link(client),
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
        }
    except Exception:  # noqa: BLE001 - informational only
        log.debug("cannot describe the cluster", exc_info=True)
        return {}


def _dashboard_link(client: Any) -> str | None:
    """The dashboard's link, or None where the scheduler serves none (a local cluster started
    without one still answers HTTP, on a port that has no dashboard)."""
    spec = getattr(getattr(client, "cluster", None), "scheduler_spec", None) or {}
    if spec.get("options", {}).get("dashboard") is False:
        return None
    try:
        return client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
    except Exception:  # noqa: BLE001
        return None


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar_class() -> Any:
    """tqdm's bar for where the job runs: a terminal's; a notebook's widget where ipywidgets is
    installed, else the text bar (never tqdm.autonotebook's "IProgress not found" warning); None
    elsewhere (a log file, cron)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm
    if in_notebook():
        import importlib.util

        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.notebook import tqdm
        else:
            from tqdm.std import tqdm
        return tqdm
    return None


class Progress:
    """Partitions done, and rows (or images) processed with their rate, on a terminal or in a notebook."""

    def __init__(self, total: int, enabled: bool, unit: str) -> None:
        self.bar = None
        self.rows = 0
        self.unit = unit
        self.t0 = time.perf_counter()
        bar = progress_bar_class() if enabled else None
        if bar is not None:
            self.bar = bar(total=total, unit="part", desc="partitions", file=sys.stderr)

    def update(self, record: Any) -> None:
        """One partition done (its :class:`partition.Record`)."""
        self.rows += getattr(record, "rows_in", None) or 0
        if self.bar is not None:
            rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.rows:,} {self.unit}, {rate:,.0f} {self.unit}/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
