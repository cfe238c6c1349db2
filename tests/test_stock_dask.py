"""Stock Dask as users already run it (issue 27): `dask worker` with Dask's defaults, a default
`LocalCluster` from a script on stdin (a notebook's stand-in), configs switched back and forth in
one process, and a nightly re-run that never imports torch, torchvision or open_clip."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import aesthetic_dask as ad
from aesthetic_dask.cli import main
from conftest import loopback_dask, photo_bytes, write_shard

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TESTS = Path(__file__).resolve().parent

# Installed in every Python process whose PYTHONPATH holds its folder: torch, torchvision and
# open_clip stay findable (installed) but importing any of them fails.
BLOCKER = '''
import importlib.abc, importlib.machinery, sys

BLOCKED = {"torch", "torchvision", "open_clip"}


class BlockedLoader(importlib.abc.Loader):
    def __init__(self, name):
        self.name = name

    def create_module(self, spec):
        raise ImportError(f"import of {self.name} is blocked by the test")

    def exec_module(self, module):
        raise ImportError(f"import of {self.name} is blocked by the test")


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = BlockedLoader(name)
        return spec


sys.meta_path.insert(0, Blocker())
'''


@pytest.fixture
def shards(tmp_path) -> Path:
    d = tmp_path / "shards"
    for s in range(3):
        write_shard(d / f"{s:05d}.tar", [(f"s{s}_{i:03d}.jpg", photo_bytes(PHOTOS[(s + i) % 4])) for i in range(6)])
    return d


def clip_args(tiny_clip, tiny_weights, tmp_path) -> list[str]:
    return ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models"),
            "--threshold", "0", "--no-report"]


def cli(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aesthetic_dask", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def blocked_env(tmp_path: Path) -> dict:
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


# --- `dask worker` as users start it ----------------------------------------------------------------


def test_run_on_dask_workers_started_with_daskss_defaults(tmp_path, shards, tiny_clip, tiny_weights):
    """`dask scheduler` + `dask worker` with no options and no variables: daemonic workers under a
    nanny (Dask's defaults), as managed deployments start them."""
    with loopback_dask(tmp_path, nthreads=None) as (scheduler_file, _, _):
        proc = cli("run", shards, "-o", tmp_path / "out", *clip_args(tiny_clip, tiny_weights, tmp_path),
                   "--scheduler-file", scheduler_file, "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    m = manifest(tmp_path / "out")
    assert m["totals"]["rows_in"] == 18 and m["totals"]["rows_kept"] == 18 and m["status"] == "done"
    assert m["cluster"]["workers"] == 1
    assert "daemonic" not in proc.stderr and "DASK_DISTRIBUTED" not in proc.stderr


def test_gpu_routed_workers_run_a_partition_per_thread_and_a_starved_pool_is_named(tmp_path, shards, tiny_clip,
                                                                                   tiny_weights):
    """Workers started `--resources GPU=1` (daemonic, default config): the tasks ask a GPU share
    that lets every thread run a partition, and a worker with fewer threads than decode processes
    gets one warning line naming the fix."""
    with loopback_dask(tmp_path, nthreads=1, worker_args=("--resources", "GPU=1")) as (scheduler_file, _, _):
        proc = cli("run", shards, "-o", tmp_path / "out", *clip_args(tiny_clip, tiny_weights, tmp_path),
                   "--scheduler-file", scheduler_file, "--decode-processes", "2")
    assert proc.returncode == 0, proc.stderr
    assert manifest(tmp_path / "out")["totals"]["rows_kept"] == 18
    warnings = [line for line in proc.stderr.splitlines() if "decode pool has 2 processes" in line]
    assert len(warnings) == 1 and "--nthreads 3" in warnings[0], proc.stderr


def test_the_gpu_share_of_a_task_fills_every_worker_thread():
    from aesthetic_dask.cluster import ClusterOptions, starved_workers, task_resources

    config = ClusterOptions(num_gpus_per_worker=0.25)
    workers = {"a": {"nthreads": 16, "resources": {"GPU": 1}}, "b": {"nthreads": 15, "resources": {"GPU": 1}},
               "cpu": {"nthreads": 4, "resources": {}}}
    share = task_resources(config, "cuda", local=False, workers=workers)["GPU"]
    assert share < 0.25 and int(1 / share) >= 16 and 15 * share <= 1  # every thread of both GPU workers
    assert task_resources(config, "cuda", local=False, workers={})["GPU"] == 0.25  # nothing known: NeMo's share
    few = {"a": {"nthreads": 4, "resources": {"GPU": 1}}}
    share = task_resources(config, "cuda", local=False, workers=few)["GPU"]
    assert starved_workers(few, {"a": 15}, {"GPU": share})[0].startswith("warning: worker a runs 4 partition(s) at once")
    assert starved_workers(workers, {"a": 15, "b": 14}, {"GPU": task_resources(config, "cuda", False, workers)["GPU"]}) == []


# --- A notebook: a default LocalCluster, configs switched, a script on stdin -------------------------


def test_a_default_local_cluster_from_a_notebook_serves_every_config(tmp_path, shards, tiny_clip, tiny_weights):
    """`Client(LocalCluster(n_workers=1))` (processes, nanny, daemonic workers) from a main module
    without a file, as a notebook's (``python -c``; Dask's own LocalCluster cannot start from
    ``python -``), no main guard; batch 2, then 32, then 2 again in one session give the same rows."""
    script = textwrap.dedent(f"""
        import numpy as np
        from distributed import Client, LocalCluster
        import aesthetic_dask as ad

        client = Client(LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None))
        results = []
        for batch in (2, 32, 2):
            cfg = ad.load_config(clip_model_config={str(tiny_clip['config'])!r},
                                 clip_pretrained={str(tiny_clip['checkpoint'])!r},
                                 aesthetic_weights={str(tiny_weights['safetensors'])!r},
                                 model_dir={str(tmp_path / 'models')!r}, model_inference_batch_size=batch)
            frame = ad.embed_images(ad.read_webdataset({str(shards)!r}), cfg).compute()
            results.append(frame.sort_values("key"))
        first = np.stack(results[0]["embedding"].to_numpy())
        for other in results[1:]:
            assert list(other["key"]) == list(results[0]["key"])
            np.testing.assert_allclose(np.stack(other["embedding"].to_numpy()), first, atol=1e-5)
        print("ROWS", len(results[0]), int(results[0]["error"].isna().sum()))
        client.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS 18 18" in proc.stdout
    assert "PoolError" not in proc.stderr and "daemonic" not in proc.stderr


def test_configs_switched_in_one_process_share_one_pool_and_close_nothing(shards, tiny_clip, tiny_weights, tmp_path):
    from aesthetic_dask.pipeline import pool as pool_module

    frames = []
    for batch, processes in ((2, 1), (32, 2), (2, 1)):
        cfg = ad.load_config(clip_model_config=str(tiny_clip["config"]), clip_pretrained=str(tiny_clip["checkpoint"]),
                             aesthetic_weights=str(tiny_weights["safetensors"]), model_dir=str(tmp_path / "models"),
                             model_inference_batch_size=batch, decode_processes=processes)
        frames.append(ad.embed_images(ad.read_webdataset(str(shards)), cfg).compute(scheduler="sync"))
        pool = pool_module._POOL
        assert pool is not None and not pool.closed
    assert pool.processes == 2  # grown for the larger config, never closed for the smaller
    for frame in frames[1:]:
        np.testing.assert_allclose(np.stack(frame["embedding"].to_numpy()), np.stack(frames[0]["embedding"].to_numpy()),
                                   atol=1e-5)


# --- A night with nothing new -------------------------------------------------------------------------


def test_a_nightly_rerun_with_nothing_new_never_imports_torch_or_open_clip(tmp_path, shards, tiny_clip, tiny_weights):
    out = tmp_path / "out"
    args = ["run", str(shards), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path)]
    assert main(args) == 0
    blocked = blocked_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=blocked)
    assert check.returncode != 0 and "blocked by the test" in check.stderr  # the blocker works
    proc = cli(*args, env=blocked)
    assert proc.returncode == 0, proc.stderr
    assert manifest(out)["this_run"]["partitions_processed"] == 0
    # The other commands never need them either.
    assert cli("report", out, "-o", tmp_path / "report.html", env=blocked).returncode == 0
    refilter = cli("refilter", out, "--threshold", "0.5", env=blocked)
    assert refilter.returncode == 0, refilter.stderr


def test_the_lazy_image_graph_is_built_without_torch_or_open_clip(tmp_path, shards, tiny_clip, tiny_weights):
    """The notebook's lazy graph: its meta (the embedding width) from open_clip's config files."""
    script = textwrap.dedent(f"""
        import sys
        import aesthetic_dask as ad

        cfg = ad.load_config(clip_model_config={str(tiny_clip['config'])!r},
                             clip_pretrained={str(tiny_clip['checkpoint'])!r},
                             aesthetic_weights={str(tiny_weights['safetensors'])!r}, model_dir={str(tmp_path / 'models')!r})
        lazy = ad.embed_images(ad.read_webdataset({str(shards)!r}), cfg)
        default = ad.embed_images(ad.read_webdataset({str(shards)!r}), ad.load_config(model_dir={str(tmp_path / 'm2')!r}))
        print("META", lazy._meta["embedding"].dtype, default._meta["embedding"].dtype, lazy.npartitions)
        assert not any(m.split(".")[0] in ("torch", "torchvision", "open_clip") for m in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300,
                          env=blocked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "META fixed_size_list<item: float>[768][pyarrow] fixed_size_list<item: float>[768][pyarrow] 3" \
        in proc.stdout, proc.stdout


# --- The CPU default does not oversubscribe -----------------------------------------------------------


def test_cpu_model_threads_follow_the_bound():
    from aesthetic_dask.pipeline.encoder import CpuThreads

    # A near-free model: the queue of crops is dry and the model waits: its threads go to the decoders.
    threads = CpuThreads(cores=8, fixed=False)
    changes = [threads.observe(dry=True, idle_s=0.05, busy_s=0.005) for _ in range(3 * CpuThreads.WINDOW)]
    assert [c for c in changes if c is not None] == [4, 2, 1] and threads.threads == 1
    # A heavy model: every batch full: back up to the cores, one at a time, and no further.
    changes = [threads.observe(dry=False, idle_s=0.0, busy_s=2.0) for _ in range(10 * CpuThreads.WINDOW)]
    assert [c for c in changes if c is not None] == list(range(2, 9)) and threads.threads == 8
    # The first batch of a job or a partition's end: one dry batch in a window changes nothing.
    changes = [threads.observe(dry=i == 0, idle_s=1.0 if i == 0 else 0.0, busy_s=2.0) for i in range(CpuThreads.WINDOW)]
    assert changes == [None] * CpuThreads.WINDOW
    fixed = CpuThreads(cores=8, fixed=True)  # AESTHETIC_DASK_TORCH_THREADS
    assert all(fixed.observe(True, 1.0, 0.0) is None for _ in range(3 * CpuThreads.WINDOW)) and fixed.threads == 8
