"""Embed: image bytes -> L2-normalised CLIP image embeddings with open_clip.

The model loads once per worker process (:func:`load_clip` caches it) and is reused by every
partition there. Images are decoded and preprocessed with the model's own open_clip
``preprocess`` (exact parity) in a thread pool that works on the next batch while the model runs
on the current one. Images over ``max_image_pixels`` are refused from their header, never decoded.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Config

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
        self.embed_dim = int(model.visual.output_dim)
        self.compute = compute_precision(spec.precision, self.device)
        self.autocast_dtype = torch.float16 if self.compute.endswith("fp16") else None

    def encode(self, batch: Any) -> np.ndarray:
        """L2-normalised float32 embeddings of a preprocessed image batch (N x 3 x H x W)."""
        import torch

        with torch.inference_mode():
            if self.device == "cuda":
                batch = batch.pin_memory()  # page-locked: the copy below is really asynchronous
            x = batch.to(self.device, non_blocking=True)
            if self.autocast_dtype is not None:
                with torch.autocast("cuda", dtype=self.autocast_dtype):
                    features = self.model.encode_image(x)
            else:
                features = self.model.encode_image(x)
            features = features.float()
            features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy()


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


def decode_image(data: bytes | None, preprocess: Any, max_pixels: int,
                 thumbnail: bool = False) -> tuple[Any, str | None, bytes | None]:
    """(preprocessed tensor, None, thumbnail) or (None, reason, None). Never decodes an image over
    ``max_pixels``. With ``thumbnail``, also a 128-px JPEG of the decoded image for the report."""
    from .samples import make_thumbnail

    from PIL import Image, UnidentifiedImageError

    if data is None:
        return None, "no image", None
    if len(data) == 0:
        return None, "empty image file", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                # Only the declared formats: a member named .jpg holding EPS must never reach Ghostscript.
                image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            except UnidentifiedImageError:
                # Not even identified through other plugins: their header parsers are attack surface too.
                return None, NOT_DECODED, None
            too_big = _over_limit(image.size, max_pixels)
            if too_big:
                return None, too_big, None
            image.load()  # first frame of an animation
            too_big = _over_limit(image.size, max_pixels)  # the decoded size, whatever the header said
            if too_big:
                return None, too_big, None
            return preprocess(image), None, make_thumbnail(image) if thumbnail else None
    except Image.DecompressionBombError as exc:
        return None, f"image over the pixel limit: {exc}", None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, f"corrupt or truncated image: {exc}", None
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file does, it is this sample's error
        return None, f"corrupt image: {type(exc).__name__}: {exc}", None


# The formats the job decodes (Pillow format names); anything else is an error row, never decoded.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
NOT_DECODED = "not a JPEG, PNG, WebP or GIF image (no other format is decoded)"


def _over_limit(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if width * height > max_pixels:
        return f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_image_pixels)"
    return None




class ImageEmbedder:
    """Batches images through the model while a thread pool decodes the next batch."""

    def __init__(self, clip: ClipModel, batch_size: int, max_pixels: int, decode_threads: int | None = None,
                 gpu_share: float | None = None) -> None:
        self.clip = clip
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        if decode_threads is None:
            from .cluster import decode_threads as budget

            decode_threads = budget(gpu_share)
        self.decode_threads = decode_threads

    def embed(self, images: Iterable[bytes | None], thumbnail_for: Callable[[int], bool] | None = None
              ) -> Iterator[tuple[np.ndarray | None, str | None, bytes | None]]:
        """For each image in order: (embedding, None, thumbnail) or (None, reason, None).

        ``thumbnail_for(i)``, asked when image ``i`` is taken from ``images``, says whether the
        decoder also makes its thumbnail.
        """
        import torch

        source = iter(images)
        pending: deque = deque()
        lookahead = 2 * self.batch_size  # the batch the model runs on and the next one
        taken = 0

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            def fill() -> None:
                nonlocal taken
                while len(pending) < lookahead:
                    try:
                        data = next(source)
                    except StopIteration:
                        return
                    thumb = bool(thumbnail_for and data is not None and thumbnail_for(taken))
                    taken += 1
                    pending.append(pool.submit(decode_image, data, self.clip.preprocess, self.max_pixels, thumb))

            fill()
            while pending:
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                decoded = [f.result() for f in batch]
                fill()  # decoding of the next batch overlaps the model below
                tensors = [t for t, _, _ in decoded if t is not None]
                embeddings = self.clip.encode(torch.stack(tensors)) if tensors else None
                j = 0
                for tensor, reason, thumb in decoded:
                    if tensor is None:
                        yield None, reason, None
                    else:
                        yield embeddings[j], None, thumb
                        j += 1


def embedding_column(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    """fixed_size_list<float32>[dim] with nulls where no embedding was made."""
    valid = np.array([r is not None for r in rows], dtype=bool)
    matrix = np.zeros((len(rows), dim), dtype=np.float32)
    for i in np.flatnonzero(valid):
        matrix[i] = rows[i]
    values = pa.array(matrix.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def compute_precision(precision: str, device: str) -> str:
    """What the model really computes in, e.g. ``cuda-fp16`` or ``cpu-fp32`` (fp16 is CUDA-only)."""
    half = precision == "fp16" or (precision == "auto" and device == "cuda")
    return f"{device}-{'fp16' if half and device == 'cuda' else 'fp32'}"


@dataclass(frozen=True)
class EmbedOptions:
    """How images go through the model: batch size, the pixel limit, decode threads."""

    batch_size: int
    max_pixels: int
    decode_threads: int | None = None
    gpu_share: float | None = None  # num_gpus_per_worker: budgets decode threads on GPU workers

    @classmethod
    def from_config(cls, config: Config) -> EmbedOptions:
        return cls(config.model_inference_batch_size, config.max_image_pixels, config.decode_threads,
                   config.num_gpus_per_worker)


def embed_stream(images: Iterable[bytes | None], spec: ClipSpec, opts: EmbedOptions,
                 expected_dim: int | None = None, thumbnail_for: Callable[[int], bool] | None = None,
                 ) -> tuple[pa.Array, pa.Array, str, dict[int, bytes]]:
    """The embed stage: (embedding column, reasons, compute precision, thumbnails by row) for a
    stream of image bytes.

    The embedding is ``fixed_size_list<float32>[dim]``, null where the image could not be embedded;
    the reason says why. Both jobs and :func:`embed_images` go through here.
    """
    from .errors import InputError

    clip = load_clip(spec)
    if expected_dim is not None and clip.embed_dim != expected_dim:
        raise InputError(f"CLIP model {spec.model} gives {clip.embed_dim}-d embeddings; the predictor expects {expected_dim}")
    rows, reasons, thumbnails = [], [], {}
    embedder = ImageEmbedder(clip, opts.batch_size, opts.max_pixels, opts.decode_threads, opts.gpu_share)
    for i, (emb, reason, thumb) in enumerate(embedder.embed(images, thumbnail_for)):
        rows.append(emb)
        reasons.append(reason)
        if thumb is not None:
            thumbnails[i] = thumb
    return embedding_column(rows, clip.embed_dim), pa.array(reasons, pa.string()), clip.compute, thumbnails


def attach_embeddings(table: pa.Table, embeddings: pa.Array, reasons: pa.Array) -> pa.Table:
    """``table`` (one row per image, in order) plus ``embedding``, with ``reasons`` merged into
    ``error`` (an earlier reason, e.g. "no image", wins)."""
    from .score import ERROR_COLUMN, merge_errors

    earlier = table.column(ERROR_COLUMN) if ERROR_COLUMN in table.column_names else None
    out = table.drop_columns([c for c in (ERROR_COLUMN, "embedding") if c in table.column_names])
    return out.append_column("embedding", embeddings).append_column(ERROR_COLUMN, merge_errors(earlier, reasons))


def with_embeddings(table: pa.Table, images: Iterable[bytes | None], spec: ClipSpec, opts: EmbedOptions,
                    expected_dim: int | None = None) -> pa.Table:
    """``table`` plus the embeddings of ``images`` (one per row): :func:`embed_stream` then
    :func:`attach_embeddings`."""
    embeddings, reasons, _, _ = embed_stream(images, spec, opts, expected_dim)
    return attach_embeddings(table, embeddings, reasons)


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
