"""The demo CLIP: a small randomly initialised open_clip model, for showing the pipeline work where
the real CLIP weights cannot be had (offline). Its scores mean nothing.

It is a real open_clip model (ViT image tower, 224-pixel input, 768-d embeddings, so the real
heads load and the real preprocessing runs), built once in ``model_dir/demo-clip/`` from a fixed
seed and then loaded like any local checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def demo_clip_files(model_dir: Path) -> tuple[Path, Path]:
    """(model-config JSON, checkpoint) of the demo CLIP in ``model_dir/demo-clip/``, built there
    first if absent. The checkpoint is written to a temporary name and renamed, so a build cut
    short is never taken for one."""
    directory = Path(model_dir) / "demo-clip"
    config, checkpoint = directory / f"{DEMO_MODEL}.json", directory / f"{DEMO_MODEL}.pt"
    text = json.dumps(DEMO_CONFIG, indent=1)
    if checkpoint.is_file() and config.is_file() and config.read_text() == text:
        return config, checkpoint
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    open_clip.add_model_config(str(config))
    with torch.random.fork_rng(devices=[]):  # the seed is the demo's, the caller's RNG is left as it was
        torch.manual_seed(SEED)
        model = open_clip.create_model(DEMO_MODEL)
    partial = checkpoint.with_suffix(".pt.partial")
    torch.save(model.state_dict(), partial)
    partial.replace(checkpoint)
    return config, checkpoint
