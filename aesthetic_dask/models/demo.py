"""The demo CLIP: a small randomly initialised open_clip model, for showing the pipeline work where
the real CLIP weights cannot be had (offline). Its scores mean nothing.

It is a real open_clip model (ViT image tower, 224-pixel input, 768-d embeddings, so the real
heads load and the real preprocessing runs), built once in ``model_dir/demo-clip/`` from a fixed
seed and then loaded like any local checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import storage

DEMO_MODEL = "aesthetic-dask-demo-clip"
DEMO_CONFIG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 64, "heads": 1, "layers": 1},
}
SEED = 0
# What each place that shows a demo run's model says about it.
DEMO_NOTE = ("demo: a small randomly initialised CLIP (--demo-clip), a pipeline demonstration; "
             "its scores mean nothing")


def demo_clip_config(model_dir: Path) -> tuple[Path, Path]:
    """(model-config JSON, checkpoint path) of the demo CLIP in ``model_dir/demo-clip/``, the JSON
    written there if absent (no torch: the client's part; the checkpoint is built where the model
    loads, by :func:`demo_clip_files`)."""
    directory = Path(model_dir) / "demo-clip"
    config, checkpoint = directory / f"{DEMO_MODEL}.json", directory / f"{DEMO_MODEL}.pt"
    text = json.dumps(DEMO_CONFIG, indent=1)
    if not (config.is_file() and config.read_text() == text):
        # Written whole or not at all: a build cut short, or two jobs building at once, never
        # leave a partial file under the real name.
        fs, _ = storage.split(str(directory))
        storage.write_bytes(fs, str(config), text.encode())
    return config, checkpoint


def demo_clip_files(model_dir: Path) -> tuple[Path, Path]:
    """(model-config JSON, checkpoint) of the demo CLIP in ``model_dir/demo-clip/``, built there
    first if absent (the same weights wherever it is built: a fixed seed)."""
    config, checkpoint = demo_clip_config(model_dir)
    if checkpoint.is_file():
        return config, checkpoint
    import open_clip
    import torch

    from .quiet import random_weights_expected

    fs, _ = storage.split(str(checkpoint.parent))
    open_clip.add_model_config(str(config))
    # The seed is the demo's; the caller's RNG is left as it was.
    with random_weights_expected(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = open_clip.create_model(DEMO_MODEL)
    with storage.atomic_open(fs, str(checkpoint)) as f:
        torch.save(model.state_dict(), f)
    return config, checkpoint

