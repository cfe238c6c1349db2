"""The CLIP image tower, once per worker process, fed uint8 crops in batches across partitions.

- **Load.** The model is built on the meta device (no random initialisation: ~12 s for ViT-L/14
  on a CPU), given uninitialised memory and loaded with open_clip's own ``load_checkpoint`` (its
  key conversions, strict). Only the image tower is kept. Architectures whose image tower has
  buffers outside the checkpoint, and hub or local-dir models, load the ordinary way.
- **One stream of batches.** Every partition of the process hands its crops to one
  :class:`ClipEncoder`; its thread fills batches of ``batch_size`` from whatever partitions
  have crops ready (never waiting for more when none are), copies them into a pinned staging
  buffer (releasing the shared-memory slots at once), normalises the whole batch on the device,
  runs the model, and launches the next batch before collecting the previous one.
- **torch.compile** (``clip_compile``: ``auto`` compiles on CUDA, with one log line and eager
  on failure). Compiled batches are padded to ``batch_size``: one graph, no recompiles.
- **One CUDA graph** (``clip_cuda_graph``: ``auto`` captures on CUDA, with one log line and
  kernel-by-kernel launches on failure): normalise, tower and L2 norm replayed as one launch
  (:mod:`.graph`), so the model's process spends microseconds per batch, not milliseconds.
- **One copy of each model per process**: encoders of other batch sizes share its weights.
- **CPU threads follow the bound** (:class:`CpuThreads`): on a CPU worker torch and the decode
  processes share the cores; the model keeps them all while it is the bound and gives them to the
  decoders while it waits for crops.
"""

from __future__ import annotations

import logging
import queue
import types
import threading
import time
import warnings
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..models.clip import ClipSpec, compute_precision
from ..models.quiet import random_weights_expected
from .preprocess import InputSpec, Normalizer
from .device import configure_model_process, forced_torch_threads, torch_threads
from .device import model_device
from .graph import CapturedStep

log = logging.getLogger("aesthetic_dask")


def _prepare(spec: ClipSpec) -> None:
    import open_clip

    if spec.demo:  # built here, where the model loads, if not yet (the client never imports torch)
        from ..models.demo import demo_clip_files

        demo_clip_files(Path(spec.model_config).parent.parent)
    if spec.hub_offline:
        # Cached weights, no network: load them without huggingface_hub's retries (~23 s a file).
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if spec.model_config:
        open_clip.add_model_config(spec.model_config)


def _meta_model(spec: ClipSpec) -> Any:
    """The model on the meta device (no memory, no initialisation), through open_clip's own
    resolution: a pretrained tag still resolves (cached by the client), so its preprocess_cfg is
    the tag's; ``load_weights=False`` leaves the weights for :func:`load_image_tower`."""
    import open_clip

    _prepare(spec)
    with random_weights_expected(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(spec.model, pretrained=spec.pretrained, load_weights=False, device="meta",
                                      cache_dir=spec.cache_dir)


_INPUTS: dict[ClipSpec, InputSpec] = {}


def input_spec(spec: ClipSpec) -> InputSpec:
    """The model's input (its preprocess_cfg), known without loading any weights."""
    if spec not in _INPUTS:
        _INPUTS[spec] = InputSpec.of(dict(_meta_model(spec).visual.preprocess_cfg))
    return _INPUTS[spec]


def load_image_tower(spec: ClipSpec, device: str) -> tuple[Any, dict[str, Any]]:
    """(the image tower on ``device``, its preprocess_cfg), with the pretrained weights loaded."""
    import open_clip
    from open_clip.factory import load_checkpoint, parse_model_name

    _prepare(spec)
    model = None
    if parse_model_name(spec.model)[0] is None and spec.pretrained:
        meta = _meta_model(spec)
        persistent = set(meta.state_dict())
        if all(f"visual.{name}" in persistent for name, _ in meta.visual.named_buffers()):
            checkpoint = spec.pretrained
            if not Path(checkpoint).is_file():
                cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
                checkpoint = open_clip.download_pretrained(cfg, cache_dir=spec.cache_dir)
            model = meta.to_empty(device="cpu")
            load_checkpoint(model, checkpoint, strict=True)
    if model is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # require_pretrained: open_clip refuses to hand back randomly initialised weights.
            model = open_clip.create_model(spec.model, pretrained=spec.pretrained, cache_dir=spec.cache_dir,
                                           require_pretrained=True)
    visual = model.visual.eval().requires_grad_(False)
    cfg = dict(visual.preprocess_cfg)
    del model  # the text tower is never used
    return visual.to(device), cfg


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a precision name (fp32, fp16, bf16)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def reduced_precision(visual: Any, dtype: Any) -> Any:
    """``visual`` with its weights in ``dtype`` (fp16 or bf16) but every LayerNorm in fp32, as
    open_clip's ``LayerNormFp32`` computes: fp16 statistics of ViT activations lose the bits the
    heads read (the default head's folded weight has norm 18). The attention's softmax runs in
    torch's scaled-dot-product kernels, which accumulate it in fp32 on CUDA."""
    import torch

    visual = visual.to(dtype)
    for module in visual.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
            module.forward = types.MethodType(_layer_norm_fp32, module)
    return visual


def _layer_norm_fp32(self: Any, x: Any) -> Any:
    import torch.nn.functional as F

    return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


_TOWERS: dict[tuple[ClipSpec, str], Future] = {}
_TOWERS_LOCK = threading.Lock()


def shared_tower(spec: ClipSpec, device: str, dtype: Any) -> tuple[Any, dict[str, Any], float]:
    """(the image tower in ``dtype`` on ``device``, its preprocess_cfg, seconds its load took),
    loaded once per process and shared by every encoder of ``spec``."""
    key = (spec, device)
    with _TOWERS_LOCK:
        future, mine = _TOWERS.get(key), False
        if future is None:
            future, mine = _TOWERS.setdefault(key, Future()), True
    if mine:
        t0 = time.perf_counter()
        try:
            visual, cfg = load_image_tower(spec, device)
            if dtype != torch_dtype("fp32"):
                visual = reduced_precision(visual, dtype)
            future.set_result((visual, cfg, round(time.perf_counter() - t0, 3)))
        except BaseException as exc:  # noqa: BLE001 - every encoder waiting for it gets it
            with _TOWERS_LOCK:
                _TOWERS.pop(key, None)  # a later config may try again
            future.set_exception(exc)
    return future.result()


class CpuThreads:
    """The model's torch threads on a CPU worker, where the decode processes share its cores.

    Judged every :attr:`WINDOW` batches: when most batches found the queue of crops dry and the
    model's thread waited a real share of the time, the decoders are the bound and torch's threads
    only take their cores (OpenMP threads spin): halve them. When every batch was full, the model
    is the bound: one more, up to the cores. ``AESTHETIC_DASK_TORCH_THREADS`` fixes the count.
    """

    WINDOW = 8
    IDLE_SHARE = 0.1

    def __init__(self, cores: int, fixed: bool) -> None:
        self.cores, self.fixed, self.threads = cores, fixed, cores
        self._batches = self._dry = 0
        self._idle = self._busy = 0.0

    def observe(self, dry: bool, idle_s: float, busy_s: float) -> int | None:
        """Count a batch; the new thread count when it changes, else None."""
        if self.fixed:
            return None
        self._batches += 1
        self._dry += dry
        self._idle += idle_s
        self._busy += busy_s
        if self._batches < self.WINDOW:
            return None
        idle_share = self._idle / max(1e-9, self._idle + self._busy)
        dry_most = self._dry * 2 > self._batches
        full_all = self._dry == 0
        self._batches = self._dry = 0
        self._idle = self._busy = 0.0
        if dry_most and idle_share > self.IDLE_SHARE and self.threads > 1:
            self.threads = max(1, self.threads // 2)
            return self.threads
        if full_all and self.threads < self.cores:
            self.threads += 1
            return self.threads
        return None


def _speed_up(mode: str, build: Any, what: str, otherwise: str) -> Any:
    """``build()`` for a speed-up a setting asks for (``true``: its failure raises) or allows
    (``auto``: its failure is one log line, "WHAT failed (...); OTHERWISE", and None)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - `auto` falls back to the plain path
        if mode == "true":
            raise
        log.warning("%s failed (%s: %s); %s", what, type(exc).__name__, str(exc).partition("\n")[0], otherwise)
        return None


@dataclass
class _Request:
    crops: np.ndarray  # (n, 3, H, W) uint8, in shared memory until released
    release: Any
    future: Future


class ClipEncoder:
    """The model of one process: :meth:`encode` queues crops, its thread runs them in batches."""

    def __init__(self, spec: ClipSpec, batch_size: int, compile_mode: str = "auto", cuda_graph: str = "auto") -> None:
        configure_model_process()
        self.device = model_device()
        self.compute = compute_precision(spec.precision, self.device)
        # fp16 weights (as OpenAI's CLIP was released), not autocast: ~1.35x the images/s of
        # ViT-L/14 on an H100, and half the bytes per batch (benchmarks/gpu_check.py); LayerNorm
        # in fp32 (reduced_precision).
        self.dtype = torch_dtype(self.compute.split("-", 1)[1])
        self.visual, cfg, self.load_s = shared_tower(spec, self.device, self.dtype)
        self.input = InputSpec.of(cfg)
        self.embed_dim = int(self.visual.output_dim)
        self.batch_size = batch_size
        self.normalize = Normalizer(self.input, self.device, self.dtype)
        self.threads = CpuThreads(torch_threads(), fixed=self.device != "cpu" or forced_torch_threads() is not None)
        self.forward, self.compiled = self.visual, False
        if compile_mode == "true" or (compile_mode == "auto" and self.device == "cuda"):
            self._compile(compile_mode)
        self.graph: CapturedStep | None = None
        if cuda_graph == "true" and self.device != "cuda":
            raise ValueError(f"clip_cuda_graph is true but this worker's model runs on {self.device}, not CUDA")
        if cuda_graph == "true" or (cuda_graph == "auto" and self.device == "cuda"):
            self._capture(cuda_graph)
        self.queue: queue.Queue = queue.Queue()
        self.busy_s = 0.0  # time the thread spent on batches (not waiting for crops)
        self.launch_s = 0.0  # of it, normalising and the forward (device kernels on a GPU, CPU work here on CPU)
        self.launch_cpu_s = 0.0  # the same, in this thread's CPU time
        self.images = 0
        self.first_batch_at: float | None = None  # epoch seconds the first batch was launched
        self.thread = threading.Thread(target=self._loop, name="clip-encoder", daemon=True)
        self.thread.start()

    def _compile(self, mode: str) -> None:
        import torch

        def compiled() -> Any:
            forward = torch.compile(self.visual, dynamic=False)
            with torch.inference_mode():
                forward(self.normalize(torch.zeros((self.batch_size, *self.input.crop_shape), dtype=torch.uint8,
                                                   device=self.device)))
            return forward

        t0 = time.perf_counter()
        forward = _speed_up(mode, compiled, "torch.compile of the image tower", "running eager")
        if forward is not None:
            self.forward, self.compiled = forward, True
            log.info("image tower compiled in %.1fs", time.perf_counter() - t0)

    def _capture(self, mode: str) -> None:
        t0, shape = time.perf_counter(), (self.batch_size, *self.input.crop_shape)
        self.graph = _speed_up(mode, lambda: CapturedStep(self._step, shape, self.device),
                               "CUDA graph capture of the model step", "launching its kernels one by one")
        if self.graph is not None:
            log.info("model step captured as a CUDA graph in %.1fs", time.perf_counter() - t0)

    def launch_cpu_ms_per_image(self) -> float | None:
        """CPU ms per image this encoder's thread spent launching batches so far (on a GPU: what the
        model's process pays to drive it, kernels excluded)."""
        return round(1000 * self.launch_cpu_s / self.images, 4) if self.images else None

    def _step(self, x: Any) -> Any:
        """uint8 crops on the device -> their L2-normalised float32 features: what a batch costs the device."""
        features = self.forward(self.normalize(x)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def encode(self, crops: np.ndarray, release: Any = None) -> Future:
        """Features of ``crops`` (n, 3, H, W uint8): a future of a float32 (n, dim) tensor, L2-normalised,
        on the model's device. ``release`` is called once the crops are copied out. At most
        ``batch_size`` crops (the pool's chunks are no larger)."""
        if len(crops) > self.batch_size:  # refused here: the model's thread must never meet it
            raise ValueError(f"{len(crops)} crops in one request; this encoder's batch holds {self.batch_size}")
        future: Future = Future()
        self.queue.put(_Request(crops, release, future))
        return future

    def _loop(self) -> None:
        import torch

        cuda = self.device == "cuda"
        stream = torch.cuda.Stream() if cuda else None
        # Two pinned staging buffers: one being filled while the other's copy may be in flight.
        staging = [torch.empty((self.batch_size, *self.input.crop_shape), dtype=torch.uint8, pin_memory=cuda)
                   for _ in range(2)]
        in_flight = None  # (requests, features, event) of the batch launched last
        carry: _Request | None = None
        turn = 0
        torch.set_num_threads(self.threads.threads)  # per thread: this one runs the model
        while True:
            if carry is None and in_flight is not None and self.queue.empty():
                self._collect(in_flight)  # nothing more to batch now: finish what runs
                in_flight = None
            t_wait = time.perf_counter()
            first = carry or self.queue.get()
            t0 = time.perf_counter()
            requests, n, carry, dry = [first], len(first.crops), None, False
            while n < self.batch_size:
                try:
                    request = self.queue.get_nowait()
                except queue.Empty:
                    dry = True
                    break
                if n + len(request.crops) > self.batch_size:
                    carry = request  # the next batch starts with it
                    break
                requests.append(request)
                n += len(request.crops)
            # This buffer's last batch was collected (synchronised) before the one in flight launched.
            buffer, turn = staging[turn], 1 - turn
            offset = 0
            for request in requests:
                k = len(request.crops)
                buffer[offset:offset + k].numpy()[...] = request.crops
                offset += k
                if request.release:
                    request.release()
            if self.first_batch_at is None:
                self.first_batch_at = round(time.time(), 3)
            t_launch, cpu_launch = time.perf_counter(), time.thread_time()
            try:
                launched = self._launch(buffer, n, stream)
                self.launch_s += time.perf_counter() - t_launch
                self.launch_cpu_s += time.thread_time() - cpu_launch
            except Exception as exc:  # noqa: BLE001 - the partitions of this batch fail with the reason
                for request in requests:
                    request.future.set_exception(exc)
                turn = 1 - turn  # this buffer is free again; the other may still be copying the batch in flight
                continue
            if in_flight is not None:
                self._collect(in_flight)
            in_flight = (requests, *launched)
            busy = time.perf_counter() - t0
            self.busy_s += busy
            self.images += n
            # The first batch's wait is the model's load and the first decodes: not a measure.
            threads = self.threads.observe(dry, t0 - t_wait, busy) if self.images > n else None
            if threads is not None:
                torch.set_num_threads(threads)
                log.debug("model threads: %d", threads)

    def _launch(self, buffer: Any, n: int, stream: Any) -> tuple[Any, Any]:
        import torch

        rows = self.batch_size if self.compiled else n  # compiled: one static shape
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if self.graph is not None:
                features = self.graph(buffer, n)
            else:
                features = self._step(buffer[:rows].to(self.device, non_blocking=True))[:n]
            event = None
            if stream is not None:
                # Blocking: collecting it sleeps in the driver instead of spinning a core that the
                # decode processes beside this one need.
                event = torch.cuda.Event(blocking=True)
                event.record(stream)
        return features, event

    def _collect(self, in_flight: tuple) -> None:
        requests, features, event = in_flight
        if event is not None:
            event.synchronize()
        offset = 0
        for request in requests:
            k = len(request.crops)
            request.future.set_result(features[offset:offset + k])
            offset += k
