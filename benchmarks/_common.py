"""Builders shared by the benchmarks: random predictor weights, tiny CLIP models, photo shards."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_WEIGHTS = REPO.parent / "shared/models/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "hubble_deep_field", "retina")


def random_predictor(directory: Path) -> Path:
    """Random weights with the real predictor layout (timing does not depend on their values)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    dims, keys = (768, 1024, 128, 64, 16, 1), ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
    state = {}
    for key, n_in, n_out in zip(keys, dims[:-1], dims[1:]):
        state[f"{key}.weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        state[f"{key}.bias"] = np.zeros(n_out, np.float32)
    path = directory / "random-predictor.safetensors"
    save_file(state, str(path))
    return path


def tiny_clip(directory: Path, image_size: int, layers: int, width: int, patch: int) -> tuple[Path, Path]:
    """A small open_clip model (random weights, 768-d output): its config JSON and checkpoint."""
    import open_clip
    import torch

    config = directory / "tiny-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 768, "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
    }))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    ckpt = directory / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), ckpt)
    return config, ckpt


def photo_jpegs() -> list[bytes]:
    """scikit-image's bundled sample photos as JPEG bytes."""
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_shards(directory: Path, count: int, per_shard: int) -> list[Path]:
    """``count`` WebDataset shards of ``per_shard`` photos with caption sidecars (kept if present)."""
    directory.mkdir(parents=True, exist_ok=True)
    photos = None
    paths = []
    for s in range(count):
        path = directory / f"shard-{s:05d}.tar"
        if not path.exists():
            photos = photos or photo_jpegs()
            with tarfile.open(path, "w") as tar:
                for i in range(per_shard):
                    for ext, blob in ((".jpg", photos[(s + i) % len(photos)]), (".txt", f"photo {s}-{i}".encode())):
                        info = tarfile.TarInfo(f"{s:05d}{i:05d}{ext}")
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def peak_rss(cmd: list[str], codes: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the process and all its children, sampled every 20 ms) of
    ``cmd``, which must exit with one of ``codes``."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode not in codes:
        raise SystemExit(f"command exited {proc.returncode}, not {codes}: {' '.join(cmd)}\n{stderr[-2000:]}")
    return time.perf_counter() - t0, peak / 2**20
