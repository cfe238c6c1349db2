"""The decoders in the host pool against the references (issues 11, 17): `pil` through the pool is
open_clip's own preprocess and model; `torch` gives the same embedding within tolerance for every
image type, and the same accounting and reasons for hostile members."""

import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aesthetic_dask.cli import main
from aesthetic_dask.models.clip import ClipSpec
from aesthetic_dask.pipeline.decode import PilDecoder, TorchDecoder, _tensor_kind, make_decoder, resolve_decoder
from aesthetic_dask.pipeline.encoder import input_spec
from aesthetic_dask.pipeline.host import BytesImages
from aesthetic_dask.pipeline.preprocess import InputSpec
from aesthetic_dask.pipeline.stage import EmbedOptions, embed_source
from conftest import photo_bytes, write_shard
from crafted import extreme_aspect_png, png_chunk, with_chunk_after_pixels, ztxt_bomb


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return image.resize(size, Image.BICUBIC) if size else image


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: neither decoder applies it (open_clip's preprocess does not)
    return save(photo("chelsea"), "JPEG", exif=exif.tobytes())


def with_transparency() -> bytes:
    image = photo("coffee")
    return save(image, "PNG", transparency=(255, 255, 255))


def png_16bit_rgb(image: Image.Image) -> bytes:
    """A PNG of bit depth 16, colour type 2 (Pillow cannot write one)."""
    pixels = np.asarray(image, dtype=np.uint16) * 257 + 3  # 0..65535, low byte not a copy of the high one
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def animated() -> bytes:
    frames = [photo("rocket").convert("P"), photo("coffee").convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40)
    return buf.getvalue()


# name -> (bytes, the path the torch decoder takes: JPEG / PNG tensors, or None for Pillow)
IMAGE_TYPES = {
    "jpeg_420_q75": (lambda: save(photo(), "JPEG", quality=75), "JPEG"),
    "jpeg_444_q95": (lambda: save(photo("coffee"), "JPEG", quality=95, subsampling=0), "JPEG"),
    "jpeg_progressive": (lambda: save(photo("chelsea"), "JPEG", progressive=True), "JPEG"),
    "jpeg_gray": (lambda: photo_bytes("camera"), "JPEG"),
    "jpeg_cmyk": (lambda: photo_bytes("coffee", "JPEG", "CMYK"), None),
    "jpeg_exif_rotated": (exif_rotated, "JPEG"),
    "jpeg_large": (lambda: save(photo("astronaut", (2048, 1536)), "JPEG", quality=90), "JPEG"),
    "jpeg_tiny": (lambda: save(photo("rocket", (3, 2)), "JPEG"), "JPEG"),
    "jpeg_wide": (lambda: save(photo("rocket", (1200, 40)), "JPEG"), "JPEG"),
    "png_rgb": (lambda: photo_bytes("coffee", "PNG"), "PNG"),
    "png_gray": (lambda: photo_bytes("camera", "PNG"), "PNG"),
    "png_tall": (lambda: save(photo("chelsea", (30, 900)), "PNG"), "PNG"),
    "png_rgba": (lambda: photo_bytes("astronaut", "PNG", "RGBA"), None),
    "png_la": (lambda: photo_bytes("astronaut", "PNG", "LA"), None),
    "png_palette": (lambda: photo_bytes("astronaut", "PNG", "P"), None),
    "png_16bit": (lambda: save(Image.fromarray((np.arange(96 * 128).reshape(96, 128) * 7).astype(np.uint16)), "PNG"), None),
    "png_transparency_key": (with_transparency, None),
    # Pillow opens 16-bit RGB as "RGB" and torchvision decodes it to uint16: Pillow must decide.
    "png_16bit_rgb": (lambda: png_16bit_rgb(photo("coffee", (160, 120))), "PNG"),
    # Text after the pixels: Pillow reads it at load() and libpng skips it, so Pillow decodes.
    "png_text_after_pixels": (lambda: with_chunk_after_pixels(photo_bytes("coffee", "PNG"), b"tEXt", b"Comment\0hi"), None),
    # Over LONG_RESIZE crops long once resized: cropped while resized, by Pillow on both paths.
    "png_extreme_tall": (lambda: save(photo("chelsea", (20, 1000)), "PNG"), "PNG"),
    "jpeg_extreme_wide": (lambda: save(photo("astronaut", (1500, 12)), "JPEG"), "JPEG"),
    "webp_rgb": (lambda: photo_bytes("coffee", "WEBP"), None),
    "webp_rgba": (lambda: photo_bytes("astronaut", "WEBP", "RGBA"), None),
    "gif_animated": (animated, None),
}

# A CLIP-shaped model that reads 224 px images (as ViT-L/14 does), small enough for CI.
PARITY_CLIP = {
    "embed_dim": 768, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    """(spec, open_clip's own model and preprocess): the reference the pipeline is checked against."""
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("clip224")
    (d / "parity-clip.json").write_text(json.dumps(PARITY_CLIP))
    open_clip.add_model_config(str(d / "parity-clip.json"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("parity-clip").state_dict(), d / "parity-clip.pt")
    spec = ClipSpec("parity-clip", str(d / "parity-clip.pt"), str(d / "parity-clip.json"), str(d / "cache"))
    model, _, preprocess = open_clip.create_model_and_transforms("parity-clip", pretrained=str(d / "parity-clip.pt"))
    return spec, model.eval(), preprocess


def embed_all(clip224, images: list[bytes], decoder: str):
    """Embeddings (None where refused) and reasons of ``images`` through the pool and the encoder."""
    spec = clip224[0]
    result = embed_source(BytesImages(images), spec, EmbedOptions(4, 10**8, decoder, processes=2))
    matrix = result.embeddings.values.to_numpy(zero_copy_only=False).reshape(len(images), -1)
    reasons = result.reasons.to_pylist()
    return [None if r else row for row, r in zip(matrix, reasons)], reasons


def reference(clip224, data: bytes) -> np.ndarray:
    """open_clip's own preprocess and encode_image, in float32."""
    import torch

    _, model, preprocess = clip224
    with torch.no_grad():
        f = model.encode_image(preprocess(Image.open(io.BytesIO(data)))[None]).float()
    return (f / f.norm(dim=-1, keepdim=True))[0].numpy()


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_each_image_type_takes_the_declared_path():
    for name, (make, kind) in IMAGE_TYPES.items():
        data = make()
        assert _tensor_kind(Image.open(io.BytesIO(data)), data) == kind, name


def test_the_pool_with_pil_is_open_clip_itself(clip224):
    """uint8 crops from open_clip's own transforms, normalised on the model's side, give open_clip's embedding."""
    names = list(IMAGE_TYPES)
    images = [IMAGE_TYPES[n][0]() for n in names]
    got, reasons = embed_all(clip224, images, "pil")
    assert reasons == [None] * len(names)
    cosines = {n: cosine(a, reference(clip224, data)) for n, a, data in zip(names, got, images)}
    assert min(cosines.values()) >= 0.99999, cosines


def test_torch_decoder_matches_pil_on_every_image_type(clip224):
    names = list(IMAGE_TYPES)
    images = [IMAGE_TYPES[n][0]() for n in names]
    ref, ref_reasons = embed_all(clip224, images, "pil")
    got, reasons = embed_all(clip224, images, "torch")
    assert reasons == ref_reasons == [None] * len(names)
    cosines = {n: cosine(a, b) for n, a, b in zip(names, got, ref)}
    assert min(cosines.values()) >= 0.999, cosines
    # The crops themselves: within two 8-bit levels on average.
    spec = input_spec(clip224[0])
    pil, torch_dec = PilDecoder(spec, 10**8), TorchDecoder(spec, 10**8)
    for name, data in zip(names, images):
        a, b = pil.decode(data).crop, torch_dec.decode(data).crop
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == b.dtype == np.uint8, name
        assert float(np.abs(a.astype(float) - b.astype(float)).mean()) < 2, name


def test_a_thumbnail_never_changes_the_embedding(clip224):
    """The report's thumbnails come from the pixels the embedding was made from, so a job (which
    makes them) and the notebook API (which does not) give the same embedding."""
    decoder = TorchDecoder(input_spec(clip224[0]), 10**8)
    for name in ("jpeg_large", "jpeg_progressive", "png_rgb", "png_palette"):
        data = IMAGE_TYPES[name][0]()
        plain, with_thumb = decoder.decode(data), decoder.decode(data, thumbnail=True)
        assert plain.thumbnail is None and with_thumb.thumbnail is not None, name
        assert bool((plain.crop == with_thumb.crop).all()), name
        thumb = Image.open(io.BytesIO(with_thumb.thumbnail))
        assert thumb.format == "JPEG" and max(thumb.size) <= 128, name


def test_the_model_input_is_read_from_open_clips_preprocess_cfg(clip224):
    spec, model, _ = clip224
    cfg = model.visual.preprocess_cfg
    got = input_spec(spec)
    assert got == InputSpec(tuple(cfg["size"]), "RGB", tuple(cfg["mean"]), tuple(cfg["std"]), "bicubic", "shortest", 0)
    assert got.tensor_ops
    # A preprocess the tensor path cannot express: every image goes through Pillow.
    longest = InputSpec.of(dict(cfg, resize_mode="longest"))
    assert not longest.tensor_ops and type(make_decoder("torch", longest, 10**8)) is PilDecoder
    assert resolve_decoder("auto") == "torch" and resolve_decoder("pil") == "pil"


def hostile_members() -> list[tuple[str, bytes]]:
    good = save(photo("coffee"), "JPEG")
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 64] = b"\xff" * 64
    png = photo_bytes("coffee", "PNG")
    return [
        ("good.jpg", good),
        ("cut_half.jpg", good[: len(good) // 2]),
        ("cut_before_eoi.jpg", good[:-2]),
        ("cut_header.jpg", good[:300]),
        ("corrupt_scan.jpg", bytes(corrupt)),
        ("trailing_garbage.jpg", good + b"garbage after the end of the image"),
        ("zero_padded.jpg", good + b"\0" * 100),
        ("empty.jpg", b""),
        ("text.jpg", b"this is not an image"),
        ("cut.png", png[: len(png) // 2]),
        ("bad_crc.png", png[:40] + bytes([png[40] ^ 0xFF]) + png[41:]),
        ("big.jpg", save(photo("rocket", (3000, 2000)), "JPEG")),
        ("fine.png", png),
        # A zTXt chunk after the pixels that inflates past Pillow's MAX_TEXT_CHUNK: refused by
        # Pillow at load(), never seen by libpng; both decoders must say the same.
        ("ztxt_bomb.png", ztxt_bomb(png)),
    ]


def test_hostile_members_get_the_same_reasons_from_both_decoders(clip224):
    images = [data for _, data in hostile_members()]
    _, pil = embed_all(clip224, images, "pil")
    _, torch_reasons = embed_all(clip224, images, "torch")
    assert torch_reasons == pil
    assert pil[0] is None and pil[1] is not None and pil[-2] is None
    assert pil[-1].lower().startswith("corrupt or truncated image: decompressed data too large")


def test_an_extreme_aspect_ratio_never_materialises_its_long_resize(clip224, monkeypatch):
    """A 129-byte 1x16000 PNG resizes to 224x3.6M pixels before its centre crop; it is cropped
    while resized instead, on both decoders, within rounding of the full resize."""
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(tuple(size)) or resize(self, size, *a, **k))
    spec = input_spec(clip224[0])
    tall = extreme_aspect_png(16000)
    assert len(tall) < 2000
    for decoder in (PilDecoder(spec, 10**8), TorchDecoder(spec, 10**8)):
        got = decoder.decode(tall, thumbnail=True)
        assert got.reason is None and got.crop.shape == (3, 224, 224) and got.thumbnail
    assert sizes and max(w * h for w, h in sizes) <= 224 * 224, sizes
    # The same crop as open_clip's transforms give after the full resize, within rounding.
    monkeypatch.setattr(Image.Image, "resize", resize)
    pil = PilDecoder(spec, 10**8)
    for size in [(20, 1000), (1000, 20), (3, 2000), (1500, 12)]:
        image = photo("astronaut", size)
        full = image
        for transform in pil.transforms:
            full = transform(full)
        got = pil.decode(save(image, "PNG")).crop.astype(int)
        diff = np.abs(got - np.asarray(full).transpose(2, 0, 1))
        assert diff.max() <= 3 and diff.mean() < 0.5, (size, diff.max(), diff.mean())


def test_both_decoders_account_for_a_hostile_shard_alike(tmp_path, tiny_clip, tiny_weights):
    write_shard(tmp_path / "hostile.tar", hostile_members())
    outcomes = {}
    for decoder in ("pil", "torch"):
        out = tmp_path / decoder
        code = main(["run", str(tmp_path / "hostile.tar"), "-o", str(out), "--model-dir", str(tmp_path / "models"),
                     "--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
                     "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "0", "--no-report",
                     "--image-decoder", decoder, "--max-image-pixels", "4000000"])
        manifest = json.loads((out / "manifest.json").read_text())
        errors = pd.read_parquet(out / "errors").set_index("key")["error"].sort_index()
        outcomes[decoder] = (code, manifest["totals"], errors.to_dict(), sorted(pd.read_parquet(out / "kept")["key"]))
        assert manifest["settings"]["image_decoder"] == decoder
        assert {json.loads(p.read_text())["image_decoder"] for p in (out / "_parts").glob("*.json")} == {decoder}
    assert outcomes["pil"] == outcomes["torch"]
    code, totals, errors, kept = outcomes["torch"]
    assert code == 0 and totals["rows_in"] == len(hostile_members()) and "big" in errors
    assert kept == ["fine", "good", "trailing_garbage", "zero_padded"]
