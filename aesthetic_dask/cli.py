"""Command line: ``aesthetic-dask score|download``. A thin wrapper over the Python API.

Exit codes: 0 done; 3 done, but some inputs could not be read whole; 1 failed; 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .errors import EXIT_FAILED, EXIT_OK

log = logging.getLogger("aesthetic_dask")
_STARTED = time.time()  # when the command started: the summary's elapsed time covers all of it


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by the jobs; defaults come from the config (None = not given)."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.add_argument("--threshold", type=float, help="keep rows with aesthetic_score >= T (default 0.5)")
    p.add_argument("--aesthetic-weights", metavar="W", help="registry name or local .pth/.safetensors")
    p.add_argument("--extra-scores", metavar="NAME=W[,NAME=W...]",
                   help="more heads scored from the same embedding, one float32 column NAME each")
    p.add_argument("--model-dir", metavar="D", help="weights download/cache directory")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs, e.g. '{\"anon\": true}'")
    p.add_argument("--keep-embeddings", action="store_const", const=True, help="write the embedding column")
    p.add_argument("--keep-rejected", action="store_const", const=True, help="write below-threshold rows to OUT/rejected/")
    p.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--scheduler-file", metavar="FILE", help="existing Dask cluster's scheduler file")
    p.add_argument("--n-workers", type=int, help="local cluster: worker count")
    p.add_argument("--threads-per-worker", type=int, help="local cluster: threads per worker")
    p.add_argument("--partition-rows", type=int, help="rows per partition (Parquet row groups are not split)")
    p.add_argument("--config", metavar="FILE", help="YAML config (see conf/default.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT written by a different job")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                   help="write OUT/report.html at the end (default: on)")
    p.add_argument("-v", "--verbose", action="store_const", const=True, help="log per-partition progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aesthetic-dask",
        description="Score and filter image datasets by predicted aesthetic quality on Dask.",
        epilog="Exit codes: 0 done, 3 done but some inputs unreadable, 1 failed, 2 bad usage or input.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"aesthetic-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="precomputed CLIP embeddings -> aesthetic scores -> filtered Parquet")
    _add_common(score)
    score.add_argument("--embedding-column", metavar="NAME", help="embedding column (default: embedding)")
    score.set_defaults(handler=_cmd_score)

    run = sub.add_parser("run", help="WebDataset shards / image Parquet -> CLIP embeddings -> scores -> filtered Parquet")
    _add_common(run)
    run.add_argument("--batch-size", type=int, help="images per model call (default 32)")
    run.add_argument("--clip-model", metavar="NAME", help="open_clip model name (default ViT-L-14-quickgelu)")
    run.add_argument("--clip-pretrained", metavar="TAG_OR_PATH", help="open_clip pretrained tag or local checkpoint (default openai)")
    run.add_argument("--clip-model-config", metavar="JSON", help="open_clip model-config JSON; its file stem is the model name")
    run.add_argument("--json-fields", metavar="A,B:int64", help="sidecar .json fields to add as typed columns")
    run.add_argument("--image-column", metavar="NAME", help="image bytes column of Parquet inputs (default image)")
    run.add_argument("--max-image-pixels", type=int, help="larger images are errors, never decoded")
    run.add_argument("--max-sidecar-bytes", type=int, help="larger .txt/.json sidecars make an error row (default 65536)")
    run.add_argument("--decode-processes", "--decode-threads", dest="decode_processes", type=int,
                     help="host processes decoding images per model worker (default: from the cores)")
    run.add_argument("--image-decoder", choices=("auto", "pil", "torch"),
                     help="pil (Pillow), torch (torchvision) or auto (default: torch)")
    run.add_argument("--write-shards", metavar="DIR", help="also write kept samples as WebDataset tars into DIR")
    run.set_defaults(handler=_cmd_run)

    report = sub.add_parser("report", help="write the HTML report of a job's OUT (histogram, thresholds, samples)")
    report.add_argument("out", metavar="OUT", help="the job's output directory")
    report.add_argument("-o", "--output", metavar="FILE", help="where to write the page (default OUT/report.html)")
    report.add_argument("--storage-options", metavar="JSON", help="fsspec options when OUT is a URL")
    report.add_argument("--config", metavar="FILE")
    report.set_defaults(handler=_cmd_report)

    download = sub.add_parser("download", help="prefetch the configured heads and CLIP weights into a model directory")
    download.add_argument("--model-dir", metavar="DIR", help="target directory (default: the config's model_dir)")
    download.add_argument("--list", action="store_true", help="list the registered heads, and which are cached, and exit")
    download.add_argument("--all", action="store_true", help="every registered head, not only the configured ones")
    download.add_argument("--aesthetic-weights", metavar="W", help="the head to prefetch (default: the config's)")
    download.add_argument("--extra-scores", metavar="NAME=W[,NAME=W...]", help="more heads to prefetch")
    download.add_argument("--skip-clip", action="store_true", help="only the aesthetic predictor, not the CLIP weights")
    download.add_argument("--config", metavar="FILE")
    download.set_defaults(handler=_cmd_download)
    return parser


def _config_from_args(args: argparse.Namespace, keys: tuple[str, ...]):
    from .config import load_config

    overrides = {k: getattr(args, k, None) for k in keys}
    return load_config(args.config, **overrides)


_JOB_KEYS = (
    "threshold", "aesthetic_weights", "model_dir", "keep_embeddings", "keep_rejected", "scheduler",
    "scheduler_file", "n_workers", "threads_per_worker", "partition_rows", "verbose", "extra_scores", "report",
    "storage_options",
)


def _check_output(output: str, storage_options: dict) -> Path | None:
    """OUT must be a directory (or not exist yet), or a reachable bucket. Returns where the job
    log goes: the local OUT, or None (a remote OUT gets the log uploaded at the end)."""
    from .storage import check_output

    check_output(output, storage_options)
    return None if "://" in output and not output.startswith("file://") else Path(output.removeprefix("file://"))


def _upload_log(output: str, storage_options: dict) -> None:
    """A remote OUT's job.log: the per-run log, copied there at the end."""
    if _job_log is None or "://" not in output or output.startswith("file://"):
        return
    from .storage import join, split

    path = _job_log.spill()
    if path is not None:
        try:
            fs, root = split(output, storage_options)
            fs.put_file(str(path), join(root, "job.log"))
        except Exception:  # noqa: BLE001 - the log stays in the local cache; it is named in errors
            log.debug("could not upload the job log", exc_info=True)


def _cmd_score(args: argparse.Namespace) -> int:
    from .job import summary
    from .score_job import score_job

    config = _config_from_args(args, _JOB_KEYS + ("embedding_column",))
    _setup_logging(config.verbose, _check_output(args.output, config.storage_options), config.resolved_model_dir)
    try:
        manifest, code = score_job(args.inputs, args.output, config, overwrite=args.overwrite, started=_STARTED)
    finally:
        _upload_log(args.output, config.storage_options)
    print(summary(manifest, args.output), file=sys.stderr)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from .image_job import run_job
    from .job import summary

    config = _config_from_args(args, _JOB_KEYS + (
        "batch_size", "clip_model", "clip_pretrained", "clip_model_config", "json_fields", "image_column",
        "max_image_pixels", "max_sidecar_bytes", "decode_processes", "write_shards", "image_decoder",
    ))
    _setup_logging(config.verbose, _check_output(args.output, config.storage_options), config.resolved_model_dir)
    try:
        manifest, code = run_job(args.inputs, args.output, config, overwrite=args.overwrite, started=_STARTED)
    finally:
        _upload_log(args.output, config.storage_options)
    print(summary(manifest, args.output, unit="images"), file=sys.stderr)
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    config = _config_from_args(args, ("storage_options",))
    print(f"report: {write_report(args.out, args.output, config.storage_options)}")
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    from .models.fetch import cached_weights, download_all
    from .models.registry import REGISTRY

    config = _config_from_args(args, ("model_dir", "aesthetic_weights", "extra_scores"))
    model_dir = config.resolved_model_dir
    if args.list:
        for name, entry in REGISTRY.items():
            cached = cached_weights(name, model_dir)
            print(f"{name}  [{'cached: ' + str(cached.path) if cached else 'not cached'}]")
            print(f"  {entry.description}; {entry.license}; expects CLIP {entry.clip}; layout {entry.spec.layout}")
            for src in entry.sources:
                print(f"  {src.url}" + (f"  sha256={src.sha256}" if src.sha256 else ""))
        return EXIT_OK
    names = list(REGISTRY) if args.all else [w for w in (config.aesthetic_weights, *config.extra_scores.values()) if w in REGISTRY]
    for w in download_all(model_dir, names):
        print(f"{w.name}: {w.source} -> {w.path} (sha256 {w.sha256})")
    if not args.skip_clip:
        from .models.clip import download_clip

        print(f"open_clip {config.clip_model} {config.clip_pretrained} -> {download_clip(config)}")
    return EXIT_OK


_job_log = None  # logs.JobLogHandler of this run


def _setup_logging(verbose: bool, out: Path | None, cache_dir: Path | None = None) -> None:
    """Console logging at INFO with -v; full details always go to the job log (OUT/job.log)."""
    global _job_log
    from .config import default_cache_dir
    from .logs import setup

    _job_log = setup(verbose, out, cache_dir or default_cache_dir())


def _fail(message: str, code: int) -> int:
    path = _job_log.spill() if _job_log is not None else None
    where = f" (details: {path})" if path else ""
    print(f"aesthetic-dask: error: {message}{where}", file=sys.stderr)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill` ending the job), handled like Ctrl-C: one line, the log, exit 1."""


def _on_sigterm_interrupt() -> object:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aesthetic-dask`` command."""
    global _STARTED
    _STARTED = time.time()
    args = build_parser().parse_args(argv)
    previous = _on_sigterm_interrupt()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return _run(handler, args)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from .errors import AestheticDaskError

    try:
        return handler(args)
    except AestheticDaskError as exc:  # the one mapping: each error class carries its exit code
        log.debug("%s", type(exc).__name__, exc_info=True)
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        log.debug("%s", what, exc_info=True)  # the job log only: the console gets the one line below
        return _fail(f"{what}; re-run the same command to resume", EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback goes to the log
        log.error("job failed\n%s", traceback.format_exc())
        if _job_log is None:
            traceback.print_exc()
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
