"""Command line: ``aesthetic-dask run|score|refilter|report|download``. A thin wrapper over the Python API.

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

from . import interrupts
from .config import CHOICES, cli_options
from .errors import EXIT_FAILED, EXIT_OK
from .storage import is_url

log = logging.getLogger("aesthetic_dask")
_STARTED = time.time()  # when the command started: the summary's elapsed time covers all of it


def _add_job_options(p: argparse.ArgumentParser, job: str) -> None:
    """The job's arguments: inputs and OUT, then one flag per option of the schema."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    _add_schema_options(p, job)
    p.add_argument("--overwrite", action="store_true", help="replace an OUT written by a different job")
    p.add_argument("--prune-missing", action="store_true",
                   help="remove the output of inputs that are gone (by default it is kept, and listed)")


def _add_schema_options(p: argparse.ArgumentParser, command: str) -> None:
    """One flag per option of the schema the command takes (:func:`config.cli_options`), then
    ``--config``; defaults come from the config (None = not given)."""
    for f in cli_options(command):
        meta, kind = f.metadata, f.type
        names = [meta["flag"], *(f"--{a.replace('_', '-')}" for a in meta["aliases"])]
        if f.name == "verbose":
            names.insert(0, "-v")
        kwargs: dict = {"dest": f.name, "help": meta["help"]}
        if kind.startswith("bool"):
            # --report defaults on, so it has its --no- form; the others are off unless given.
            kwargs["action"] = argparse.BooleanOptionalAction if f.name == "report" else "store_const"
            if f.name != "report":
                kwargs["const"] = True
        else:
            kwargs["metavar"] = meta["metavar"]
            if kind.startswith(("int", "float")):
                kwargs["type"] = int if kind.startswith("int") else float
            if f.name in CHOICES:
                kwargs["choices"], kwargs["metavar"] = CHOICES[f.name], None
            if meta["repeat"]:
                kwargs["action"] = "append"
        if command in meta["required_by"]:
            kwargs["required"] = True
        p.add_argument(*names, **kwargs)
    p.add_argument("--config", metavar="FILE", help="YAML config (see conf/default.yaml)")


class _Parser(argparse.ArgumentParser):
    """Flags are never abbreviated (``--model`` is not ``--model-dir``); an unknown one gets the
    usual error and, where one is close, the flag it resembles."""

    active: argparse.ArgumentParser | None = None  # the (sub)command parser that parsed last

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, *args, **kwargs):
        _Parser.active = self
        return super().parse_known_args(*args, **kwargs)

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:"):
            actions = (_Parser.active or self)._actions
            known = [o for action in actions for o in action.option_strings if o.startswith("--") and o != "--help"]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1, cutoff=0.6) if arg.startswith("--") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aesthetic-dask",
        description="Score and filter image datasets by predicted aesthetic quality on Dask.",
        epilog="Exit codes: 0 done, 3 done but some inputs unreadable, 1 failed, 2 bad usage or input.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"aesthetic-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    score = sub.add_parser("score", help="precomputed CLIP embeddings -> aesthetic scores -> filtered Parquet")
    _add_job_options(score, "score")
    score.set_defaults(handler=_cmd_score)

    run = sub.add_parser("run", help="WebDataset shards / image Parquet -> CLIP embeddings -> scores -> filtered Parquet")
    _add_job_options(run, "run")
    run.set_defaults(handler=_cmd_run)

    refilter = sub.add_parser("refilter", help="re-split a finished OUT at another threshold from its scores (no CLIP)")
    refilter.add_argument("out", metavar="OUT", help="the job's output directory")
    _add_schema_options(refilter, "refilter")
    refilter.set_defaults(handler=_cmd_refilter)

    report = sub.add_parser("report", help="write the HTML report of a job's OUT (histogram, thresholds, samples)")
    report.add_argument("out", metavar="OUT", help="the job's output directory")
    report.add_argument("-o", "--output", metavar="FILE", help="where to write the page (default OUT/report.html)")
    _add_schema_options(report, "report")
    report.set_defaults(handler=_cmd_report)

    download = sub.add_parser("download", help="prefetch the configured heads and CLIP weights into a model directory")
    download.add_argument("--list", action="store_true", help="list the registered heads, and which are cached, and exit")
    download.add_argument("--all", action="store_true", help="every registered head, not only the configured ones")
    download.add_argument("--skip-clip", action="store_true", help="only the aesthetic predictor, not the CLIP weights")
    _add_schema_options(download, "download")
    download.set_defaults(handler=_cmd_download)
    return parser


def _config_from_args(args: argparse.Namespace):
    """The config: defaults, ``--config``, then the flags the command was given (every option of
    the schema it takes)."""
    from .config import load_config

    return load_config(args.config, **{f.name: getattr(args, f.name, None) for f in cli_options(args.command)})


def _check_output(output: str, storage_options: dict) -> Path | None:
    """OUT must be a directory (or not exist yet), or a reachable bucket. Returns where the job
    log goes: the local OUT, or None (a remote OUT gets the log uploaded at the end)."""
    from .storage import check_output

    check_output(output, storage_options)
    return None if is_url(output) else Path(output.removeprefix("file://"))


def _upload_log(output: str, storage_options: dict) -> None:
    """A remote OUT's job.log: the per-run log, copied there at the end."""
    if _job_log is None or not _job_log.accepted or not is_url(output):  # a refused run leaves OUT as it was
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
    from .summary import summary
    from .score_job import score_job

    config = _config_from_args(args)
    _setup_logging(config.verbose, _check_output(args.output, config.storage_options), config.resolved_model_dir)
    try:
        manifest, code = score_job(args.inputs, args.output, config, overwrite=args.overwrite, started=_STARTED,
                                   prune_missing=args.prune_missing)
    finally:
        _upload_log(args.output, config.storage_options)
    print(summary(manifest, args.output), file=sys.stderr)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from .image_job import run_job
    from .summary import summary

    config = _config_from_args(args)
    _setup_logging(config.verbose, _check_output(args.output, config.storage_options), config.resolved_model_dir)
    try:
        manifest, code = run_job(args.inputs, args.output, config, overwrite=args.overwrite, started=_STARTED,
                                 prune_missing=args.prune_missing)
    finally:
        _upload_log(args.output, config.storage_options)
    print(summary(manifest, args.output), file=sys.stderr)
    return code


def _cmd_refilter(args: argparse.Namespace) -> int:
    from .refilter import refilter
    from .summary import summary

    config = _config_from_args(args)
    manifest, code = refilter(args.out, config.score_threshold, config.storage_options, report=config.report)
    print(summary(manifest, args.out), file=sys.stderr)
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    config = _config_from_args(args)
    print(f"report: {write_report(args.out, args.output, config.storage_options)}")
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    from .models.fetch import cached_weights, download_all
    from .models.registry import REGISTRY

    config = _config_from_args(args)
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


def command() -> int:
    """The ``aesthetic-dask`` process: :func:`main`, then exit with its code whatever signal comes late."""
    interrupts.quiet_teardown()
    code = main()
    interrupts.exit_on_signal(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aesthetic-dask`` command."""
    global _STARTED
    _STARTED = time.time()
    args = build_parser().parse_args(argv)
    previous = interrupts.install()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return _run(handler, args)
    finally:
        interrupts.restore(previous)


def _run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from .errors import AestheticDaskError

    try:
        return handler(args)
    except AestheticDaskError as exc:  # the one mapping: each error class carries its exit code
        log.debug("%s", type(exc).__name__, exc_info=True)
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, interrupts.Terminated) else "interrupted"
        log.debug("%s", what, exc_info=True)  # the job log only: the console gets the one line below
        return _fail(f"{what}; re-run the same command to resume", EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback goes to the log
        log.debug("job failed\n%s", traceback.format_exc())  # the job log: the console gets the one line
        if _job_log is None and not isinstance(exc, OSError):  # a full or read-only disk is the machine's, not a bug
            traceback.print_exc()
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
