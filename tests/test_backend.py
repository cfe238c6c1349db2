"""The array backend is decided on the worker by what it has (issue 11, the CPU-testable part)."""

import json
import subprocess
import sys

import numpy as np

from aesthetic_dask.pipeline.device import array_module
from aesthetic_dask.models.heads import AestheticPredictor
from aesthetic_dask.score import score_arrow
from aesthetic_dask.models.heads import LAYOUTS
from conftest import embedding_array, loopback_dask, random_state_dict, write_embeddings


class DeviceArrays:
    """numpy dressed as a device array module: arrays come back only through ``.get()``, as cupy's
    do, so the device code path (copy in, compute, copy scores out) runs on CPU."""

    __name__ = "fakecupy"

    class Array(np.ndarray):
        def get(self) -> np.ndarray:
            return np.asarray(self)

    def __getattr__(self, name):
        return getattr(np, name)

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype).view(DeviceArrays.Array)


def test_the_device_code_path_gives_the_numpy_result(rng):
    rows = [r.tolist() for r in rng.standard_normal((50, 768)).astype(np.float32)]
    rows[3], rows[7] = None, [0.0] * 768
    chunks = [embedding_array(rows[:20]), embedding_array(rows[20:])]
    for spec in (LAYOUTS["improved-linear"], LAYOUTS["improved-relu"]):
        predictor = AestheticPredictor.from_state_dict(random_state_dict(keys=spec.layer_keys), spec)
        extra = {"other": AestheticPredictor.from_state_dict(random_state_dict(seed=4, keys=spec.layer_keys), spec)}
        on_cpu = score_arrow(chunks, predictor, extra, xp=np)
        on_device = score_arrow(chunks, predictor, extra, xp=DeviceArrays())
        np.testing.assert_allclose(on_device[0], on_cpu[0], rtol=1e-6)
        np.testing.assert_allclose(on_device[2]["other"], on_cpu[2]["other"], rtol=1e-6)
        assert list(on_device[1]) == list(on_cpu[1]) and on_cpu[1][3] == "null embedding"


def test_the_array_module_is_cupy_only_with_cupy_and_a_device():
    from aesthetic_dask.pipeline.device import choose_array_module

    cupy = DeviceArrays()
    assert choose_array_module(None, 0) is np and choose_array_module(None, 2) is np  # no cupy
    assert choose_array_module(cupy, 0) is np  # cupy, no device
    assert choose_array_module(cupy, 1) is cupy
    assert array_module() is array_module()  # decided once per process, by what it has


def test_workers_advertising_gpu_without_one_give_the_cpu_result(tmp_path, rng, tiny_weights):
    """`dask worker --resources GPU=1` on a machine with no GPU: every partition runs, on numpy."""
    for i in range(2):
        write_embeddings(tmp_path / "in" / f"{i}.parquet", rng.standard_normal((60, 768)).astype(np.float32), f"f{i}-")
    local = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path / "in"), "-o", str(tmp_path / "local"),
                            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "5.4"],
                           capture_output=True, text=True, timeout=120)
    with loopback_dask(tmp_path, nthreads=2, worker_args=("--resources", "GPU=1")) as (scheduler_file, _, _):
        remote = subprocess.run([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path / "in"), "-o", str(tmp_path / "gpu"),
                                 "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "5.4",
                                 "--scheduler-file", str(scheduler_file)], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    a = json.loads((tmp_path / "local" / "manifest.json").read_text())
    b = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert a["totals"] == b["totals"] and a["score_histogram"] == b["score_histogram"]


def test_the_decode_pool_and_the_partitions_per_worker_are_sized_from_the_cores(monkeypatch):
    from aesthetic_dask import cluster, hardware
    from aesthetic_dask.config import load_config

    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 16)
    assert hardware.decode_processes(None, "cpu") == 16  # the pool and the model share a CPU worker's cores
    monkeypatch.setattr(hardware, "visible_gpu_count", lambda: 1)
    assert hardware.decode_processes(None, "cuda") == 15  # one core for the model's own process
    monkeypatch.setattr(hardware, "visible_gpu_count", lambda: 8)
    assert hardware.decode_processes(None, "cuda") == 1
    assert hardware.decode_processes(6, "cuda") == 6
    config = cluster.ClusterOptions.from_config(load_config(decode_processes=5))
    assert cluster.partitions_per_worker(config, "cuda") == 6  # one shard per host process, one waiting
    assert load_config(decode_threads=3).decode_processes == 3  # the former name still works
    # Tasks ask a GPU share only where there is something to route: a connected cluster.
    assert cluster.task_resources(config, "cuda", local=False) == {"GPU": 0.25}
    assert cluster.task_resources(config, "cuda", local=True) is None
    assert cluster.task_resources(config, "cpu", local=False) is None
