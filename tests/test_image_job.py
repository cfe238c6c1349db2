import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import aesthetic_dask as ad
from aesthetic_dask.cli import main
from conftest import assert_one_clear_line, photo_bytes, run_cli_process, write_shard, unit_scores

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def clip_args(tiny_clip, tiny_weights):
    return ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"])]


def run(tmp_path, inputs, tiny_clip, tiny_weights, *extra) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = main(["run", *map(str, inputs), "-o", str(out), "--model-dir", str(tmp_path / "models"),
                 *clip_args(tiny_clip, tiny_weights), *map(str, extra)])
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return code, manifest


def reference(tiny_clip, images: list[bytes]) -> np.ndarray:
    """open_clip's own path: create_model_and_transforms, preprocess, encode_image, L2-normalise."""
    import open_clip
    import torch

    open_clip.add_model_config(str(tiny_clip["config"]))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(tiny_clip["checkpoint"]))
    model.eval()
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
        f = model.encode_image(x)
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def min_cosine(got: np.ndarray, ref: np.ndarray) -> float:
    """The lowest cosine similarity between matching rows (the default decoder is within 1e-4 of
    open_clip's PIL preprocess; the PIL decoder is exact)."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(((got * ref).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)).min())


@pytest.fixture
def shards(tmp_path):
    paths = []
    for s in range(2):
        members = []
        for i, name in enumerate(PHOTOS):
            key = f"{s:02d}{i:04d}"
            members += [(f"{key}.jpg", photo_bytes(name)), (f"{key}.txt", f"a photo of {name}".encode()),
                        (f"{key}.json", json.dumps({"width": 100 + i, "name": name, "nsfw": False}).encode())]
        paths.append(write_shard(tmp_path / "shards" / f"shard-{s:05d}.tar", members))
    return paths


def test_run_matches_the_open_clip_reference_and_keeps_metadata(tmp_path, shards, tiny_clip, tiny_weights):
    code, m = run(tmp_path, [tmp_path / "shards"], tiny_clip, tiny_weights, "--keep-embeddings", "--keep-rejected",
                  "--threshold", "5.4", "--json-fields", "width:int64,name,missing:float64", "--batch-size", "3")
    assert code == 0 and m["totals"]["rows_in"] == 8 and m["totals"]["rows_error"] == 0
    rows = pd.concat([pd.read_parquet(tmp_path / "out" / d) for d in ("kept", "rejected") if (tmp_path / "out" / d).exists()])
    rows = rows.sort_values("key")
    assert list(rows["key"]) == [f"{s:02d}{i:04d}" for s in range(2) for i in range(4)]
    assert list(rows["caption"]) == [f"a photo of {n}" for n in PHOTOS] * 2
    assert json.loads(rows["json"].iloc[0]) == {"width": 100, "name": "astronaut", "nsfw": False}
    assert list(rows["width"]) == [100, 101, 102, 103] * 2 and str(rows["width"].dtype) == "int64"
    assert list(rows["name"]) == list(PHOTOS) * 2 and rows["missing"].isna().all()
    assert rows["source"].str.endswith(".tar").all()
    ref = reference(tiny_clip, [photo_bytes(n) for n in PHOTOS] * 2)
    assert min_cosine(np.stack(rows["embedding"].to_numpy()), ref) >= 0.9999
    predictor = ad.load_predictor(str(tiny_weights["safetensors"]), tmp_path / "models")
    np.testing.assert_allclose(rows["aesthetic_score"].to_numpy(), unit_scores(predictor, ref), atol=1e-4)
    schema = pq.read_schema(next((tmp_path / "out" / "kept").glob("*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 768)
    assert schema.field("aesthetic_score").type == pa.float32()
    assert "image" not in schema.names


def test_odd_pil_modes_and_extensions_all_embed(tmp_path, tiny_clip, tiny_weights):
    frames = [Image.new("P", (40, 30), i * 40) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    i16 = io.BytesIO()
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(i16, "PNG")
    members = [
        ("gray.png", photo_bytes("camera", "PNG")),
        ("la.png", photo_bytes("astronaut", "PNG", "LA")),
        ("palette.png", photo_bytes("astronaut", "PNG", "P")),
        ("rgba.webp", photo_bytes("astronaut", "WEBP", "RGBA")),
        ("cmyk.JPEG", photo_bytes("coffee", "JPEG", "CMYK")),
        ("deep.png", i16.getvalue()),
        ("anim.gif", gif.getvalue()),
        ("upper.JPG", photo_bytes("chelsea")),
    ]
    assert Image.open(io.BytesIO(members[5][1])).mode == "I;16"
    write_shard(tmp_path / "modes.tar", members)
    code, m = run(tmp_path, [tmp_path / "modes.tar"], tiny_clip, tiny_weights, "--keep-embeddings", "--threshold", "0")
    assert code == 0 and m["totals"] == {"rows_in": 8, "rows_kept": 8, "rows_below_threshold": 0, "rows_error": 0, "rows_unknown_partitions": 0}
    kept = pd.read_parquet(tmp_path / "out" / "kept").set_index("key")
    ref = reference(tiny_clip, [b for _, b in members])
    assert min_cosine(np.stack(kept.loc[[n.split(".")[0] for n, _ in members], "embedding"].to_numpy()), ref) >= 0.9999


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_every_corrupt_sample_kind_is_counted_and_explained(tmp_path, tiny_clip, tiny_weights):
    good = photo_bytes("coffee")
    members = [
        ("ok.jpg", good), ("ok.txt", b"fine"),
        ("truncated.jpg", good[: len(good) // 2]),
        ("empty.jpg", b""),
        ("notimage.jpg", b"this is text, not a JPEG"),
        ("captiononly.txt", b"no image here"),
        ("bomb.png", png_bomb(60000, 60000)),
        ("big.png", photo_bytes("astronaut", "PNG")),
    ]
    write_shard(tmp_path / "bad.tar", members)
    code, m = run(tmp_path, [tmp_path / "bad.tar"], tiny_clip, tiny_weights, "--max-image-pixels", "250000", "--threshold", "0")
    assert code == 0
    assert m["totals"] == {"rows_in": 7, "rows_kept": 1, "rows_below_threshold": 0, "rows_error": 6, "rows_unknown_partitions": 0}
    errors = pd.read_parquet(tmp_path / "out" / "errors").set_index("key")["error"]
    assert errors["truncated"].startswith("corrupt or truncated image")
    assert errors["empty"] == "empty image file"
    assert errors["notimage"] == "not a JPEG, PNG, WebP or GIF image (no other format is decoded)"
    assert errors["captiononly"] == "no image"
    assert "pixel" in errors["bomb"]
    assert errors["big"] == "image is 512x512 = 262144 pixels, over the limit of 250000 (max_image_pixels)"


def test_shard_level_failures_keep_what_was_read(tmp_path, shards, tiny_clip, tiny_weights):
    (tmp_path / "in").mkdir()
    data = shards[0].read_bytes()
    header = data.find(b"000003.jpg")  # the last sample's first header: 3 samples are whole
    (tmp_path / "in" / "truncated.tar").write_bytes(data[: header + 100])
    cut_inside = data.find(b"000002.jpg") + 512 + 2000  # inside the third image's data
    (tmp_path / "in" / "cut.tar").write_bytes(data[:cut_inside])
    (tmp_path / "in" / "nottar.tar").write_bytes(b"just some bytes " * 100)
    with tarfile.open(tmp_path / "in" / "empty.tar", "w"):
        pass
    code, m = run(tmp_path, [tmp_path / "in"], tiny_clip, tiny_weights, "--threshold", "0")
    assert code == 3 and m["status"] == "partial"
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in m["inputs"].items()}
    assert by_name["truncated.tar"]["rows_in"] == 3 and "archive truncated: no end-of-archive marker after 3 samples" in by_name["truncated.tar"]["failures"][0]
    assert by_name["cut.tar"]["rows_in"] == 3 and by_name["cut.tar"]["rows_error"] == 1
    assert by_name["nottar.tar"]["rows_in"] == 0 and "not a tar archive" in by_name["nottar.tar"]["failures"][0]
    assert by_name["empty.tar"]["rows_in"] == 0 and "empty shard" in by_name["empty.tar"]["notes"][0]
    assert m["totals"]["rows_kept"] == 5
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    assert errors["error"].tolist() == ["sample cut off by archive damage: ReadError"] and errors["key"].tolist() == ["000002"]


def test_member_names_are_never_paths_and_nothing_is_written_outside_out(tmp_path, tiny_clip, tiny_weights, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_shard(tmp_path / "evil.tar", [("../../escape.jpg", photo_bytes("coffee")), ("/abs/path.jpg", photo_bytes("chelsea"))])
    before = {p for p in tmp_path.rglob("*")}
    code, m = run(tmp_path, [tmp_path / "evil.tar"], tiny_clip, tiny_weights, "--threshold", "0")
    assert code == 0 and m["totals"]["rows_kept"] == 2
    created = {p for p in tmp_path.rglob("*")} - before
    allowed = (tmp_path / "out", tmp_path / "models")
    assert all(any(p == a or a in p.parents for a in allowed) for p in created), sorted(created)
    assert sorted(pd.read_parquet(tmp_path / "out" / "kept")["key"]) == ["../../escape", "/abs/path"]


def test_a_gone_shard_is_pruned_through_every_sink_its_tars_included(tmp_path, shards, tiny_clip, tiny_weights):
    """--prune-missing removes what every sink wrote for a gone input (issue 31: removal goes through
    the sinks): its kept/, errors/ and samples/ files, its record, and its --write-shards tar with the
    rows file and stats beside it; everything of the other input stays."""
    ws, out = tmp_path / "kept-shards", tmp_path / "out"
    args = ("--threshold", "0", "--write-shards", ws)
    assert run(tmp_path, [shards[0].parent], tiny_clip, tiny_weights, *args)[0] == 0

    def files() -> set[str]:
        return {str(p.relative_to(tmp_path)) for d in (out, ws) for p in d.rglob("*") if p.is_file()}

    before, gone = files(), shards[1].stem
    written = {f.split("/")[1] for f in before if gone in f}
    assert {"kept", "errors", "samples", "_parts"} <= written and any(f.startswith("kept-shards/") for f in before if gone in f)
    assert len([f for f in before if gone in f and f.startswith("kept-shards/")]) == 3  # tar, rows, stats
    shards[1].unlink()
    code, m = run(tmp_path, [shards[0].parent], tiny_clip, tiny_weights, *args, "--prune-missing")
    assert code == 0 and m["missing_inputs"] == []
    assert files() == {f for f in before if gone not in f}


def test_write_shards_copies_the_kept_samples(tmp_path, shards, tiny_clip, tiny_weights):
    predictor = ad.load_predictor(str(tiny_weights["safetensors"]), tmp_path / "models")
    scores = unit_scores(predictor, reference(tiny_clip, [photo_bytes(n) for n in PHOTOS]))
    threshold = float(np.sort(scores)[2])  # keeps the best two
    code, m = run(tmp_path, [shards[0]], tiny_clip, tiny_weights, "--threshold", threshold, "--write-shards", tmp_path / "kept-shards")
    assert code == 0
    kept = set(pd.read_parquet(tmp_path / "out" / "kept")["key"])
    assert len(kept) == 2
    (tar_path,) = (tmp_path / "kept-shards").glob("*.tar")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert {n.split(".")[0] for n in names} == kept
        assert len(names) == 3 * len(kept)
        with tarfile.open(shards[0]) as src:
            for n in names:
                assert tar.extractfile(n).read() == src.extractfile(n).read()


def test_image_parquet_input_binary_and_struct(tmp_path, tiny_clip, tiny_weights):
    imgs = [photo_bytes(n) for n in PHOTOS]
    pq.write_table(pa.table({"key": ["p0", "p1", "p2", "p3"], "image": pa.array(imgs, pa.binary())}), tmp_path / "a.parquet")
    struct_col = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs[:2])] + [{"bytes": b"", "path": "x"}])
    pq.write_table(pa.table({"key": ["s0", "s1", "s2"], "image": struct_col}), tmp_path / "b.parquet")
    code, m = run(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], tiny_clip, tiny_weights, "--threshold", "0", "--keep-embeddings")
    assert code == 0 and m["totals"] == {"rows_in": 7, "rows_kept": 6, "rows_below_threshold": 0, "rows_error": 1, "rows_unknown_partitions": 0}
    kept = pd.read_parquet(tmp_path / "out" / "kept").set_index("key")
    ref = reference(tiny_clip, imgs)
    assert min_cosine(np.stack(kept.loc[["p0", "p1", "p2", "p3"], "embedding"].to_numpy()), ref) >= 0.9999
    assert pd.read_parquet(tmp_path / "out" / "errors")["error"].tolist() == ["empty image file"]


def test_lazy_api_read_embed_score_filter(tmp_path, shards, tiny_clip, tiny_weights):
    cfg = ad.load_config(clip_model_config=str(tiny_clip["config"]), clip_pretrained=str(tiny_clip["checkpoint"]),
                         aesthetic_weights=str(tiny_weights["safetensors"]), model_dir=str(tmp_path / "models"), batch_size=2)
    ddf = ad.read_webdataset(str(tmp_path / "shards"), json_fields="width:int64")
    assert ddf.npartitions == 2 and {"key", "source", "image", "caption", "json", "width"} <= set(ddf.columns)
    embedded = ad.embed_images(ddf, cfg)
    assert "image" not in embedded.columns and "embedding" in embedded.columns
    scored = ad.score_embeddings(embedded, cfg)
    df = ad.filter_by_score(scored, 0.0).compute(scheduler="sync")
    assert len(df) == 8 and df["error"].isna().all()
    ref = reference(tiny_clip, [photo_bytes(n) for n in PHOTOS])
    assert min_cosine(np.stack(df["embedding"].iloc[:4].to_numpy()), ref) >= 0.9999


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clip-model", "ViT-Nope"], "--clip-model ViT-Nope: not an open_clip model"),
        (["--clip-model", "ViT-B-32"], "--clip-model ViT-B-32 gives 512-d embeddings; the aesthetic predictor expects 768"),
        (["--clip-model", "ViT-L-14-quickgelu", "--clip-pretrained", "laion9000"], "open_clip has no such tag for ViT-L-14-quickgelu (tags: openai"),
        (["--clip-pretrained", "/no/such/ckpt.pt"], "--clip-pretrained /no/such/ckpt.pt: no such file"),
        (["--json-fields", "width:int32"], "json field 'width:int32': type must be one of"),
        (["--image-column", "img"], "no column 'img'"),
    ],
)
def test_run_bad_input_is_one_clear_line_and_exit_2(tmp_path, shards, tiny_clip, tiny_weights, extra, message):
    pq.write_table(pa.table({"key": ["a"], "image": pa.array([photo_bytes("coffee")], pa.binary())}), tmp_path / "img.parquet")
    inputs = [str(tmp_path / "img.parquet")] if "--image-column" in extra else [str(tmp_path / "shards")]
    argv = ["run", *inputs, "-o", str(tmp_path / "out"), "--model-dir", str(tmp_path / "models")]
    base = {"--clip-model-config": str(tiny_clip["config"]), "--clip-pretrained": str(tiny_clip["checkpoint"]),
            "--aesthetic-weights": str(tiny_weights["safetensors"])}
    if "--clip-model" in extra:
        base.pop("--clip-model-config")
        base.pop("--clip-pretrained")
    for flag, value in base.items():
        if flag not in extra:
            argv += [flag, value]
    assert_one_clear_line(run_cli_process(argv + extra), 2, message)
