"""``aesthetic-dask report OUT``: one self-contained HTML page to choose a threshold from.

Everything comes from OUT: the manifest (counts, the exact score histogram, error reasons) and the
samples the job kept per score band (``OUT/samples/``, with thumbnails for the ``run`` job). The
charts are drawn with matplotlib and inlined as SVG, thumbnails as data URIs: the page loads
nothing from anywhere, so it opens offline from a laptop or a cluster's shared disk.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import columns, histogram, storage
from .summary import clip_caveats, is_demo
from .errors import InputError
from .filters import parse
from .output import OutputLayout
from .sinks import written_by_a_job
from .storage import atomic_write_bytes

GUIDE_THRESHOLDS = (4.5, 5.0, 5.5, 6.0, 6.5, 7.0)
PER_BAND = 12  # samples shown per score band
MAX_SAMPLE_FILES = 2000  # partitions' sample files read (evenly spaced) for the contact sheets
MAX_INPUT_ROWS = 200


def write_report(out: str | Path, path: str | Path | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Write the report of the job in ``out`` (default ``OUT/report.html``; local or a URL);
    return where it went."""
    layout = OutputLayout(str(out), storage_options)
    text = layout.read_text(layout.manifest)
    if text is None:
        raise InputError(f"{out}: no manifest.json; is this the output directory of an aesthetic-dask job?")
    manifest = json.loads(text)
    if path is not None:
        _refuse_overwriting(layout, manifest, str(path), storage_options)
    page = render(manifest, _load_samples(layout, manifest), layout.url())
    if path is None:
        atomic_write_bytes(layout.path("report.html"), page.encode("utf-8"), layout.tmp, layout.fs)
        return layout.url("report.html")
    atomic_write_bytes(str(path), page.encode("utf-8"))
    return str(path)


def _refuse_overwriting(layout: OutputLayout, manifest: dict[str, Any], path: str,
                        storage_options: dict[str, Any] | None) -> None:
    """``report -o`` never overwrites the job's own files (its report page aside) or an input."""
    from . import storage

    fs, target = storage.split(path, storage_options)
    if storage.is_local(fs):
        target = os.path.realpath(target)
    root = (os.path.realpath(layout.root) if layout.local else layout.root).rstrip("/")
    relative = target[len(root) + 1:] if type(fs) is type(layout.fs) and target.startswith(root + "/") else None
    if relative and relative != "report.html" and written_by_a_job(layout, layout.path(relative)):
        raise InputError(f"report -o {path}: that is one of the job's own files in {layout.root_url}; "
                         "write the page elsewhere (or leave -o out for OUT/report.html)")
    inputs = {os.path.realpath(i) if storage.is_local(fs) and not storage.is_url(i) else i
              for i in manifest.get("inputs_listed") or manifest.get("inputs", {})}
    if target in inputs or path in inputs:
        raise InputError(f"report -o {path}: that is one of the job's inputs; write the page elsewhere")


def kept_table(manifest: dict[str, Any]) -> list[tuple[float, int, float, bool]]:
    """(threshold, rows kept, fraction of scored rows, is the job's) at the guide thresholds and the
    job's own, from the exact histogram. With ``--filter`` criteria every row counts by
    aesthetic_score alone (the job's own too, where its threshold is a bin edge), so the column is
    one measure; what the job kept is in the summary."""
    counts = manifest["score_histogram"]["counts"]
    scored = sum(counts)
    chosen = manifest["config"]["score_threshold"]
    filtered = "rows_failing_filters" in manifest
    rows = []
    for t in sorted(set(GUIDE_THRESHOLDS) | {chosen}):
        kept = histogram.kept_at(counts, t)
        if t == chosen and not (filtered and kept is not None):
            kept = manifest["totals"]["rows_kept"]
        if kept is not None:
            rows.append((t, kept, kept / scored if scored else 0.0, t == chosen))
    return rows


def _load_samples(layout: OutputLayout, manifest: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    names = set(manifest["partitions"]["done_names"]) | set(manifest["partitions"].get("failed_names", []))
    try:
        listed = layout.fs.ls(layout.samples, detail=False)  # never globbed: OUT may be named out[v2]
    except FileNotFoundError:
        listed = []
    files = sorted(p for p in listed if p.endswith(".parquet") and p.rsplit("/", 1)[-1][: -len(".parquet")] in names)
    if len(files) > MAX_SAMPLE_FILES:
        files = [files[i] for i in np.linspace(0, len(files) - 1, MAX_SAMPLE_FILES).round().astype(int)]
    rows = [r for f in files for r in pq.read_table(f, filesystem=storage.pyarrow_filesystem(layout.fs)).to_pylist()]
    by_band: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["source"], r["row"])):
        by_band.setdefault(int(r["band"]), []).append(r)
    for band, members in by_band.items():
        if len(members) > PER_BAND:
            take = np.linspace(0, len(members) - 1, PER_BAND).round().astype(int)
            by_band[band] = [members[i] for i in take]
    return dict(sorted(by_band.items(), reverse=True))


def warm_up() -> None:
    """Import what the page draws with (matplotlib, its SVG backend: about 0.4 s) in a background
    thread while the job's partitions run, so the report at the end does not wait for it."""
    import threading

    def load() -> None:
        try:
            import matplotlib.backends.backend_svg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - the report says what is missing when it is written
            pass

    threading.Thread(target=load, name="aesthetic-dask-report-imports", daemon=True).start()


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _charts(counts: list[int], threshold: float, title: str, label: str | None = None) -> tuple[str, str]:
    """(histogram with the threshold (or ``label``'s value) marked, fraction kept as a function of
    the threshold) as SVG."""
    from matplotlib.figure import Figure

    edges = np.asarray(histogram.EDGES)
    inner = np.asarray(counts[1:-1], dtype=float)  # bins [edges[i], edges[i+1])
    nonzero = np.flatnonzero(inner)
    lo, hi = (edges[nonzero[0]], edges[nonzero[-1] + 1]) if len(nonzero) else (0.0, 10.0)
    lo, hi = max(0.0, min(lo, threshold) - 0.5), min(10.0, max(hi, threshold) + 0.5)  # the threshold always shows
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.stairs(inner, edges, fill=True, color="#4c72b0")  # one path, not 200 bars: small SVG, fast
    ax.axvline(threshold, color="#c44e52", linewidth=2, label=label or f"threshold {_t(threshold)}")
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"{title} (bins of 0.05)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")
    hist_svg = _svg(fig)

    scored = max(sum(counts), 1)
    at_or_above = np.cumsum(np.asarray(counts[::-1]))[::-1][1:] / scored  # rows >= edges[i]
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.plot(edges, at_or_above * 100, color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linewidth=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 100)
    ax.set_xlabel("threshold")
    ax.set_ylabel("% of scored rows kept")
    ax.grid(alpha=0.3)
    return hist_svg, _svg(fig)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _t(threshold: float) -> str:
    """A threshold as people write it: 5.0, 5.5, 5.43."""
    return f"{threshold:.1f}" if round(threshold, 1) == threshold else f"{threshold:g}"


def _table(headers: list[str] | None, rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers or [])
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _sample_card(r: dict[str, Any]) -> str:
    parts = []
    if r.get("thumbnail"):
        data = base64.b64encode(r["thumbnail"]).decode()
        parts.append(f'<img alt="{_e(r.get("key"))}" src="data:image/jpeg;base64,{data}">')
    parts.append(f'<div class="score">{r["aesthetic_score"]:.2f}</div>')
    parts.append(f'<div class="key">{_e(r.get("key") if r.get("key") is not None else "row " + str(r["row"]))}</div>')
    if r.get("caption"):
        parts.append(f'<div class="caption">{_e(r["caption"][:200])}</div>')
    url = r.get("url") or ""
    if url.startswith(("http://", "https://")):
        parts.append(f'<div class="url"><a href="{_e(url)}" rel="noreferrer noopener">{_e(url[:80])}</a></div>')
    return f'<div class="card">{"".join(parts)}</div>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f4f4f4}tr.chosen td{background:#fff3cd;font-weight:bold}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{width:140px;font-size:11px;border:1px solid #eee;padding:4px}
.card img{width:128px;height:128px;object-fit:contain;background:#f8f8f8;display:block}
.score{font-weight:bold;font-size:13px}.key,.url{word-break:break-all;color:#555}.caption{color:#333}
.warn{background:#fdecea;border:1px solid #f5c2c0;padding:8px}.muted{color:#777}
"""


def render(manifest: dict[str, Any], samples: dict[int, list[dict[str, Any]]], out: str) -> str:
    """The report page's HTML."""
    t = manifest["totals"]
    counts = manifest["score_histogram"]["counts"]
    threshold = manifest["config"]["score_threshold"]
    scored = sum(counts)
    timings = manifest.get("timings", {})
    run = manifest.get("this_run", {})
    weights = manifest.get("weights", {})
    clip = manifest.get("clip")
    unit = columns.unit(manifest["job"])
    rate = run.get("rows_processed", 0) / run["compute_s"] if run.get("compute_s") else None
    failing = manifest.get("rows_failing_filters")  # --filter: each criterion and the valid rows failing it
    summary_rows = [
        [f"{unit} in", f"{t['rows_in']:,}" + (f" (+ rows unknown in {t['rows_unknown_partitions']} failed partitions)"
                                              if t.get("rows_unknown_partitions") else "")],
        ["kept (all criteria)" if failing is not None else "kept (>= threshold)", f"{t['rows_kept']:,}"],
        ["below or filtered" if failing is not None else "below threshold", f"{t['rows_below_threshold']:,}"],
        ["errors", f"{t['rows_error']:,}"],
        ["threshold", _t(threshold)],
        *([["filters", "; ".join(f"{c} (failed by {n:,} rows)" for c, n in failing.items())]] if failing is not None else []),
        ["status", manifest["status"]],
        ["predictor", f"{weights.get('name') or weights.get('source')} (sha256 {weights.get('sha256')})"],
    ]
    if clip:
        summary_rows.append(["CLIP", f"{clip.get('model')} / {clip.get('pretrained')}"])
    caveats = "".join(f'<p class="warn"><b>{_e(label)}:</b> {_e(text)}.</p>' for label, text in clip_caveats(manifest))
    summary_rows += [
        ["inputs", f"{len(manifest['inputs']) + len(manifest.get('failed_inputs', {})):,}"],
        ["duration", f"{timings.get('elapsed_s', 0):.1f} s (last run)"],
        ["throughput", f"{rate:,.0f} {unit}/s" if rate else "nothing processed in the last run"],
        ["quantiles", ", ".join(f"{k} {v:.2f}" for k, v in manifest.get("score_quantiles", {}).items() if v is not None)],
    ]
    hist_svg, kept_svg = _charts(counts, threshold, "aesthetic_score")
    guide = kept_table(manifest)
    guide_html = "<table><thead><tr><th>threshold</th><th>rows kept</th><th>% kept</th></tr></thead><tbody>" + "".join(
        f'<tr class="{"chosen" if chosen else ""}"><td>{_t(thr)}{" (this job)" if chosen else ""}</td>'
        f"<td>{kept:,}</td><td>{frac * 100:.1f}%</td></tr>" for thr, kept, frac, chosen in guide) + "</tbody></table>"
    warn = ""
    if scored and not 0.01 <= t["rows_kept"] / scored <= 0.99:
        warn = (f'<p class="warn">The threshold {_t(threshold)} kept {t["rows_kept"] / scored:.1%} of the scored rows. '
                "Scores land roughly in 1..10; see the table for what other thresholds keep.</p>")

    sections = [f"<h2>Samples by score band</h2><p class='muted'>Up to {PER_BAND} per band, sampled during the run.</p>"]
    if not samples:
        sections.append("<p class='muted'>No samples (the job ran with samples off, or nothing was scored).</p>")
    for band, rows in samples.items():
        label = f"{band}.0 – {band + 1}.0" if band < 10 else ">= 10"
        sections.append(f"<h3>score {label}</h3><div class='cards'>{''.join(_sample_card(r) for r in rows)}</div>")

    if failing:
        guide_html += ("<p class='muted'>Rows kept by aesthetic_score alone: the filters "
                       f"({_e(', '.join(failing))}) keep fewer.</p>")
    marks = {}  # a filtered column's line marks its own criterion
    for criterion in map(parse, failing or {}):
        marks.setdefault(criterion.column, (criterion.value, str(criterion)))
    extra = ""
    for column, entry in manifest.get("extra_score_histograms", {}).items():
        value, criterion = marks.get(column, (threshold, None))
        svg, _ = _charts(entry["counts"], value, column, criterion and f"filter {criterion}")
        extra += f"<h3>{_e(column)}</h3>{svg}"
    if extra:
        extra = ("<h2>Extra heads</h2><p class='muted'>Histograms of the --extra-scores columns (the line marks the "
                 "column's --filter, else the aesthetic_score threshold, for scale).</p>" + extra)

    reasons = manifest.get("error_reasons", {})
    errors = "<h2>Errors</h2>"
    errors += _table(["reason", "rows", "example keys"], [[k, f"{v['count']:,}", ", ".join(map(str, v["examples"]))]
                                                         for k, v in reasons.items()]) if reasons else "<p class='muted'>No error rows.</p>"
    failed = manifest.get("failed_inputs", {})
    failures = [[src, f] for src, e in manifest["inputs"].items() for f in e.get("failures", [])]
    if failed or failures:
        errors += "<h3>Unreadable inputs and failed partitions</h3>" + _table(["input", "why"], [[k, v] for k, v in failed.items()] + failures)

    inputs = sorted(manifest["inputs"].items())
    input_rows = [[src, f"{e['rows_in']:,}", f"{e['rows_kept']:,}", f"{e['rows_below_threshold']:,}", f"{e['rows_error']:,}"]
                  for src, e in inputs[:MAX_INPUT_ROWS]]
    per_input = "<h2>Per input</h2>" + _table(["input", "rows in", "kept", "below", "errors"], input_rows)
    if len(inputs) > MAX_INPUT_ROWS:
        per_input += f"<p class='muted'>... and {len(inputs) - MAX_INPUT_ROWS:,} more inputs (see manifest.json).</p>"

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>aesthetic-dask report: {_e(out)}</title>
<style>{_STYLE}</style></head><body>
<h1>aesthetic-dask {_e(manifest['job'])}: {_e(out)}{" (demo CLIP)" if is_demo(manifest) else ""}</h1>
<p class="muted">Generated {generated} from {_e(out.rstrip('/') + '/manifest.json')}.</p>
<h2>Summary</h2>{caveats}{_table(None, summary_rows)}
<h2>Score distribution</h2>{warn}{hist_svg}
<h2>Rows kept as a function of the threshold</h2>{kept_svg}{guide_html}
{''.join(sections)}
{extra}
{errors}
{per_input}
</body></html>
"""
