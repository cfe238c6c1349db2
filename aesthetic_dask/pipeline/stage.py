"""The embed stage of one partition: the host pool decodes, the encoder embeds, heads score on the device.

Both jobs and the notebook API (:func:`aesthetic_dask.embed.embed_images`) go through
:func:`embed_source`. Each worker process has one :class:`Runtime` (the decode pool and the
encoders), started at worker start by :class:`ModelPlugin` (NeMo Curator's ``setup``), or on first
use where no plugin runs (a notebook's workers).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from distributed.diagnostics.plugin import WorkerPlugin

from ..models.clip import ClipSpec
from ..stage_stats import Stats
from .decode import resolve_decoder
from .host import BytesImages, DecodeSettings
from ..hardware import decode_processes
from .device import array_module, model_device
from ..errors import InputError
from ..score import classify_and_score
from .encoder import ClipEncoder, input_spec
from .pool import get_pool

log = logging.getLogger("aesthetic_dask")


@dataclass(frozen=True)
class EmbedOptions:
    """How images go through the model: batch size, the pixel limit, the decoder, the pool, compile, graph."""

    batch_size: int
    max_pixels: int
    decoder: str = "auto"  # image_decoder: auto, pil or torch
    processes: int | None = None  # decode_processes: host processes per worker; None: from the cores
    compile: str = "auto"  # clip_compile: auto, true or false
    cuda_graph: str = "auto"  # clip_cuda_graph: auto, true or false

    @classmethod
    def from_config(cls, config: Any) -> EmbedOptions:
        return cls(config.model_inference_batch_size, config.max_image_pixels, config.image_decoder,
                   config.decode_processes, config.clip_compile, config.clip_cuda_graph)

    @property
    def chunk(self) -> int:
        """Images per chunk a host process hands back (the encoder batches chunks across partitions)."""
        return max(1, min(self.batch_size, 64))


class Runtime:
    """One worker process's decode pool and encoders, shared by every config the process uses.

    The pool is one per process (a config asking for more processes grows it); an encoder is one
    per model, batch size, compile and graph setting, and the encoders of one model share its weights.
    Nothing one compute uses is closed by another's config. Models load in their own thread, so
    the pool decodes while they do.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.encoders: dict[tuple[ClipSpec, int, str, str], Future] = {}

    def pool(self, opts: EmbedOptions) -> Any:
        return get_pool(decode_processes(opts.processes, model_device()))

    def encoder(self, spec: ClipSpec, opts: EmbedOptions) -> Future:
        """A future of the encoder of ``spec`` at ``opts``' batch size, loading from the first call."""
        key = (spec, opts.batch_size, opts.compile, opts.cuda_graph)
        with self.lock:  # held only while starting (microseconds): the model loads in its own thread
            future = self.encoders.get(key)
            if future is None:
                future = self.encoders[key] = Future()
                threading.Thread(target=self._load, args=(future, *key), name="clip-load", daemon=True).start()
        return future

    @staticmethod
    def _load(future: Future, spec: ClipSpec, batch_size: int, compile_mode: str, cuda_graph: str) -> None:
        try:
            future.set_result(ClipEncoder(spec, batch_size, compile_mode, cuda_graph))
        except BaseException as exc:  # noqa: BLE001 - every task waiting for the model gets it
            future.set_exception(exc)

    def loaded(self) -> list[Any]:
        """The encoders loaded so far (benchmarks read their counters)."""
        with self.lock:
            return [f.result() for f in self.encoders.values() if f.done() and not f.exception()]


_RUNTIME = Runtime()


def runtime() -> Runtime:
    """This process's runtime."""
    return _RUNTIME


def start(spec: ClipSpec, opts: EmbedOptions) -> None:
    """Start the pool and the model's load for ``(spec, opts)``, without waiting for either."""
    _RUNTIME.pool(opts)
    _RUNTIME.encoder(spec, opts)


class ModelPlugin(WorkerPlugin):
    """A Dask worker plugin: the model and the decode pool start when the worker does (or joins),
    before its first partition. Registered by the ``run`` job's client."""

    name = "aesthetic-dask-model"

    def __init__(self, spec: ClipSpec, opts: EmbedOptions) -> None:
        self.spec, self.opts = spec, opts

    def setup(self, worker: Any = None) -> None:
        # In a thread: a model load must not block the worker's event loop (heartbeats).
        threading.Thread(target=self._start, name="aesthetic-dask-setup", daemon=True).start()

    def _start(self) -> None:
        try:
            start(self.spec, self.opts)
        except Exception:  # noqa: BLE001 - the tasks start it again and report the error as theirs
            log.debug("runtime start at worker setup failed", exc_info=True)

    def teardown(self, worker: Any = None) -> None:
        return None


@dataclass
class Embedded:
    """The embed stage's output for one partition's samples, one entry per sample."""

    embeddings: pa.Array | None  # fixed_size_list<float32>[dim], null where none; None when not asked for
    reasons: pa.Array  # why a sample has no embedding (or no score), else null
    scores: list[np.ndarray] | None  # per head, float32, NaN where not scored; None without heads
    compute: str  # what the model computed in, e.g. cuda-fp16
    decoder: str  # the decoder that ran: pil or torch
    thumbnails: dict[int, bytes]  # the report's thumbnails, by sample index
    stats: Any  # partition.Stats: seconds this partition's thread waited for decodes and features, and scored
    metas: list[Any]  # shard samples (without bytes), in order; empty for other sources
    failure: str | None  # why the source was not read whole, if it was not
    rows_known: bool = True  # False: the source could not be read at all (its size is unknown)
    worker: dict[str, Any] | None = None  # the worker's model and pool (load time, compile, processes)


class HostJobError(RuntimeError):
    """An exception of a partition's job in a host process: raised by the partition's task, as if
    it had happened there (Dask retries it; then the partition fails with its rows unknown)."""


def embed_source(source: Any, spec: ClipSpec, opts: EmbedOptions, expected_dim: int | None = None,
                 thumbnails: bool = False, heads: list[Any] | None = None, keep_embeddings: bool = True) -> Embedded:
    """The embed stage (and, given ``heads``, the score stage where the features are) for one
    decode source (an input kind's, e.g. :class:`sources.shards.ShardImages`, or :class:`host.BytesImages`).

    With ``heads`` each batch's features are scored on the model's device (cupy on a GPU) and only
    the scores come back; the embeddings come back only with ``keep_embeddings``.
    """
    rt = runtime()
    pool, loading = rt.pool(opts), rt.encoder(spec, opts)
    model_input = input_spec(spec)
    settings = DecodeSettings(opts.decoder, model_input, opts.max_pixels, thumbnails)
    if isinstance(source, BytesImages) and len(source.images) > opts.chunk:
        # Bytes in memory: chunks go to several host processes at once.
        step = opts.chunk
        handles = [pool.submit(BytesImages(source.images[i:i + step], source.keys[i:i + step] if source.keys else None),
                               settings, step) for i in range(0, len(source.images), step)]
    else:
        handles = [pool.submit(source, settings, opts.chunk)]
    clock = time.perf_counter
    stats = Stats()
    metas, thumbs, pending, seen = [], {}, [], 0  # seen: samples before this chunk
    failure, rows_known = None, True
    t = clock()
    for handle in handles:
        for chunk in handle:
            stats.add("decode_wait_s", clock() - t)
            ok = np.array([r is None for r in chunk.reasons], dtype=bool)
            thumbs |= {seen + i: b for i, b in chunk.thumbnails.items()}
            seen += len(chunk.reasons)
            if chunk.metas is not None:
                metas.extend(chunk.metas)
            if chunk.crops is not None:
                pending.append((ok, np.array(chunk.reasons, dtype=object), loading.result().encode(chunk.crops, chunk.release)))
            else:
                pending.append((ok, np.array(chunk.reasons, dtype=object), None))
            t = clock()
        if handle.failure_kind == "crash":
            raise HostJobError(handle.failure)
        failure = failure or handle.failure
        rows_known = rows_known and handle.failure_kind != "unread"
    encoder = loading.result()
    if expected_dim is not None and encoder.embed_dim != expected_dim:
        raise InputError(f"CLIP model {spec.model} gives {encoder.embed_dim}-d embeddings; the predictor expects {expected_dim}")
    decoder = resolve_decoder(opts.decoder) if model_input.tensor_ops else "pil"
    embedded = _collect(pending, encoder, stats, heads, keep_embeddings, thumbs, metas, failure, decoder)
    embedded.rows_known = rows_known
    embedded.worker = {"model_load_s": encoder.load_s, "compiled": encoder.compiled,
                       "cuda_graph": encoder.graph is not None,
                       "launch_cpu_ms_per_image": encoder.launch_cpu_ms_per_image(), "decode_processes": pool.processes,
                       "decode_processes_replaced": pool.deaths, "first_batch_at": encoder.first_batch_at}
    return embedded


def _collect(pending: list, encoder: Any, stats: Stats, heads: list[Any] | None, keep_embeddings: bool,
             thumbs: dict[int, bytes], metas: list[Any], failure: str | None, decoder: str) -> Embedded:
    """Score each chunk's features where they are, in order; the embeddings back only if kept."""
    clock = time.perf_counter
    no_rows = np.empty((0, encoder.embed_dim), np.float32)
    valid, reasons, host = [], [], []
    per_head: list[list[np.ndarray]] = [[] for _ in heads or ()]
    for ok, why, future in pending:
        t = clock()
        features = future.result() if future is not None else None
        t1 = clock()
        stats.add("encode_wait_s", t1 - t)
        with (nullcontext((np, no_rows)) if features is None else on_device(features)) as (xp, matrix):
            if heads:
                for out, scores in zip(per_head, classify_and_score(xp, list(heads), matrix, ok, why)):
                    out.append(scores)
            if keep_embeddings or not heads:
                host.append(matrix if xp is np else xp.asnumpy(matrix))
        valid.append(ok)
        reasons.extend(why.tolist())  # with the score stage's reasons for invalid features
        stats.add("score_s", clock() - t1)
    ok_all = np.concatenate(valid) if valid else np.zeros(0, bool)
    embeddings = None
    if keep_embeddings or not heads:
        embeddings = embedding_column(np.concatenate(host) if host else no_rows, ok_all, encoder.embed_dim)
    scores = [np.concatenate(p) if p else np.empty(0, np.float32) for p in per_head] if heads else None
    return Embedded(embeddings, pa.array(reasons, pa.string()), scores, encoder.compute, decoder, thumbs,
                    stats, metas, failure)


@contextmanager
def on_device(features: Any) -> Iterator[tuple[Any, Any]]:
    """``(xp, matrix)``: torch ``features`` as an array of the module that computes where they lie,
    without a copy: cupy for CUDA features when cupy is installed, else numpy on the host."""
    xp = array_module() if features.is_cuda else np
    if xp is np:
        yield np, features.cpu().numpy()
        return
    import torch

    with xp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield xp, xp.from_dlpack(features)


def embedding_column(matrix: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """fixed_size_list<float32>[dim] of ``matrix`` (the valid rows' embeddings, in order) with
    nulls where ``valid`` is false."""
    full = np.zeros((len(valid), dim), dtype=np.float32)
    full[valid] = matrix
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=pa.array(~valid))
