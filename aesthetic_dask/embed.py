"""Embed: image bytes -> L2-normalised CLIP image embeddings with open_clip.

The model loads once per worker process (:func:`load_clip` caches it) and is reused by every
partition there. Images are decoded (:mod:`decode`: Pillow with open_clip's own preprocess, or
torchvision, nvJPEG on a GPU) in a thread pool that works on the next batch while the model runs
on the current one. Images over ``max_image_pixels`` are refused from their header, never decoded.
Given the predictor heads, each batch is scored where its features are, and only the scores (and
the embeddings that are written) come back to the host.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Config
from .decode import Decoded, TensorPreprocess, make_decoder

_MODELS: dict["ClipSpec", "ClipModel"] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP model to load: open_clip name, pretrained tag or checkpoint path, optional config JSON."""

    model: str
    pretrained: str | None
    model_config: str | None
    cache_dir: str
    precision: str = "auto"
    hub_offline: bool = False  # the client found the weights cached and the hub unreachable

    @classmethod
    def from_config(cls, config: Config) -> ClipSpec:
        model, model_config = config.clip_model, config.clip_model_config
        if model_config:
            model, model_config = Path(model_config).stem, str(Path(model_config).resolve())
        pretrained = config.clip_pretrained or None
        if pretrained and Path(pretrained).exists():
            pretrained = str(Path(pretrained).resolve())  # workers may run elsewhere than the client's cwd
        return cls(model, pretrained, model_config, str(config.resolved_model_dir.resolve() / "open_clip"), config.clip_precision)

    @property
    def schema(self) -> str | None:
        """open_clip's own reading of the model name: None (built-in), ``hf-hub`` or ``local-dir``."""
        from open_clip.factory import parse_model_name

        from .errors import InputError

        try:
            return parse_model_name(self.model)[0]
        except ValueError as exc:
            raise InputError(f"--clip-model {self.model}: {exc}") from None

    def check(self, embed_dim: int | None = None, heads: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fail early, in the client and before any download, on a spec that cannot load, gives the
        wrong width, or reads another embedding space than a head was trained on.

        ``heads``: column -> registry entry (None for a local head file). Returns the manifest's
        record of the compatibility check.
        """
        import open_clip

        from .errors import InputError

        schema = self.schema
        if self.model_config:
            if not Path(self.model_config).is_file():
                raise InputError(f"--clip-model-config {self.model_config}: no such file")
            open_clip.add_model_config(self.model_config)
        if schema is None:
            model_config = open_clip.get_model_config(self.model)
            if model_config is None:
                raise InputError(f"--clip-model {self.model}: not an open_clip model (see open_clip.list_models())")
            if embed_dim is not None and model_config.get("embed_dim") != embed_dim:
                raise InputError(
                    f"--clip-model {self.model} gives {model_config.get('embed_dim')}-d embeddings; "
                    f"the aesthetic predictor expects {embed_dim}"
                )
            self._check_pretrained()
        elif schema == "local-dir" and not Path(self.model.split(":", 1)[1]).is_dir():
            raise InputError(f"--clip-model {self.model}: no such directory")
        return self._check_heads(heads or {})

    def _check_pretrained(self) -> None:
        import open_clip

        from .errors import InputError

        pretrained = self.pretrained
        if not pretrained:
            raise InputError(
                f"--clip-pretrained is empty: {self.model} would be randomly initialised and its scores "
                "meaningless; give an open_clip pretrained tag or a checkpoint file"
            )
        if not Path(pretrained).exists():
            if "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise InputError(f"--clip-pretrained {pretrained}: no such file")
            if not open_clip.get_pretrained_cfg(self.model, pretrained):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(self.model)) or "none"
                raise InputError(f"--clip-pretrained {pretrained}: open_clip has no such tag for {self.model} (tags: {tags})")

    def _check_heads(self, heads: dict[str, Any]) -> dict[str, Any]:
        """Each registered head's CLIP against this spec, by the weights open_clip would load."""
        from .errors import InputError

        mine = clip_weights_id(self.model, self.pretrained)
        result: dict[str, Any] = {}
        for column, entry in heads.items():
            if entry is None:
                result[column] = "vouched: a local head file; its CLIP is not known"
            elif mine is None:
                result[column] = "vouched: a local CLIP checkpoint; the head expects " + str(entry.clip)
            elif mine != clip_weights_id(entry.clip.model, entry.clip.pretrained):
                flag = "--aesthetic-weights " if column == "aesthetic_score" else f"--extra-scores {column}="
                raise InputError(
                    f"{flag}{entry.name} was trained on the embeddings of CLIP {entry.clip}; "
                    f"--clip-model {self.model} --clip-pretrained {self.pretrained} gives another embedding space "
                    "and its scores would be meaningless (a local --clip-pretrained checkpoint is accepted as vouched for)"
                )
            else:
                result[column] = f"matches: {entry.clip}"
        return result


def clip_weights_id(model: str, pretrained: str | None) -> str | None:
    """What CLIP weights ``(model, pretrained)`` loads, by open_clip's own registry: the hub repo
    (or URL) of the pretrained tag, or the ``hf-hub:`` repo itself. ``None`` for a local
    checkpoint or directory, whose weights only the user knows."""
    import open_clip
    from open_clip.factory import parse_model_name

    schema, ident = parse_model_name(model)
    if schema == "hf-hub":
        return "hf-hub:" + ident.strip("/")
    if schema == "local-dir" or not pretrained or Path(pretrained).exists():
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if cfg.get("hf_hub"):
        return "hf-hub:" + cfg["hf_hub"].strip("/")
    return cfg.get("url") or f"{model}/{pretrained}"


class ClipModel:
    """A loaded open_clip model, its preprocess transform and where it runs."""

    def __init__(self, spec: ClipSpec) -> None:
        import open_clip
        import torch

        from .cluster import configure_model_process

        configure_model_process()
        if spec.hub_offline:
            # Cached weights, no network: load them without huggingface_hub's retries (~23 s a file).
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        if spec.model_config:
            open_clip.add_model_config(spec.model_config)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        pretrained = spec.pretrained
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # require_pretrained: open_clip refuses to hand back randomly initialised weights.
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=pretrained, device=self.device, cache_dir=spec.cache_dir, require_pretrained=True
            )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tensor_preprocess = TensorPreprocess.of(model)  # the torch decoder's preprocess, or None
        self.embed_dim = int(model.visual.output_dim)
        self.compute = compute_precision(spec.precision, self.device)
        # fp16 weights (as OpenAI's CLIP was released), not autocast: ~1.35x the images/s of
        # ViT-L/14 on an H100, and half the bytes per batch over PCIe (benchmarks/gpu_check.py).
        self.dtype = torch.float16 if self.compute.endswith("fp16") else torch.float32
        if self.dtype == torch.float16:
            self.model = self.model.half()

    def encode(self, tensors: list[Any]) -> Any:
        """L2-normalised float32 features, left on the model's device, of preprocessed images
        (each 3 x H x W, on the host or already on the device)."""
        import torch

        with torch.inference_mode():
            if self.device == "cuda" and all(t.device.type == "cpu" for t in tensors):
                # Page-locked: the copy is really asynchronous.
                x = torch.stack(tensors).to(self.dtype).pin_memory().to(self.device, non_blocking=True)
            else:
                x = torch.stack([t.to(self.device, self.dtype, non_blocking=True) for t in tensors])
            features = self.model.encode_image(x).float()
            return features / features.norm(dim=-1, keepdim=True)


def clip_cache_status(spec: ClipSpec) -> str:
    """``local`` (a checkpoint file or directory), ``cached`` (in ``cache_dir``) or ``missing``,
    by open_clip's own pretrained config and huggingface_hub's cache layout (no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    schema = spec.schema
    if schema == "local-dir" or (spec.pretrained and Path(spec.pretrained).exists()):
        return "local"
    if schema == "hf-hub":
        repo, files = spec.model.split(":", 1)[1], ["open_clip_config.json"]
    else:
        cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained or "") or {}
        if cfg.get("file"):
            return "local"
        if not cfg.get("hf_hub"):
            url = cfg.get("url", "")
            return "cached" if url and (Path(spec.cache_dir) / os.path.basename(url)).is_file() else "missing"
        repo, filename = os.path.split(cfg["hf_hub"])
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in files:
        if isinstance(try_to_load_from_cache(repo, name, cache_dir=spec.cache_dir), str):
            return "cached"
    return "missing"


def prepare_clip_weights(spec: ClipSpec) -> tuple[ClipSpec, str]:
    """Make sure the workers can load the CLIP weights, before any task is submitted.

    Cached: workers load them (without network retries when the hub is unreachable). Missing:
    downloaded here once with open_clip's own mechanism if the hub is reachable, else one clear
    error in seconds. Returns the spec the workers get and what was found.
    """
    from .errors import InputError
    from .network import hub_endpoint, offline, reachable

    status = clip_cache_status(spec)
    if status == "local":
        return spec, status
    online = reachable(hub_endpoint())
    if status == "cached":
        return (spec if online else replace(spec, hub_offline=True)), status
    if not online:
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub is unreachable (no network?)"
        raise InputError(
            f"CLIP weights {spec.model} / {spec.pretrained} are not in {spec.cache_dir} and {why}; run "
            "`aesthetic-dask download --model-dir DIR` where the hub is reachable, or pass --clip-pretrained FILE"
        )
    import open_clip

    if spec.schema is None:
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.model, spec.pretrained), cache_dir=spec.cache_dir)
    return spec, "downloaded"


def download_clip(config: Config) -> str:
    """Fetch the configured CLIP weights with open_clip's own pretrained mechanism into model_dir."""
    import open_clip

    spec = ClipSpec.from_config(config)
    if spec.pretrained and Path(spec.pretrained).exists():
        return spec.pretrained
    cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained or "")
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.model}")
    return open_clip.download_pretrained(cfg, cache_dir=spec.cache_dir)


def load_clip(spec: ClipSpec) -> ClipModel:
    """The model for ``spec``, loaded once per process and shared by every partition and thread."""
    with _MODELS_LOCK:
        model = _MODELS.get(spec)
        if model is None:
            model = _MODELS[spec] = ClipModel(spec)
        return model


class ImageEmbedder:
    """Batches images through the model while a thread pool decodes the next batch."""

    def __init__(self, clip: ClipModel, batch_size: int, max_pixels: int, decode_threads: int | None = None,
                 gpu_share: float | None = None, decoder: str = "auto") -> None:
        self.clip = clip
        self.batch_size = batch_size
        if decode_threads is None:
            from .cluster import decode_threads as budget

            decode_threads = budget(gpu_share)
        self.decode_threads = decode_threads
        self.decoder = make_decoder(decoder, clip.preprocess, max_pixels, clip.tensor_preprocess, clip.device)
        # Where the model's thread spends its time: reading the input, waiting for decoded images.
        self.timings = {"read_s": 0.0, "decode_wait_s": 0.0}

    def batches(self, images: Iterable[bytes | None], thumbnail_for: Callable[[int], bool] | None = None
                ) -> Iterator[tuple[list[Decoded], Any]]:
        """Per batch, in order: each image's :class:`Decoded`, and the features (on the model's
        device, one row per decoded image) or None when no image of the batch decoded.

        ``thumbnail_for(i)``, asked when image ``i`` is taken from ``images``, says whether the
        decoder also makes its thumbnail. On a GPU, each task's batches run on their own CUDA
        stream, so the tasks sharing the GPU overlap instead of queueing on one stream.
        """
        source = iter(images)
        pending: deque = deque()
        lookahead = 2 * self.batch_size  # the batch the model runs on and the next one
        taken = 0

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool, _task_stream(self.clip.device):
            def fill() -> None:
                nonlocal taken
                while len(pending) < lookahead:
                    try:
                        data = next(source)
                    except StopIteration:
                        return
                    thumb = bool(thumbnail_for and data is not None and thumbnail_for(taken))
                    taken += 1
                    pending.append(pool.submit(self.decoder.decode, data, thumb))

            clock = time.perf_counter
            t = clock()
            fill()
            self.timings["read_s"] += clock() - t
            while pending:
                t = clock()
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                decoded = self.decoder.finish([f.result() for f in batch])
                t1 = clock()
                fill()  # decoding of the next batch overlaps the model below
                self.timings["decode_wait_s"] += t1 - t
                self.timings["read_s"] += clock() - t1
                tensors = [d.tensor for d in decoded if d.tensor is not None]
                features = self.clip.encode(tensors) if tensors else None
                for d in decoded:
                    d.tensor = None  # let the pixels go
                yield decoded, features


@contextmanager
def _task_stream(device: str) -> Iterator[None]:
    """A CUDA stream of this task's own (torch's and cupy's work both go to it), or nothing on CPU."""
    if device != "cuda":
        yield
        return
    import torch

    with torch.cuda.stream(torch.cuda.Stream()):
        yield


@contextmanager
def on_device(features: Any) -> Iterator[tuple[Any, Any]]:
    """``(xp, matrix)``: torch ``features`` as an array of the module that computes where they lie,
    without a copy: cupy (on torch's current stream) for CUDA features when cupy is installed,
    else numpy on the host."""
    from .cluster import array_module

    xp = array_module() if features.is_cuda else np
    if xp is np:
        yield np, features.cpu().numpy()
        return
    import torch

    with xp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield xp, xp.from_dlpack(features)


def embedding_column(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    """fixed_size_list<float32>[dim] of ``matrix`` (the valid rows' embeddings, in order) with
    nulls where ``valid`` is false."""
    dim = matrix.shape[1]
    full = np.zeros((len(valid), dim), dtype=np.float32)
    full[valid] = matrix
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=pa.array(~valid))


def compute_precision(precision: str, device: str) -> str:
    """What the model really computes in, e.g. ``cuda-fp16`` or ``cpu-fp32`` (fp16 is CUDA-only)."""
    half = precision == "fp16" or (precision == "auto" and device == "cuda")
    return f"{device}-{'fp16' if half and device == 'cuda' else 'fp32'}"


@dataclass(frozen=True)
class EmbedOptions:
    """How images go through the model: batch size, the pixel limit, decode threads and decoder."""

    batch_size: int
    max_pixels: int
    decode_threads: int | None = None
    gpu_share: float | None = None  # num_gpus_per_worker: budgets decode threads on GPU workers
    decoder: str = "auto"  # image_decoder: auto, pil or torch

    @classmethod
    def from_config(cls, config: Config) -> EmbedOptions:
        return cls(config.model_inference_batch_size, config.max_image_pixels, config.decode_threads,
                   config.num_gpus_per_worker, config.image_decoder)


@dataclass
class Embedded:
    """The embed stage's output for a stream of images, one entry per image."""

    embeddings: pa.Array | None  # fixed_size_list<float32>[dim], null where none; None when not asked for
    reasons: pa.Array  # why an image has no embedding (or no score), else null
    scores: list[np.ndarray] | None  # per head, float32, NaN where not scored; None without heads
    compute: str  # what the model computed in, e.g. cuda-fp16
    decoder: str  # the decoder that ran: pil or torch
    thumbnails: dict[int, bytes]  # the report's thumbnails, by image index
    timings: dict[str, float]  # seconds reading, waiting for decodes, and in the model (see ImageEmbedder)


def embed_stream(images: Iterable[bytes | None], spec: ClipSpec, opts: EmbedOptions, expected_dim: int | None = None,
                 thumbnail_for: Callable[[int], bool] | None = None, heads: list[Any] | None = None,
                 keep_embeddings: bool = True) -> Embedded:
    """The embed stage (and, given ``heads``, the score stage where the features are) for a
    stream of image bytes. Both jobs and :func:`embed_images` go through here.

    With ``heads`` each batch is scored on the model's device (cupy on a GPU: one matrix-vector
    product per head) and only the scores come back; the embeddings come back to the host only
    with ``keep_embeddings``. Invalid features (NaN, zero norm) get the score stage's reasons.
    """
    from .errors import InputError
    from .score import classify_and_score

    clip = load_clip(spec)
    if expected_dim is not None and clip.embed_dim != expected_dim:
        raise InputError(f"CLIP model {spec.model} gives {clip.embed_dim}-d embeddings; the predictor expects {expected_dim}")
    embedder = ImageEmbedder(clip, opts.batch_size, opts.max_pixels, opts.decode_threads, opts.gpu_share, opts.decoder)
    valid, reasons, host, thumbnails = [], [], [], {}
    per_head: list[list[np.ndarray]] = [[] for _ in heads or ()]
    no_rows = np.empty((0, clip.embed_dim), np.float32)
    started = time.perf_counter()
    for decoded, features in embedder.batches(images, thumbnail_for):
        ok = np.array([d.reason is None for d in decoded], dtype=bool)
        why = np.array([d.reason for d in decoded], dtype=object)
        thumbnails |= {len(reasons) + i: d.thumbnail for i, d in enumerate(decoded) if d.thumbnail is not None}
        with (nullcontext((np, no_rows)) if features is None else on_device(features)) as (xp, matrix):
            if heads:
                for out, scores in zip(per_head, classify_and_score(xp, list(heads), matrix, ok, why)):
                    out.append(scores)
            if keep_embeddings or not heads:
                host.append(matrix if xp is np else xp.asnumpy(matrix))
        valid.append(ok)
        reasons.extend(why.tolist())  # with the score stage's reasons for invalid features
    timings = {k: round(v, 4) for k, v in embedder.timings.items()}
    # The rest of the loop: host->device copies, the model, scoring, and copies back.
    timings["model_s"] = round(time.perf_counter() - started - sum(embedder.timings.values()), 4)
    ok_all = np.concatenate(valid) if valid else np.zeros(0, bool)
    embeddings = None
    if keep_embeddings or not heads:
        matrix = np.concatenate(host) if host else no_rows
        embeddings = embedding_column(matrix, ok_all)
    scores = None
    if heads:
        scores = [np.concatenate(parts) if parts else np.empty(0, np.float32) for parts in per_head]
    return Embedded(embeddings, pa.array(reasons, pa.string()), scores, clip.compute, embedder.decoder.name, thumbnails,
                    timings)


def attach_embedded(table: pa.Table, result: Embedded, extra_names: Iterable[str] = ()) -> pa.Table:
    """``table`` (one row per image, in order) plus the embed stage's columns: ``embedding`` (when
    made), the scores (when scored: ``aesthetic_score`` then ``extra_names``), and ``error`` (an
    earlier reason, e.g. "no image", wins)."""
    from .score import ERROR_COLUMN, attach_scores, merge_errors

    earlier = table.column(ERROR_COLUMN) if ERROR_COLUMN in table.column_names else None
    out = table.drop_columns([c for c in (ERROR_COLUMN, "embedding") if c in table.column_names])
    if result.embeddings is not None:
        out = out.append_column("embedding", result.embeddings)
    error = merge_errors(earlier, result.reasons)
    if result.scores is None:
        return out.append_column(ERROR_COLUMN, error)
    return attach_scores(out, result.scores[0], error, dict(zip(extra_names, result.scores[1:])))


def with_embeddings(table: pa.Table, images: Iterable[bytes | None], spec: ClipSpec, opts: EmbedOptions,
                    expected_dim: int | None = None) -> pa.Table:
    """``table`` plus the embeddings of ``images`` (one per row): :func:`embed_stream` then
    :func:`attach_embedded`."""
    return attach_embedded(table, embed_stream(images, spec, opts, expected_dim))


def embed_partition(df: pd.DataFrame, spec: ClipSpec, image_column: str, opts: EmbedOptions, keep_images: bool) -> pd.DataFrame:
    """Partition function of :func:`embed_images`: add ``embedding`` and reasons in ``error``."""
    from .image_reader import image_values

    table = pa.Table.from_pandas(df, preserve_index=False)
    images = image_values(table.column(image_column))
    drop = [c for c in (image_column, "image_ext") if c in table.column_names and not keep_images]
    out = with_embeddings(table.drop_columns(drop), images, spec, opts)
    frame = out.to_pandas(types_mapper=pd.ArrowDtype)
    frame.index = df.index
    return frame


def embed_images(ddf, config: Config | None = None):
    """Lazily add ``embedding`` (L2-normalised, fixed_size_list<float32>) to a frame of images.

    Image bytes are dropped after embedding unless ``config.write_shards`` needs them.
    """
    from .config import load_config

    config = config or load_config()
    spec = ClipSpec.from_config(config)
    spec.check()
    column = config.image_column if config.image_column in ddf.columns else "image"
    keep = bool(config.write_shards)
    drop = [c for c in (column, "image_ext") if c in ddf.columns and not keep]
    meta = ddf._meta.drop(columns=drop + [c for c in ("embedding", "error") if c in ddf.columns])
    meta = meta.assign(
        embedding=pd.Series(pd.arrays.ArrowExtensionArray(pa.array([], pa.list_(pa.float32(), 768)))),
        error=pd.Series(pd.arrays.ArrowExtensionArray(pa.array([], pa.string()))),
    )
    return ddf.map_partitions(
        embed_partition, spec, column, EmbedOptions.from_config(config), keep, meta=meta, enforce_metadata=False,
    )
