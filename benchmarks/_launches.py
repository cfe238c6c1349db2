"""What launching the model's step costs the model's process on a GPU, counted on a CPU (issue 28).

A GPU worker's model process pays per batch for every operation it hands the device: torch's
dispatch (Python, the dispatcher, the caching allocator) and the driver's launch of each kernel.
Neither depends on the batch's size or the device's speed, so both can be counted here:

- **the step's operations**, counted exactly on the meta device (no memory, no compute) for the
  job's architecture as it runs on a GPU (ViT-L/14 with OpenAI's QuickGELU, fp16 with LayerNorm
  in fp32, normalise and L2 norm included): all of them, and the kernels among them (views
  launch none);
- **the dispatch cost of one operation**, timed on this CPU with the same architecture narrowed
  until its arithmetic is negligible (width 64, one head, 5 tokens, batch 1: the same 24 layers,
  the same operations);
- **the driver's launch cost of one kernel**, which a CPU cannot time: taken as
  :data:`LAUNCH_US` (the upper end of CUDA's usual 2.5-5 us), and for a graph replay
  :data:`GRAPH_NODE_US` per kernel node, a conservative bound (a replay is one launch).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

LAUNCH_US = 5.0
GRAPH_NODE_US = 1.0
AROUND_GRAPH = 3  # operations outside the graph per batch: the copy in, the copy out, the event's record
MODEL = "ViT-L-14"


def _step(device: str, narrow: bool) -> tuple[Any, tuple[int, ...]]:
    """(the job's step on a batch of uint8 crops, the crop shape). ``narrow``: the same layers at
    width 64, one head, 28 px (5 tokens), in fp32 (fp16 arithmetic on a CPU is emulated)."""
    import open_clip
    import torch

    from aesthetic_dask.pipeline.encoder import reduced_precision
    from aesthetic_dask.pipeline.preprocess import InputSpec, Normalizer

    cfg = open_clip.get_model_config(MODEL)
    if narrow:
        cfg["vision_cfg"] |= {"width": 64, "head_width": 64, "image_size": 28}
        cfg["text_cfg"] |= {"width": 64, "heads": 1, "layers": 1, "vocab_size": 64}
        cfg["embed_dim"] = 64
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = open_clip.model.CLIP(**cfg, quick_gelu=True)
    visual = model.visual.eval().requires_grad_(False)
    dtype = torch.float32 if narrow else torch.float16
    if not narrow:
        visual = reduced_precision(visual, dtype)
    spec = InputSpec.of({"size": cfg["vision_cfg"]["image_size"]})  # OpenAI's mean and std, as open_clip's defaults
    normalize = Normalizer(spec, device, dtype)

    def step(x: Any) -> Any:
        features = visual(normalize(x)).float()
        return features / features.norm(dim=-1, keepdim=True)

    return step, spec.crop_shape


def _count(step: Any, x: Any) -> tuple[int, int]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.kernels += not func.is_view
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        step(x)
    return Count.ops, Count.kernels


def operations(batch: int = 32) -> tuple[int, int]:
    """(operations, kernels among them) of one step of the job's model on a batch, on the meta device."""
    import torch

    step, shape = _step("meta", narrow=False)
    return _count(step, torch.empty((batch, *shape), dtype=torch.uint8, device="meta"))


def dispatch_us_per_operation(repeat: int = 30) -> float:
    """This CPU's us per operation of the step, its arithmetic made negligible (best of ``repeat``)."""
    import torch

    step, shape = _step("cpu", narrow=True)
    x = torch.zeros((1, *shape), dtype=torch.uint8)
    ops, _ = _count(step, x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(3):
                step(x)
            best = float("inf")
            for _ in range(repeat):
                t0 = time.thread_time()
                step(x)
                best = min(best, time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1e6 * best / ops


def per_batch_ms(batch: int = 32) -> dict[str, float]:
    """The model process's CPU ms per batch to launch the step: kernel by kernel, and as one graph replay."""
    ops, kernels = operations(batch)
    dispatch = dispatch_us_per_operation()
    eager = ops * dispatch + kernels * LAUNCH_US
    graph = AROUND_GRAPH * (dispatch + LAUNCH_US) + LAUNCH_US + kernels * GRAPH_NODE_US
    return {"operations": ops, "kernels": kernels, "dispatch_us_per_operation": round(dispatch, 2),
            "eager_ms": eager / 1000, "graph_ms": graph / 1000}


if __name__ == "__main__":
    print(per_batch_ms())
