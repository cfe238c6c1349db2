"""The device a worker process's model runs on, decided where the model runs (never in the client)."""

from __future__ import annotations

import functools


@functools.cache
def model_device() -> str:
    """``cuda`` where torch sees a CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
