"""Shared fixtures: weights the tests make themselves, the real weights when present, sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REAL_WEIGHTS = (
    Path(__file__).resolve().parents[1].parent
    / "shared/models/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
)
DIMS = (768, 1024, 128, 64, 16, 1)
KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def random_state_dict(seed: int = 0, dims=DIMS, keys=KEYS) -> dict[str, np.ndarray]:
    """A state dict with the predictor's layout and random (scaled) weights."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, n_in, n_out in zip(keys, dims[:-1], dims[1:]):
        state[f"{key}.weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        state[f"{key}.bias"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    state["layers.7.bias"] = np.array([5.0], np.float32)  # scores centred near 5, like the real model
    return state


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """The suite's own HOME and cache: nothing it runs (converted heads, per-run logs, CLIP caches)
    is written to the user's ~/.cache/aesthetic-dask. Subprocesses inherit it."""
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    patch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    yield home
    patch.undo()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """The same random weights as .safetensors and as a .pth (saved by torch)."""
    import torch
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("weights")
    state = random_state_dict()
    save_file(state, str(d / "tiny.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d / "tiny.pth")
    return {"safetensors": d / "tiny.safetensors", "pth": d / "tiny.pth", "state": state}


@pytest.fixture(scope="session")
def real_weights() -> Path:
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"real aesthetic weights not present at {REAL_WEIGHTS}")
    return REAL_WEIGHTS


def embedding_array(rows: list, value_type=pa.float32(), fixed: int | None = None) -> pa.Array:
    """An Arrow list (or fixed_size_list) array from Python rows (None for null rows)."""
    if fixed:
        return pa.array(rows, type=pa.list_(value_type, fixed))
    return pa.array(rows, type=pa.list_(value_type))


def write_embeddings(path: Path, matrix: np.ndarray, prefix: str = "k", row_group_size: int | None = None, **extra) -> Path:
    """A Parquet file with ``key``, ``caption`` and ``embedding`` (list<float32>) columns."""
    n = matrix.shape[0]
    table = pa.table(
        {
            "key": [f"{prefix}{i:05d}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "embedding": pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * matrix.shape[1] + 1, matrix.shape[1], dtype=np.int32)),
                pa.array(matrix.reshape(-1)),
            ),
            **extra,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


TINY_CLIP_CONFIG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, Path]:
    """A real open_clip model (tiny, random weights): its model-config JSON and a checkpoint."""
    import json

    import open_clip
    import torch

    d = tmp_path_factory.mktemp("clip")
    config = d / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("tiny-clip")
    torch.save(model.state_dict(), d / "tiny-clip.pt")
    return {"config": config, "checkpoint": d / "tiny-clip.pt"}


def unit_scores(predictor, unit: np.ndarray) -> np.ndarray:
    """A head's scores of already L2-normalised embeddings (norms of one)."""
    unit = np.asarray(unit, dtype=np.float32)
    return predictor.score_raw(unit, np.einsum("ij,ij->i", unit, unit))


def photo_bytes(name: str, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    """A scikit-image sample photo encoded as ``fmt`` (optionally converted to a PIL mode)."""
    import io

    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard with the given (member name, bytes), in order."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_cli_process(argv: list[str]):
    """The CLI in a fresh process (what a user sees on stderr, exit code)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "aesthetic_dask", *argv], capture_output=True, text=True, timeout=180)


def assert_one_clear_line(proc, code: int, message: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


class loopback_dask:
    """A real `dask scheduler` and `dask worker` processes on 127.0.0.1; always torn down.

    ``with loopback_dask(tmp_path, workers=2) as (scheduler_file, address, worker_procs): ...``
    """

    def __init__(self, tmp_path: Path, workers: int = 1, nthreads: int | None = 1, env: dict | None = None,
                 cwd: Path | None = None, worker_args: tuple = ()) -> None:
        import os

        # Started as users start them: Dask's defaults (daemonic workers under a nanny), no variables.
        self.file = tmp_path / f"scheduler-{id(self)}.json"
        self.workers, self.nthreads, self.cwd, self.worker_args = workers, nthreads, cwd, worker_args
        self.env = dict(env if env is not None else os.environ)
        self.procs: list = []

    def _start(self, *argv):
        import subprocess
        import sys

        proc = subprocess.Popen([Path(sys.executable).parent / "dask", *map(str, argv)], env=self.env, cwd=self.cwd,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def __enter__(self):
        import json
        import time

        from distributed import Client

        self._start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", self.file)
        deadline = time.time() + 60
        while not self.file.exists() and time.time() < deadline:
            time.sleep(0.1)
        threads = ("--nthreads", self.nthreads) if self.nthreads else ()  # None: Dask's default (the cores)
        workers = [self._start("worker", "--scheduler-file", self.file, *threads, "--no-dashboard",
                               "--name", f"w{i}", "--host", "127.0.0.1", "--death-timeout", "60", *self.worker_args)
                   for i in range(self.workers)]
        with Client(scheduler_file=str(self.file), timeout="60s") as client:
            client.wait_for_workers(self.workers, timeout=60)
        return self.file, json.loads(self.file.read_text())["address"], workers

    def __exit__(self, *exc) -> None:
        import os
        import signal

        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
