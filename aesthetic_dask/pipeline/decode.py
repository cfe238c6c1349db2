"""Decode: image bytes -> a uint8 crop at the model's resolution (and a thumbnail), or a reason.

Runs in the host processes (:mod:`.host`). Two decoders, chosen by ``image_decoder``:

- ``pil``: Pillow and open_clip's own transforms: the reference.
- ``torch``: torchvision decodes JPEGs and PNGs on the host (libjpeg-turbo, libpng) and resizes
  and crops tensors with the model's preprocess settings. What the tensor path does not handle
  exactly like Pillow (CMYK, 16-bit, palette, alpha, animations, other formats, a JPEG the
  decoder rejects) goes through the PIL path, so every image gets the same embedding within
  tolerance and the same error reason.

Both read the header with Pillow first: only the declared formats are decoded, and an image over
the pixel limit is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from .preprocess import InputSpec
from .thumbnails import THUMBNAIL_PX, make_thumbnail

# The formats the job decodes (Pillow format names); anything else is an error row, never decoded.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
NOT_DECODED = "not a JPEG, PNG, WebP or GIF image (no other format is decoded)"
# An image whose shorter-side resize is this many crops long is cropped while it is resized
# (InputSpec.crop_box): the same pixels, without the long intermediate. Below it, open_clip's own
# transforms run unchanged.
LONG_RESIZE = 4
# What `auto` picks: torchvision decodes 2-2.5x faster than Pillow on the host (benchmarks/bench_run.py).
AUTO = "torch"


def resolve_decoder(name: str) -> str:
    """The decoder ``name`` means: ``auto`` is :data:`AUTO`."""
    return AUTO if name == "auto" else name


@dataclass
class Decoded:
    """One image's outcome: a uint8 crop (3, H, W) as a numpy array (and a thumbnail), or a reason."""

    crop: Any = None
    reason: str | None = None
    thumbnail: bytes | None = None


def _over_limit(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if width * height > max_pixels:
        return f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_image_pixels)"
    return None


class PilDecoder:
    """Pillow + open_clip's transforms up to ``ToTensor``."""

    name = "pil"

    def __init__(self, spec: InputSpec, max_pixels: int) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self.transforms = spec.pil_transforms()
        # open_clip's shortest-side preprocess starts Resize(int), CenterCrop: what crop_box replaces.
        names = [type(t).__name__ for t in self.transforms[:2]]
        self.boxed = names == ["Resize", "CenterCrop"] and spec.crop_box(1, 1) is not None

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
        import numpy as np

        image.load()  # first frame of an animation
        too_big = _over_limit(image.size, self.max_pixels)  # the decoded size, whatever the header said
        if too_big:
            return Decoded(reason=too_big)
        thumb = make_thumbnail(image) if thumbnail else None
        transforms = self.transforms
        if self.long_resize(image.size):
            image, transforms = self._resize_crop_box(image), transforms[2:]
        for transform in transforms:
            image = transform(image)
        return Decoded(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), thumbnail=thumb)

    def long_resize(self, size: tuple[int, int]) -> bool:
        """Whether resizing an image of ``size`` would make it over :data:`LONG_RESIZE` crops long."""
        return self.boxed and max(size) > LONG_RESIZE * min(size)

    def _resize_crop_box(self, image: Any) -> Any:
        from torchvision.transforms.functional import pil_modes_mapping

        resample = pil_modes_mapping[self.transforms[0].interpolation]  # what open_clip's Resize uses
        return image.resize(self.spec.size[::-1], resample, box=self.spec.crop_box(*image.size))


class TorchDecoder(PilDecoder):
    """torchvision decoding and tensor resize/crop on the host; Pillow for whatever it does not handle alike."""

    name = "torch"

    def _decode(self, data: bytes, image: Any, thumbnail: bool) -> Decoded:
        import torch

        kind = _tensor_kind(image, data)
        if kind is None or self.long_resize(image.size):  # Pillow crops those while resizing
            return self._pil(image, thumbnail)
        pixels = _decode_tensor(kind, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        # Where torchvision refused the file, gave another dtype (16-bit samples) or more pixels
        # than the limit, Pillow decides: the same embedding or the same reason as `pil`.
        if pixels is None or pixels.dtype != torch.uint8 or _over_limit((pixels.shape[2], pixels.shape[1]), self.max_pixels):
            return self._pil(image, thumbnail)
        return Decoded(self.spec.resize_crop(pixels).numpy(), thumbnail=_thumbnail_of(pixels) if thumbnail else None)


def _thumbnail_of(pixels: Any) -> bytes:
    """The report's thumbnail from the decoded uint8 (3, H, W) pixels the embedding was made from."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    height, width = pixels.shape[1:]
    scale = THUMBNAIL_PX / max(height, width)
    if scale < 1:
        pixels = F.resize(pixels, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)
    return make_thumbnail(Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()))


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
    if image.format == "PNG" and not image.info.get("interlace") and not _chunks_after_pixels(data):
        return "PNG"
    return None


def _chunks_after_pixels(data: bytes) -> bool:
    """Whether a PNG has chunks between its image data and IEND. Pillow reads those at ``load()``
    (text, ICC profile: a zTXt decompression bomb there is refused); libpng skips them. Such a
    PNG goes through Pillow so both decoders decide alike; only the chunk headers are read."""
    pos, in_pixels = 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return False
        if kind == b"IDAT":
            in_pixels = True
        elif in_pixels:
            return True
        pos += 12 + length
    return False  # cut short: libpng refuses it and Pillow decides anyway


def _decode_tensor(kind: str, raw: Any) -> Any:
    """uint8 (or, for 16-bit PNGs, uint16) (3, H, W) with libjpeg-turbo / libpng, or None if refused."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        return (decode_jpeg if kind == "JPEG" else decode_png)(raw, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def make_decoder(name: str, spec: InputSpec, max_pixels: int) -> PilDecoder:
    """The decoder ``name`` (``auto``, ``pil`` or ``torch``). The torch decoder needs a preprocess it
    can express as tensor ops; without one, Pillow decodes."""
    if resolve_decoder(name) == "torch" and spec.tensor_ops:
        return TorchDecoder(spec, max_pixels)
    return PilDecoder(spec, max_pixels)
