"""The model's whole step on a batch (normalise, tower, L2 norm) captured once as a CUDA graph.

Why: launched kernel by kernel, ViT-L/14's forward is about 300 launches and 3-6 ms of the
model process's CPU per batch (0.1-0.2 ms per image at batch 32), which makes the process that
feeds the GPU a bound of its own beside the decode processes it shares the cores with (issue
28). A replay is one launch whatever the step holds (the compiled tower's kernels included),
so a batch costs the model's process four calls: the copy in, the replay, the copy out, the
event the batch is collected by.

One graph per encoder, at its batch size: a smaller batch is copied into the first rows of the
static input and the rows past it are stale and never read (each row's features depend on that
row alone). The replay's output is copied out at once, since the next replay overwrites it.

A capture is checked before it is used: one replay of a random batch must give the features the
step gives eagerly (cosine >= :data:`MIN_COSINE` on every row), so a graph that captured the
wrong thing is refused at load time rather than scoring a dataset wrongly.
"""

from __future__ import annotations

from typing import Any, Callable

MIN_COSINE = 0.999
WARMUP_STEPS = 3  # the steps run before capture (on a side stream: cuDNN/cuBLAS choose their algorithms)


class CapturedStep:
    """``step`` (a device uint8 batch of ``shape`` -> (batch, dim) float32 features) as one CUDA graph."""

    def __init__(self, step: Callable[[Any], Any], shape: tuple[int, ...], device: str) -> None:
        import torch

        with torch.inference_mode():
            self.input = torch.zeros(shape, dtype=torch.uint8, device=device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step(self.input)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the partitions' threads keep using the device while this one captures
            # (the default, global, would fail their allocations and synchronisations meanwhile).
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = step(self.input)
            self._check(step, shape, device)

    def _check(self, step: Callable[[Any], Any], shape: tuple[int, ...], device: str) -> None:
        import torch

        probe = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        self.input.copy_(probe)
        self.graph.replay()
        replayed = self.output.clone()
        eager = step(probe)
        cosine = float((replayed * eager).sum(dim=-1).min())
        if not cosine >= MIN_COSINE:
            raise RuntimeError(f"the replayed graph's features differ from the step's (cosine {cosine:.6f})")

    def __call__(self, batch: Any, n: int) -> Any:
        """Features of the first ``n`` rows of ``batch`` (host or device uint8), on the current
        stream: copy in, replay, copy out."""
        self.input[:n].copy_(batch[:n], non_blocking=True)
        self.graph.replay()
        return self.output[:n].clone()
