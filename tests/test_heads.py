"""Predictor heads (issue 9): CLIP compatibility checked before any download, the real published
heads against float64 references of their architectures, several scores in one pass."""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from aesthetic_dask.config import load_config
from aesthetic_dask.errors import WeightsError
from aesthetic_dask.models import fetch, heads, registry
from aesthetic_dask.cli import main
from aesthetic_dask.embed import ClipSpec
from aesthetic_dask.errors import InputError
from aesthetic_dask.models.load import load_predictor
from conftest import assert_one_clear_line, photo_bytes, run_cli_process, write_embeddings, write_shard, unit_scores

DEFAULT_HEAD = load_config().aesthetic_weights  # conf/default.yaml: the one default

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SHARED_FILES = {
    "sac+logos+ava1-l14-linearMSE": "improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
    "ava+logos-l14-linearMSE": "improved-aesthetic-predictor/ava+logos-l14-linearMSE.pth",
    "ava+logos-l14-reluMSE": "improved-aesthetic-predictor/ava+logos-l14-reluMSE.pth",
    "sa_0_4_vit_l_14_linear": "laion-aesthetic-v1/sa_0_4_vit_l_14_linear.pth",
    "sa_0_4_vit_b_16_linear": "laion-aesthetic-v1/sa_0_4_vit_b_16_linear.pth",
    "sa_0_4_vit_b_32_linear": "laion-aesthetic-v1/sa_0_4_vit_b_32_linear.pth",
}


def shared_file(name: str) -> Path:
    path = SHARED / SHARED_FILES[name]
    if not path.is_file():
        pytest.skip(f"real head {name} not present at {path}")
    return path


def seed_cache(name: str, model_dir: Path) -> Path:
    """Put the shared copy of a registered head where its pinned URL source would download it."""
    src = next(s for s in registry.REGISTRY[name].sources if isinstance(s, registry.UrlFile))
    target = src.local_copy(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_file(name), target)
    return target


def published_reference(name: str, state: dict) -> torch.nn.Module:
    """Each head's architecture as its upstream repository builds it, in float64."""
    layout = registry.REGISTRY[name].spec.layout
    if layout == "linear":
        model = torch.nn.Linear(state["weight"].shape[1], 1)
    else:
        model = torch.nn.Module()
        if layout == "improved-linear":
            model.layers = torch.nn.Sequential(
                torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
        else:  # improved-relu: the ReLU MLP of improved-aesthetic-predictor's training script
            model.layers = torch.nn.Sequential(
                torch.nn.Linear(768, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        model.forward = lambda x: model.layers(x)
    model.load_state_dict(state)
    return model.double().eval()


@pytest.mark.parametrize("name", list(SHARED_FILES))
def test_each_real_head_matches_a_float64_reference_of_its_published_architecture(name, tmp_path, monkeypatch, rng):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cache first: no network needed once a verified copy is there
    seed_cache(name, tmp_path)
    by_name = load_predictor(name, tmp_path)
    by_file = load_predictor(str(shared_file(name)), tmp_path)  # layout inferred from the keys
    state = torch.load(shared_file(name), map_location="cpu", weights_only=True)
    dim = by_name.embed_dim
    emb = rng.standard_normal((300, dim)).astype(np.float32)
    x = torch.from_numpy(emb.astype(np.float64))
    with torch.no_grad():
        ref = published_reference(name, state)(x / torch.linalg.vector_norm(x, dim=1, keepdim=True))[:, 0].numpy()
    for predictor in (by_name, by_file):
        got = predictor.score_raw(emb, np.einsum("ij,ij->i", emb, emb))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert by_name.folded == (registry.REGISTRY[name].spec.activation is None) == by_file.folded
    assert 1 < float(np.median(ref)) < 10 or registry.REGISTRY[name].spec.layout == "linear"


def test_registry_declares_layout_license_and_clip_for_every_head():
    for name, entry in registry.REGISTRY.items():
        assert entry.clip.pretrained == "openai" and entry.license in ("Apache-2.0", "MIT")
        assert all(s.sha256 for s in entry.sources if isinstance(s, registry.UrlFile))
        assert entry.spec.layout in heads.LAYOUTS
    assert registry.REGISTRY["ava+logos-l14-reluMSE"].spec.activation == "relu"


def test_a_head_downloads_from_its_pinned_url_and_is_verified(tmp_path, monkeypatch, tiny_weights):
    served = tmp_path / "served" / "head.pth"
    served.parent.mkdir()
    shutil.copyfile(tiny_weights["pth"], served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    entry = dataclasses.replace(registry.REGISTRY["ava+logos-l14-linearMSE"], sources=(registry.UrlFile(served.as_uri(), digest),))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    got = fetch.resolve_weights(entry.name, tmp_path / "models")
    assert got.path.is_file() and got.sha256 == digest and got.path.is_relative_to(tmp_path / "models")
    assert fetch.cached_weights(entry.name, tmp_path / "models").path == got.path
    bad = dataclasses.replace(entry, sources=(registry.UrlFile(served.as_uri(), "0" * 64),))
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(WeightsError, match="does not match the pinned"):
        fetch.resolve_weights(entry.name, tmp_path / "other")


# --- CLIP compatibility: checked in the client, before any download ---------------------------------


def spec(model: str, pretrained: str | None) -> ClipSpec:
    return ClipSpec(model, pretrained, None, "/nonexistent-cache")


def test_open_clips_own_resolution_decides_compatibility():
    default = {"aesthetic_score": registry.REGISTRY[DEFAULT_HEAD]}
    assert spec("ViT-L-14-quickgelu", "openai").check(768, default)["aesthetic_score"].startswith("matches")
    assert spec("ViT-L-14", "openai").check(768, default)["aesthetic_score"].startswith("matches")  # same weights
    # open_clip accepts hf-hub: names; the OpenAI ViT-L/14 on the hub is the same embedding space.
    assert spec("hf-hub:timm/vit_large_patch14_clip_224.openai", None).check(None, default)["aesthetic_score"].startswith("matches")
    with pytest.raises(InputError, match="trained on the embeddings of CLIP --clip-model ViT-L-14-quickgelu --clip-pretrained openai"):
        spec("ViT-L-14", "laion2b_s32b_b82k").check(768, default)
    with pytest.raises(InputError, match="another embedding space"):
        spec("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None).check(None, default)
    with pytest.raises(InputError, match="--extra-scores v1b32=sa_0_4_vit_b_32_linear was trained"):
        spec("ViT-L-14-quickgelu", "openai").check(None, default | {"v1b32": registry.REGISTRY["sa_0_4_vit_b_32_linear"]})
    assert spec("ViT-L-14", "openai").check(768, {"aesthetic_score": None})["aesthetic_score"].startswith("vouched")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clip-pretrained", ""], "--clip-pretrained is empty"),
        (["--clip-model", "ViT-L-14", "--clip-pretrained", "laion2b_s32b_b82k"],
         "sac+logos+ava1-l14-linearMSE was trained on the embeddings of CLIP --clip-model ViT-L-14-quickgelu --clip-pretrained openai"),
        (["--extra-scores", "b32=sa_0_4_vit_b_32_linear"], "sa_0_4_vit_b_32_linear was trained on the embeddings of CLIP --clip-model ViT-B-32-quickgelu"),
    ],
)
def test_incompatible_or_random_clip_is_refused_before_any_download(tmp_path, extra, message):
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee"))])
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="1")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "aesthetic_dask", "run", str(tmp_path / "s.tar"), "-o", str(tmp_path / "out"),
                           "--model-dir", str(tmp_path / "models"), *extra], capture_output=True, text=True, timeout=120, env=env)
    assert_one_clear_line(proc, 2, message)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.pth")), "something was downloaded"


def test_a_local_clip_checkpoint_is_vouched_for_and_recorded(tmp_path, tiny_clip, real_weights, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    seed_cache(DEFAULT_HEAD, models)
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee")), ("b.jpg", photo_bytes("astronaut"))])
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "s.tar"), "-o", str(out), "--model-dir", str(models), "--threshold", "0",
                 "--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"])]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["clip"]["compatibility"]["aesthetic_score"].startswith("vouched: a local CLIP checkpoint")
    assert m["weights"]["name"] == DEFAULT_HEAD and m["weights"]["sha256"].startswith("21dd590f")
    assert m["weights"]["expected_clip"] == {"model": "ViT-L-14-quickgelu", "pretrained": "openai"}
    assert_vouched_is_said(out, "".join(capsys.readouterr()), "aesthetic_score: a local CLIP checkpoint; the head expects "
                           "--clip-model ViT-L-14-quickgelu --clip-pretrained openai")


def assert_vouched_is_said(out: Path, summary: str, what: str) -> None:
    """The summary and the report page say the CLIP was not checked, and what of it, not only the manifest."""
    import html

    said = [line for line in summary.splitlines() if line.strip().startswith("CLIP not checked:")]
    assert said and what in said[0], summary
    page = html.unescape((out / "report.html").read_text())
    assert "CLIP not checked:" in page and what in page


def test_a_local_head_file_is_vouched_for_in_the_summary_and_report(tmp_path, tiny_clip, tiny_weights, capsys):
    """A head file the registry does not know: its CLIP is unknown, and the summary says so."""
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee"))])
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "s.tar"), "-o", str(out), "--model-dir", str(tmp_path / "models"),
                 "--aesthetic-weights", str(tiny_weights["safetensors"]), "--extra-scores", f"again={tiny_weights['pth']}",
                 "--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"])]) == 0
    summary = "".join(capsys.readouterr())
    assert_vouched_is_said(out, summary, "aesthetic_score: a local head file; its CLIP is not known")
    assert "again: a local head file" in summary
    assert "aesthetic-dask run: done\n" in summary  # not a demo


def test_a_registered_clip_and_head_say_nothing_of_vouching():
    from aesthetic_dask.summary import clip_caveats

    matched = {"clip": {"compatibility": {"aesthetic_score": "matches: ViT-L-14-quickgelu/openai"}, "demo": False}}
    assert clip_caveats(matched) == [] and clip_caveats({}) == []


# --- The demo CLIP (offline quick start) ------------------------------------------------------------


def test_demo_clip_runs_the_pipeline_offline_and_says_its_scores_mean_nothing(tmp_path, tiny_weights, capsys, monkeypatch):
    import html

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing to fetch: the demo CLIP is built here
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee")), ("b.jpg", photo_bytes("astronaut")),
                                     ("c.txt", b"no image")])
    models = tmp_path / "models"
    argv = ["run", str(tmp_path / "s.tar"), "--model-dir", str(models), "--demo-clip",
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--threshold", "0", "--keep-rejected"]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    summary = "".join(capsys.readouterr())
    status = next(line for line in summary.splitlines() if line.startswith("aesthetic-dask run: done"))
    assert "demo CLIP" in status and "scores mean nothing" in status
    assert any(line.strip().startswith("demo CLIP:") for line in summary.splitlines())
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["clip"]["demo"] is True and m["clip"]["model"] == "aesthetic-dask-demo-clip"
    assert m["clip"]["compatibility"]["aesthetic_score"].startswith("demo: ")
    assert m["totals"]["rows_in"] == 3 and m["totals"]["rows_kept"] == 2 and m["totals"]["rows_error"] == 1
    page = html.unescape((tmp_path / "a" / "report.html").read_text())
    assert "(demo CLIP)" in page and "its scores mean nothing" in page
    checkpoint = models / "demo-clip" / "aesthetic-dask-demo-clip.pt"
    built = checkpoint.stat().st_mtime_ns
    # Built once, from a fixed seed: a second job loads the same file and scores the same.
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    assert checkpoint.stat().st_mtime_ns == built
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "kept"), pd.read_parquet(tmp_path / "b" / "kept"))
    # The demo CLIP is part of what the job writes: a re-run into the same OUT without it is refused.
    from aesthetic_dask.config import OUTPUT_OPTIONS

    assert "demo_clip" in OUTPUT_OPTIONS["run"]


def test_demo_clip_is_rebuilt_when_its_files_are_incomplete(tmp_path):
    from aesthetic_dask.models.demo import DEMO_MODEL, demo_clip_files

    config, checkpoint = demo_clip_files(tmp_path)
    first = checkpoint.read_bytes()
    checkpoint.unlink()
    (tmp_path / "demo-clip" / f"{DEMO_MODEL}.pt.123.partial").write_bytes(b"cut short")
    assert demo_clip_files(tmp_path) == (config, checkpoint)
    assert checkpoint.read_bytes() == first  # same seed, same weights
    before = torch.random.get_rng_state()
    checkpoint.unlink()
    demo_clip_files(tmp_path)
    assert torch.equal(before, torch.random.get_rng_state()), "the caller's RNG was changed"


# --- Several scores in one pass -------------------------------------------------------------------


@pytest.fixture
def two_heads(tmp_path, tiny_weights):
    from safetensors.numpy import save_file

    from conftest import random_state_dict

    other = tmp_path / "other.safetensors"
    save_file(random_state_dict(seed=9), str(other))
    return tiny_weights["safetensors"], other


def test_extra_scores_are_columns_from_the_same_embedding(tmp_path, two_heads, rng):
    main_head, other = two_heads
    matrix = rng.standard_normal((80, 768)).astype(np.float32)
    matrix[3] = np.nan
    write_embeddings(tmp_path / "in" / "a.parquet", matrix)
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "in"), "-o", str(out), "--aesthetic-weights", str(main_head), "--threshold", "5.4",
                 "--extra-scores", f"other={other},again={main_head}", "--keep-rejected"]) == 0
    rows = pd.concat([pd.read_parquet(out / "kept"), pd.read_parquet(out / "rejected")]).sort_values("key")
    assert list(rows.columns[-3:]) == ["aesthetic_score", "other", "again"] and str(rows["other"].dtype) == "float32"
    unit = matrix[[int(k[1:]) for k in rows["key"]]]
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    np.testing.assert_allclose(rows["other"], unit_scores(load_predictor(str(other)), unit), atol=1e-5)
    np.testing.assert_array_equal(rows["again"], rows["aesthetic_score"])
    assert (pd.read_parquet(out / "kept")["aesthetic_score"] >= 5.4).all()  # filtering stays on aesthetic_score
    errors = pd.read_parquet(out / "errors")
    assert errors["key"].tolist() == ["k00003"] and "other" not in errors.columns
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["extra_scores"]) == {"other", "again"} and m["settings"]["extra_scores"] == {"other": str(other), "again": str(main_head)}


def test_extra_scores_from_a_config_mapping_and_in_the_notebook_api(tmp_path, two_heads, rng):
    import yaml

    import aesthetic_dask as ad

    main_head, other = two_heads
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((20, 768)).astype(np.float32))
    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump({"aesthetic_weights": str(main_head), "extra_scores": {"other": str(other)}}))
    cfg = ad.load_config(str(conf))
    assert cfg.extra_scores == {"other": str(other)}
    scored = ad.score_embeddings(ad.read_embeddings(str(tmp_path / "in")), cfg)
    assert list(scored.columns[-3:]) == ["aesthetic_score", "other", "error"]
    df = scored.compute(scheduler="sync")
    assert df["other"].notna().all() and not np.allclose(df["other"], df["aesthetic_score"])


@pytest.mark.parametrize("name, message", [("aesthetic_score", "is a column the job writes"), ("caption", "the input already has a column"),
                                           ("bad name", "letters, digits and _")])
def test_extra_score_names_never_collide(tmp_path, two_heads, rng, name, message):
    main_head, other = two_heads
    write_embeddings(tmp_path / "in" / "a.parquet", rng.standard_normal((5, 768)).astype(np.float32))
    proc = run_cli_process(["score", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--aesthetic-weights", str(main_head),
                            "--extra-scores", f"{name}={other}"])
    assert_one_clear_line(proc, 2, message)
