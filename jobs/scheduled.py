"""Scheduled entry point: run the job a YAML in conf/ describes, on the cluster Dask's configuration names.

    DASK_SCHEDULER_ADDRESS=tcp://host:8786 python jobs/scheduled.py conf/scheduled.example.yaml
    DASK_SCHEDULER_FILE=/shared/scheduler.json python jobs/scheduled.py conf/my-job.yaml

The CLI itself honours Dask's configuration (``scheduler-address``, ``scheduler-file``, which
those variables set); with neither, the job starts a local cluster (the embedded default). The YAML
holds ``job`` (score or run), ``inputs``, ``output``, ``overwrite``, ``prune_missing`` and any
config option. Exit codes are the CLI's: 0 done, 3 partial (some inputs unreadable), 1 failed, 2
bad usage or input.

The nightly pattern: the same YAML, the same OUT, every night. Each run processes only what is
new (and what changed since it was read), keeps the output of inputs that went away (listed in
the manifest as ``missing_inputs``; ``prune_missing: true`` removes it), and leaves OUT equal to a
clean run over the inputs there are now. To choose another threshold afterwards, run
``aesthetic-dask refilter OUT --threshold T`` (no CLIP); then set ``score_threshold`` to T here.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import yaml

JOB_KEYS = ("job", "inputs", "output", "overwrite", "prune_missing")


def build_argv(spec_path: str, config_file: str) -> list[str]:
    """The `aesthetic-dask` arguments for the job in ``spec_path``; its options go to ``config_file``."""
    spec = yaml.safe_load(Path(spec_path).read_text()) or {}
    missing = [k for k in ("job", "inputs", "output") if k not in spec]
    if missing:
        raise SystemExit(f"{spec_path}: missing {', '.join(missing)}")
    if spec["job"] not in ("score", "run"):
        raise SystemExit(f"{spec_path}: job must be score or run, got {spec['job']!r}")
    inputs = spec["inputs"] if isinstance(spec["inputs"], list) else [spec["inputs"]]
    Path(config_file).write_text(yaml.safe_dump({k: v for k, v in spec.items() if k not in JOB_KEYS}))
    argv = [spec["job"], *map(str, inputs), "-o", str(spec["output"]), "--config", config_file]
    return argv + (["--overwrite"] if spec.get("overwrite") else []) + (["--prune-missing"] if spec.get("prune_missing") else [])


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    from aesthetic_dask.cli import main as cli

    fd, config_file = tempfile.mkstemp(prefix="aesthetic-dask-", suffix=".yaml")
    os.close(fd)
    try:
        return cli(build_argv(sys.argv[1], config_file))
    finally:
        os.unlink(config_file)


if __name__ == "__main__":
    raise SystemExit(main())
