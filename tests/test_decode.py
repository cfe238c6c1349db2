"""The torch decoder against the PIL reference (issue 11): the same embedding within tolerance for
every image type, the same accounting and reasons for hostile members, on CPU. The batched path
(nvJPEG on a GPU) runs here with torchvision's CPU decoder."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aesthetic_dask.cli import main
from aesthetic_dask.decode import PilDecoder, TensorPreprocess, TorchDecoder, _tensor_kind, make_decoder, resolve_decoder
from aesthetic_dask.embed import ClipModel, ClipSpec, ImageEmbedder
from conftest import photo_bytes, write_shard


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
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("clip224")
    (d / "parity-clip.json").write_text(json.dumps(PARITY_CLIP))
    open_clip.add_model_config(str(d / "parity-clip.json"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("parity-clip").state_dict(), d / "parity-clip.pt")
    spec = ClipSpec("parity-clip", str(d / "parity-clip.pt"), str(d / "parity-clip.json"), str(d / "cache"))
    return ClipModel(spec)


def embed_all(clip, images: list[bytes], decoder: str, batched: bool = False):
    embedder = ImageEmbedder(clip, batch_size=4, max_pixels=10**8, decode_threads=2, decoder=decoder)
    if batched:
        embedder.decoder.batched = True
    rows, reasons = [], []
    for decoded, features in embedder.batches(images):
        feats = iter(features.numpy()) if features is not None else iter(())
        for d in decoded:
            rows.append(next(feats) if d.reason is None else None)
            reasons.append(d.reason)
    return rows, reasons


def test_each_image_type_takes_the_declared_path():
    for name, (make, kind) in IMAGE_TYPES.items():
        data = make()
        assert _tensor_kind(Image.open(io.BytesIO(data)), data) == kind, name


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched"])
def test_torch_decoder_matches_pil_on_every_image_type(clip224, batched):
    names = list(IMAGE_TYPES)
    images = [IMAGE_TYPES[n][0]() for n in names]
    assert type(make_decoder("torch", clip224.preprocess, 10**8, clip224.tensor_preprocess, "cpu")) is TorchDecoder
    ref, ref_reasons = embed_all(clip224, images, "pil")
    got, reasons = embed_all(clip224, images, "torch", batched)
    assert reasons == ref_reasons == [None] * len(names)
    cosines = {n: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for n, a, b in zip(names, got, ref)}
    assert min(cosines.values()) >= 0.999, cosines
    # The preprocessed pixels themselves: within two 8-bit levels, normalised (1/255/std ~ 0.015 each).
    pil, torch_dec = PilDecoder(clip224.preprocess, 10**8), TorchDecoder(clip224.preprocess, 10**8, clip224.tensor_preprocess)
    for name, data in zip(names, images):
        a, b = pil.decode(data).tensor, torch_dec.decode(data).tensor
        assert a.shape == b.shape == (3, 224, 224), name
        assert float((a - b).abs().mean()) < 0.01, name


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched"])
def test_a_thumbnail_never_changes_the_embedding(clip224, batched):
    """The report's thumbnails come from the pixels the embedding was made from, so a job (which
    makes them) and the notebook API (which does not) give the same embedding."""
    decoder = TorchDecoder(clip224.preprocess, 10**8, clip224.tensor_preprocess)
    decoder.batched = batched
    for name in ("jpeg_large", "jpeg_progressive", "png_rgb", "png_palette"):
        data = IMAGE_TYPES[name][0]()
        plain, with_thumb = decoder.finish([decoder.decode(data), decoder.decode(data, thumbnail=True)])
        assert plain.thumbnail is None and with_thumb.thumbnail is not None, name
        assert bool((plain.tensor == with_thumb.tensor).all()), name
        thumb = Image.open(io.BytesIO(with_thumb.thumbnail))
        assert thumb.format == "JPEG" and max(thumb.size) <= 128, name


def test_only_baseline_colour_jpegs_wait_for_the_device_batch(clip224):
    decoder = TorchDecoder(clip224.preprocess, 10**8, clip224.tensor_preprocess)
    decoder.batched = True
    waiting = {name for name, (make, _) in IMAGE_TYPES.items() if decoder.decode(make()).jpeg is not None}
    assert waiting == {"jpeg_420_q75", "jpeg_444_q95", "jpeg_exif_rotated", "jpeg_large", "jpeg_tiny", "jpeg_wide"}


def test_the_tensor_preprocess_is_read_from_the_model_config(clip224):
    tp = clip224.tensor_preprocess
    cfg = clip224.model.visual.preprocess_cfg
    assert tp == TensorPreprocess(tuple(cfg["size"]), "shortest", "bicubic", tuple(cfg["mean"]), tuple(cfg["std"]))

    class Visual:
        preprocess_cfg = dict(cfg, resize_mode="longest")

    class Model:
        visual = Visual()

    # A preprocess the tensor path cannot express: every image goes through Pillow.
    assert TensorPreprocess.of(Model()) is None
    assert type(make_decoder("torch", clip224.preprocess, 10**8, None, "cpu")) is PilDecoder
    assert resolve_decoder("auto", "cuda") == "torch" and resolve_decoder("pil", "cuda") == "pil"


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
    ]


def test_hostile_members_get_the_same_reasons_from_both_decoders_batched_or_not(clip224):
    images = [data for _, data in hostile_members()]
    _, pil = embed_all(clip224, images, "pil")
    _, torch_each = embed_all(clip224, images, "torch")
    _, torch_batched = embed_all(clip224, images, "torch", batched=True)
    assert torch_each == pil and torch_batched == pil
    assert pil[0] is None and pil[1] is not None and pil[-1] is None


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
