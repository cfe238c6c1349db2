"""Decode: image bytes -> the model's input tensor (C x H x W, normalised), or a reason.

Two decoders, chosen by ``image_decoder`` (``--image-decoder``):

- ``pil``: Pillow and open_clip's own ``preprocess``: the reference.
- ``torch``: torchvision decodes (baseline colour JPEGs in batches on the CUDA device with nvJPEG;
  other JPEGs and PNGs with libjpeg-turbo / libpng on the host) and resizes, crops and normalises tensors with the model's
  own preprocess settings (open_clip's ``preprocess_cfg``: size, resize mode, interpolation,
  mean, std). An image the tensor path does not handle exactly like Pillow (CMYK, 16-bit,
  palette, alpha, animations, other formats, a JPEG the decoder rejects) goes through the PIL
  path, so every image gets the same embedding within tolerance and the same error reason.

Both read the header with Pillow first: only the declared formats are decoded, and an image over
the pixel limit is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

DECODERS = ("auto", "pil", "torch")
# The formats the job decodes (Pillow format names); anything else is an error row, never decoded.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
NOT_DECODED = "not a JPEG, PNG, WebP or GIF image (no other format is decoded)"
# What `auto` picks on a CPU worker: benchmarks/bench_run.py measures both (see README).
AUTO_ON_CPU = "torch"


def resolve_decoder(name: str, device: str) -> str:
    """The decoder ``name`` means on ``device``: ``auto`` is torch on CUDA (nvJPEG), else :data:`AUTO_ON_CPU`."""
    if name != "auto":
        return name
    return "torch" if device == "cuda" else AUTO_ON_CPU


@dataclass
class Decoded:
    """One image's outcome: a tensor (and thumbnail), a reason, or JPEG bytes left for the batch decode."""

    tensor: Any = None
    reason: str | None = None
    thumbnail: bytes | None = None
    jpeg: Any = None  # uint8 tensor of the file, decoded with its batch on the device
    image: Any = None  # the opened (header-only) Pillow image, for the fallback
    wants_thumbnail: bool = False  # make the thumbnail when the batch decode gives the pixels


def _over_limit(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if width * height > max_pixels:
        return f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_image_pixels)"
    return None


class PilDecoder:
    """Pillow + open_clip's preprocess. ``decode`` runs in the decode threads, ``finish`` once per batch."""

    name = "pil"

    def __init__(self, preprocess: Any, max_pixels: int) -> None:
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def decode(self, data: bytes | None, thumbnail: bool = False) -> Decoded:
        """Never raises: whatever a hostile file does is this image's reason."""
        if data is None:
            return Decoded(reason="no image")
        if len(data) == 0:
            return Decoded(reason="empty image file")
        return _guarded(self._open_and_decode, data, thumbnail)

    def _open_and_decode(self, data: bytes, thumbnail: bool) -> Decoded:
        image, refused = self._open(data)
        return refused or self._decode(data, image, thumbnail)

    def finish(self, batch: list[Decoded]) -> list[Decoded]:
        """Complete a batch in the model's thread (the device decoder decodes its JPEGs here)."""
        return batch

    def _open(self, data: bytes) -> tuple[Any, Decoded | None]:
        """The header only: the declared formats and the pixel limit, before any decode."""
        from PIL import Image, UnidentifiedImageError

        try:
            # Only the declared formats: a member named .jpg holding EPS must never reach Ghostscript.
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
        except UnidentifiedImageError:
            # Not even identified through other plugins: their header parsers are attack surface too.
            return None, Decoded(reason=NOT_DECODED)
        too_big = _over_limit(image.size, self.max_pixels)
        return image, Decoded(reason=too_big) if too_big else None

    def _decode(self, data: bytes, image: Any, thumbnail: bool) -> Decoded:
        return self._pil(image, thumbnail)

    def _pil(self, image: Any, thumbnail: bool) -> Decoded:
        from .samples import make_thumbnail

        image.load()  # first frame of an animation
        too_big = _over_limit(image.size, self.max_pixels)  # the decoded size, whatever the header said
        if too_big:
            return Decoded(reason=too_big)
        return Decoded(self.preprocess(image), thumbnail=make_thumbnail(image) if thumbnail else None)


@dataclass(frozen=True)
class TensorPreprocess:
    """open_clip's eval preprocess, on uint8 image tensors: resize (antialiased, as Pillow),
    centre crop, scale to [0, 1], normalise. Built from the model's own ``preprocess_cfg``."""

    size: tuple[int, int]
    resize_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, model: Any) -> TensorPreprocess | None:
        """The model's preprocess as tensor ops, or None where open_clip does something this does not
        (then every image takes the PIL path)."""
        cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
        if not cfg:
            return None
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
        if cfg.get("mode", "RGB") != "RGB" or interpolation not in ("bicubic", "bilinear") \
                or not (mode == "squash" or (mode == "shortest" and size[0] == size[1])):
            return None
        return cls(size, mode, interpolation, tuple(cfg["mean"]), tuple(cfg["std"]))

    def resize_crop(self, image: Any) -> Any:
        """uint8 (3, H, W) -> uint8 (3, *size), on the tensor's device."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        how = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        if self.resize_mode == "squash":
            return F.resize(image, list(self.size), interpolation=how, antialias=True)
        image = F.resize(image, [self.size[0]], interpolation=how, antialias=True)  # the shorter side
        return F.center_crop(image, list(self.size))

    def normalize(self, images: Any) -> Any:
        """uint8 (..., 3, H, W) -> float32, scaled and normalised with the model's mean and std."""
        import torch

        mean = torch.tensor(self.mean, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(3, 1, 1)
        return (images.float() / 255 - mean) / std


class TorchDecoder(PilDecoder):
    """torchvision decoding and tensor preprocessing; Pillow for whatever it does not handle alike.

    On a CUDA device, JPEGs are decoded in batches by nvJPEG in :meth:`finish` (the task's thread,
    on its CUDA stream) and resized there; the decode threads only read headers (and decode PNGs,
    on the host). On CPU the decode threads do it all.
    """

    name = "torch"

    def __init__(self, preprocess: Any, max_pixels: int, tensor_preprocess: TensorPreprocess, device: str = "cpu") -> None:
        super().__init__(preprocess, max_pixels)
        self.tensors = tensor_preprocess
        self.device = device
        # JPEGs wait for their batch and are decoded together in finish(): nvJPEG on a GPU. The
        # tests set it on CPU, where torchvision decodes the same batch with libjpeg-turbo.
        self.batched = device != "cpu"

    def _decode(self, data: bytes, image: Any, thumbnail: bool) -> Decoded:
        import torch

        kind = _tensor_kind(image, data)
        if kind is None:
            return self._pil(image, thumbnail)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if kind == "JPEG" and self.batched and _batch_decodable(image):
            return Decoded(jpeg=raw, image=image, wants_thumbnail=thumbnail)
        # On the host, also on a GPU worker: a decode thread has no CUDA stream of the task's.
        return self._from_pixels(_decode_on_cpu(kind, raw), image, thumbnail)

    def finish(self, batch: list[Decoded]) -> list[Decoded]:
        pending = [i for i, d in enumerate(batch) if d.jpeg is not None]
        if pending:
            for i, pixels in zip(pending, self._device_jpegs([batch[i].jpeg for i in pending])):
                batch[i] = _guarded(self._from_pixels, pixels, batch[i].image, batch[i].wants_thumbnail)
        return batch

    def _from_pixels(self, pixels: Any, image: Any, thumbnail: bool) -> Decoded:
        """The model input (and thumbnail) from decoded uint8 (3, H, W) pixels. Where the tensor
        decoder refused the file (None) or gave more pixels than the limit, Pillow decides: the
        same embedding or the same reason as the PIL decoder."""
        if pixels is None or _over_limit((pixels.shape[2], pixels.shape[1]), self.max_pixels):
            return self._pil(image, thumbnail)
        return Decoded(self.tensors.normalize(self.tensors.resize_crop(pixels)),
                       thumbnail=_thumbnail_of(pixels) if thumbnail else None)

    def _device_jpegs(self, raws: list[Any]) -> list[Any]:
        """nvJPEG decodes of ``raws`` in one batch call; one by one if the batch is refused (None
        where an image is refused, for the PIL path)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(raws, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            out = []
            for raw in raws:
                try:
                    out.append(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out


def _thumbnail_of(pixels: Any) -> bytes:
    """The report's thumbnail from the decoded uint8 (3, H, W) pixels the embedding was made from,
    on whatever device they are: shrunk there, encoded on the host."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from .samples import THUMBNAIL_PX, make_thumbnail

    height, width = pixels.shape[1:]
    scale = THUMBNAIL_PX / max(height, width)
    if scale < 1:
        pixels = F.resize(pixels, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)
    return make_thumbnail(Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy()))


def _guarded(decode: Any, *args: Any) -> Decoded:
    """``decode(*args)``, with whatever a hostile file raises as the image's reason, never raised."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return decode(*args)
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file does, it is this sample's error
        return Decoded(reason=_reason(exc))


def _reason(exc: Exception) -> str:
    """An exception of a decode as the image's error reason."""
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return f"image over the pixel limit: {exc}"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return f"corrupt or truncated image: {exc}"
    return f"corrupt image: {type(exc).__name__}: {exc}"


def _tensor_kind(image: Any, data: bytes) -> str | None:
    """``JPEG`` or ``PNG`` when the tensor path decodes this image exactly as Pillow would, else None:
    8-bit RGB or greyscale, no transparency, one frame, and (JPEG) a complete file, since a
    decoder that fills a truncated image in would give an embedding where Pillow gives an error."""
    if image.mode not in ("RGB", "L") or "transparency" in image.info or getattr(image, "n_frames", 1) != 1:
        return None
    if image.format == "JPEG" and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        return "JPEG"
    if image.format == "PNG" and not image.info.get("interlace"):
        return "PNG"
    return None


def _batch_decodable(image: Any) -> bool:
    """Whether a JPEG goes to the device's batch decode: baseline colour only. nvJPEG decodes
    progressive JPEGs one at a time with its Huffman stage on the host, under torchvision's one
    decoder lock (every task on the GPU would queue behind it), and a greyscale JPEG asked for as
    RGB is not reliably expanded; libjpeg-turbo in the decode threads does both, in parallel."""
    return image.mode == "RGB" and not image.info.get("progressive") and not image.info.get("progression")


def _decode_on_cpu(kind: str, raw: Any) -> Any:
    """uint8 (3, H, W) with libjpeg-turbo / libpng, or None if torchvision refuses the file."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        return (decode_jpeg if kind == "JPEG" else decode_png)(raw, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def make_decoder(name: str, preprocess: Any, max_pixels: int, tensor_preprocess: TensorPreprocess | None,
                 device: str) -> PilDecoder:
    """The decoder ``name`` (``auto``, ``pil`` or ``torch``) for a model on ``device``. The torch
    decoder needs a preprocess it can express as tensor ops; without one, Pillow decodes."""
    if resolve_decoder(name, device) == "torch" and tensor_preprocess is not None:
        return TorchDecoder(preprocess, max_pixels, tensor_preprocess, device)
    return PilDecoder(preprocess, max_pixels)
