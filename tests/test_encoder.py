"""The encoder (issue 17): the image tower loaded on the meta device is open_clip's own model, batches
mix partitions, torch.compile keeps the embeddings, and the notebook API declares the real width."""

import json
import logging
import threading
from concurrent.futures import Future

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import aesthetic_dask as ad
from aesthetic_dask.errors import ConfigError
from aesthetic_dask.models.clip import ClipSpec
from aesthetic_dask.pipeline import encoder as encoder_module
from aesthetic_dask.pipeline.encoder import ClipEncoder
from conftest import TINY_CLIP_CONFIG, photo_bytes, write_shard


@pytest.fixture(scope="module")
def spec(tiny_clip, tmp_path_factory):
    return ClipSpec("tiny-clip", str(tiny_clip["checkpoint"]), str(tiny_clip["config"]),
                    str(tmp_path_factory.mktemp("cache")))


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def test_the_meta_device_load_is_open_clips_own_model(spec, tiny_clip):
    import open_clip

    enc = ClipEncoder(spec, 8, "false")
    model = open_clip.create_model("tiny-clip", pretrained=str(tiny_clip["checkpoint"])).eval()
    x = crops(5)
    got = enc.encode(x).result()
    with torch.no_grad():
        # open_clip's ToTensor + Normalize, then its encode_image.
        mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
        want = model.encode_image((torch.from_numpy(x).float() / 255 - mean) / std)
        want = want / want.norm(dim=-1, keepdim=True)
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999
    assert not hasattr(enc, "model") and enc.embed_dim == 768 and enc.load_s < 30


def test_batches_are_filled_from_several_partitions_and_each_gets_its_own_rows(spec):
    enc = ClipEncoder(spec, 16, "false")
    parts = [crops(3, seed) for seed in range(6)]
    alone = [enc.encode(p).result() for p in parts]
    before = enc.images
    launched = []
    real_launch = enc._launch
    enc._launch = lambda buffer, n, stream: launched.append(n) or real_launch(buffer, n, stream)
    gate = threading.Event()
    enc.queue.put(encoder_module._Request(crops(1, 99), gate.wait, Future()))
    futures = [enc.encode(p) for p in parts]  # queued while the first request's release blocks the thread
    gate.set()
    together = [f.result() for f in futures]
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, atol=1e-5)
    assert enc.images - before == 19 and max(launched) > 3  # one batch held several partitions' crops


def test_compile_keeps_the_embeddings_and_pads_to_one_shape(spec):
    eager = ClipEncoder(spec, 8, "false")
    compiled = ClipEncoder(spec, 8, "true")
    assert compiled.compiled
    for n in (5, 8, 1):  # partial batches are padded to the compiled shape
        x = crops(n, n)
        a, b = eager.encode(x).result(), compiled.encode(x).result()
        assert a.shape == b.shape == (n, 768)
        assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.9999


def test_compile_auto_is_eager_on_cpu_and_a_failed_compile_falls_back_in_one_line(spec, monkeypatch, caplog):
    assert not ClipEncoder(spec, 8, "auto").compiled  # auto compiles on CUDA only

    def broken(*args, **kwargs):
        raise RuntimeError("inductor is not available\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    enc = ClipEncoder(spec, 8, "false")
    with caplog.at_level(logging.WARNING, logger="aesthetic_dask"):
        enc._compile("auto")
    assert not enc.compiled and enc.forward is enc.visual
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the image tower failed (RuntimeError: inductor is not available); running eager"]
    with pytest.raises(RuntimeError):
        enc._compile("true")


def test_embed_images_declares_the_width_the_model_gives(tmp_path):
    """A 512-d CLIP (as the registered ViT-B heads expect): the lazy frame's meta says [512], as its partitions hold."""
    import open_clip

    config = tmp_path / "tiny512.json"
    config.write_text(json.dumps(dict(TINY_CLIP_CONFIG, embed_dim=512)))
    open_clip.add_model_config(str(config))
    torch.save(open_clip.create_model("tiny512").state_dict(), tmp_path / "tiny512.pt")
    write_shard(tmp_path / "s" / "a.tar", [("a.jpg", photo_bytes("coffee")), ("b.jpg", photo_bytes("rocket"))])
    cfg = ad.load_config(clip_model_config=str(config), clip_pretrained=str(tmp_path / "tiny512.pt"),
                         model_dir=str(tmp_path / "models"))
    embedded = ad.embed_images(ad.read_webdataset(str(tmp_path / "s")), cfg)
    assert embedded.dtypes["embedding"] == pd.ArrowDtype(pa.list_(pa.float32(), 512))
    frame = embedded.compute(scheduler="sync")
    assert frame["embedding"].dtype == pd.ArrowDtype(pa.list_(pa.float32(), 512)) and len(frame) == 2


def test_column_selection_reaches_the_parquet_reader(tmp_path, monkeypatch):
    """`ad.read_embeddings(path)[["key", "caption"]]` reads two columns, never the embeddings."""
    from aesthetic_dask import embeddings_reader
    from conftest import write_embeddings

    write_embeddings(tmp_path / "a.parquet", np.random.default_rng(0).standard_normal((10, 768)).astype(np.float32))
    real, asked = embeddings_reader.read_parquet_rows, []

    def recording(url, start, stop, row_groups=None, storage_options=None, columns=None):
        asked.append(columns)
        return real(url, start, stop, row_groups, storage_options, columns)

    monkeypatch.setattr(embeddings_reader, "read_parquet_rows", recording)
    frame = ad.read_embeddings(str(tmp_path / "a.parquet"))[["key", "caption"]].compute(scheduler="sync")
    assert list(frame.columns) == ["key", "caption"] and len(frame) == 10
    assert asked == [["key", "caption"]]


def test_a_notebook_without_widgets_gets_the_text_bar_and_no_warning(monkeypatch, recwarn):
    import importlib.util

    from aesthetic_dask import submit

    monkeypatch.setattr(submit, "in_notebook", lambda: True)
    monkeypatch.setattr(submit.sys.stderr, "isatty", lambda: False, raising=False)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real_find(name, *a))
    from tqdm.std import tqdm

    assert submit.progress_bar_class() is tqdm
    bar = submit.Progress(3, True, "images")
    bar.update({"rows_in": 5})
    bar.close()
    assert not [w for w in recwarn if "IProgress" in str(w.message)]


# --- Precision (issue 28) -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_runs_products_in_it_and_layernorm_in_fp32(spec, tiny_weights, precision):
    """clip_precision fp16 / bf16: the tower's weights in that type, every LayerNorm in fp32; on a
    CPU torch runs both, so their error against fp32 is measured here (the device check measures
    it on the GPU as score_max_abs_diff_fp16_vs_fp32)."""
    from dataclasses import replace

    from aesthetic_dask.models.heads import AestheticPredictor, infer_spec

    reduced = ClipEncoder(replace(spec, precision=precision), 8, "false")
    full = ClipEncoder(replace(spec, precision="fp32"), 8, "false")
    assert reduced.compute == f"cpu-{precision}" and full.compute == "cpu-fp32"
    norms = [m for m in reduced.visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    linears = [m for m in reduced.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert linears and all(m.weight.dtype == encoder_module.torch_dtype(precision) for m in linears)
    x = crops(8, seed=3)
    a = reduced.encode(x).result().numpy().astype(np.float64)
    b = full.encode(x).result().numpy().astype(np.float64)
    assert a.dtype == b.dtype and np.isfinite(a).all()
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > (0.999 if precision == "fp16" else 0.99), cosine.min()
    head = AestheticPredictor.from_state_dict(tiny_weights["state"], infer_spec(tiny_weights["state"]), "tiny", "0")
    scores = [head.score_raw(m.astype(np.float32), np.einsum("ij,ij->i", m, m).astype(np.float32)) for m in (a, b)]
    assert np.abs(scores[0] - scores[1]).max() < 0.05


def test_cuda_graph_auto_is_off_on_cpu_true_is_refused_there_and_a_failed_capture_falls_back_in_one_line(spec, caplog):
    """clip_cuda_graph (issue 28): auto captures on CUDA only; true off CUDA is one clear error; a
    capture that fails (here for want of a GPU: a real failure, not a stand-in) leaves the encoder
    launching kernel by kernel, with one log line, and its embeddings unchanged."""
    enc = ClipEncoder(spec, 8, "false", "auto")
    assert enc.graph is None
    with pytest.raises(ValueError, match="^clip_cuda_graph is true but this worker's model runs on cpu, not CUDA$"):
        ClipEncoder(spec, 8, "false", "true")
    before = enc.encode(crops(5, 1)).result()
    with caplog.at_level(logging.WARNING, logger="aesthetic_dask"):
        enc._capture("auto")
    assert enc.graph is None
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("CUDA graph capture of the model step failed (") and "\n" not in message
    assert message.endswith("); launching its kernels one by one")
    assert torch.equal(enc.encode(crops(5, 1)).result(), before)
    with pytest.raises(Exception):
        enc._capture("true")
    assert enc.launch_cpu_ms_per_image() > 0  # what the model's thread spent per image launching batches


def test_clip_cuda_graph_is_a_config_option_with_yamls_booleans():
    assert ad.load_config().clip_cuda_graph == "auto"
    assert ad.load_config(clip_cuda_graph=False).clip_cuda_graph == "false"
    with pytest.raises(ConfigError, match="clip_cuda_graph"):
        ad.load_config(clip_cuda_graph="sometimes")


def test_precision_is_what_the_config_asks_and_auto_follows_the_device():
    from aesthetic_dask.models.clip import compute_precision

    assert compute_precision("auto", "cuda") == "cuda-fp16" and compute_precision("auto", "cpu") == "cpu-fp32"
    assert compute_precision("bf16", "cuda") == "cuda-bf16" and compute_precision("fp16", "cpu") == "cpu-fp16"
    assert ad.load_config(clip_precision="bf16").clip_precision == "bf16"


def test_open_clips_no_weights_note_stays_quiet_while_any_thread_expects_it(caplog):
    """A worker's partition threads and its model load expect random weights at once (the demo
    CLIP, the meta-device model): one leaving must not let another's note through."""
    from aesthetic_dask.models.quiet import random_weights_expected

    with random_weights_expected():
        with random_weights_expected():  # another thread's, leaving first
            pass
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    logging.warning("No pretrained weights loaded for model 'y'. Model initialized randomly.")
    assert "'x'" not in caplog.text and "'y'" in caplog.text
