import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from aesthetic_dask.config import load_config
from aesthetic_dask.errors import WeightsError
from aesthetic_dask.models import checkpoint, fetch, registry

DEFAULT_HEAD = load_config().aesthetic_weights  # conf/default.yaml: the one default


def test_registry_pins_the_default_sources():
    entry = registry.REGISTRY[DEFAULT_HEAD]
    hub = {s.repo_id: s for s in entry.sources if isinstance(s, registry.HubFile)}
    ttj = hub["ttj/sac-logos-ava1-l14-linearMSE"]
    assert ttj.filename == "model.safetensors" and ttj.revision.startswith("1e77fa0") and len(ttj.revision) == 40
    cam = hub["camenduru/improved-aesthetic-predictor"]
    assert cam.filename == "sac+logos+ava1-l14-linearMSE.pth"
    assert cam.sha256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    assert entry.spec.dims == (768, 1024, 128, 64, 16, 1) and entry.spec.activation is None


def test_local_files_load_the_same_from_pth_and_safetensors(tiny_weights, tmp_path):
    a = state_of(fetch.resolve_weights(str(tiny_weights["pth"]), tmp_path), tmp_path)
    b = state_of(fetch.resolve_weights(str(tiny_weights["safetensors"]), tmp_path), tmp_path)
    for k, v in tiny_weights["state"].items():
        np.testing.assert_array_equal(a[k], v)
        np.testing.assert_array_equal(b[k], v)


def test_pth_is_converted_once_and_the_copy_is_used_after(tiny_weights, tmp_path, monkeypatch):
    resolved = fetch.resolve_weights(str(tiny_weights["pth"]), tmp_path)
    state_of(resolved, tmp_path)
    converted = tmp_path / "converted" / f"{resolved.sha256}.safetensors"
    assert converted.is_file()
    monkeypatch.setattr(checkpoint, "_load_pth", lambda p: pytest.fail("torch.load called despite the converted copy"))
    state = state_of(resolved, tmp_path)
    np.testing.assert_array_equal(state["layers.0.weight"], tiny_weights["state"]["layers.0.weight"])


def test_real_weights_match_their_published_sha256(real_weights, tmp_path):
    resolved = fetch.resolve_weights(str(real_weights), tmp_path)
    assert resolved.sha256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    state = state_of(resolved, None)
    assert state["layers.0.weight"].shape == (1024, 768)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_in_a_pth_never_runs(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": _Exploit()}, evil, pickle_protocol=2)
    with pytest.raises(WeightsError, match="cannot load as a PyTorch state dict"):
        state_of(fetch.resolve_weights(str(evil), tmp_path), None)
    assert not marker.exists()


def test_wrong_keys_and_shapes_are_named(tmp_path, tiny_weights):
    from safetensors.numpy import save_file

    state = dict(tiny_weights["state"])
    state["layers.2.weight"] = np.zeros((64, 1024), np.float32)
    del state["layers.7.bias"]
    state["head.weight"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(WeightsError) as err:
        state_of(fetch.resolve_weights(str(bad), tmp_path), None)
    msg = str(err.value)
    assert "missing keys layers.7.bias" in msg and "unexpected keys head.weight" in msg
    assert "layers.2.weight has shape (64, 1024), expected (128, 1024)" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_files_fail_clearly(tmp_path, content):
    for suffix in (".pth", ".safetensors"):
        f = tmp_path / f"broken{suffix}"
        f.write_bytes(content)
        with pytest.raises(WeightsError, match=str(f)):
            state_of(fetch.resolve_weights(str(f), tmp_path), None)


def test_unknown_name_and_wrong_suffix(tmp_path):
    with pytest.raises(WeightsError, match="no such file, and not a registered name"):
        fetch.resolve_weights("no-such-weights", tmp_path)
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(WeightsError, match="expected a .pth or .safetensors"):
        fetch.resolve_weights(str(f), tmp_path)


@pytest.fixture
def fake_hub(monkeypatch, tiny_weights):
    """hf_hub_download replaced by a local 'hub' serving files the test controls."""
    import huggingface_hub

    files: dict[tuple[str, str], Path] = {}
    calls = []

    def fake_download(repo_id, filename, revision=None, local_dir=None, **kw):
        calls.append((repo_id, filename, revision))
        if (repo_id, filename) not in files:
            raise FileNotFoundError(f"{repo_id}/{filename} not on the hub")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[(repo_id, filename)], target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("aesthetic_dask.network.reachable", lambda url: True)  # the fake hub is "online"
    return files, calls


def test_download_uses_the_pinned_revision_and_reuses_the_cache(fake_hub, tiny_weights, tmp_path):
    files, calls = fake_hub
    files[("ttj/sac-logos-ava1-l14-linearMSE", "model.safetensors")] = tiny_weights["safetensors"]
    first = fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert calls == [("ttj/sac-logos-ava1-l14-linearMSE", "model.safetensors", "1e77fa05081323d99725fc40a9bf9f88180490e7")]
    assert first.path == tmp_path / "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors"
    assert first.source.startswith("hf://ttj/sac-logos-ava1-l14-linearMSE@1e77fa0")
    second = fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert len(calls) == 1 and second.path == first.path


def test_download_falls_back_and_verifies_sha256(fake_hub, tiny_weights, tmp_path, monkeypatch):
    files, calls = fake_hub
    # The second source serves a file whose sha256 is not the pinned one: refused.
    files[("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")] = tiny_weights["pth"]
    with pytest.raises(WeightsError) as err:
        fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert "not on the hub" in str(err.value) and "does not match the pinned" in str(err.value)
    # With the pinned digest equal to the served file, the fallback is accepted.
    digest = hashlib.sha256(tiny_weights["pth"].read_bytes()).hexdigest()
    entry = registry.REGISTRY[DEFAULT_HEAD]
    pinned = dataclasses.replace(entry.sources[1], sha256=digest)
    patched = dataclasses.replace(entry, sources=(entry.sources[0], pinned))
    monkeypatch.setitem(registry.REGISTRY, DEFAULT_HEAD, patched)
    got = fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert got.sha256 == digest and got.path.name == "sac+logos+ava1-l14-linearMSE.pth"


def test_offline_mode_uses_the_cache_or_says_what_to_do(fake_hub, tiny_weights, tmp_path, monkeypatch):
    files, calls = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="aesthetic-dask download.*HF_HUB_OFFLINE is set"):
        fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert calls == []
    cached = tmp_path / "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(tiny_weights["safetensors"], cached)
    assert fetch.resolve_weights(DEFAULT_HEAD, tmp_path).path == cached
    assert calls == []


def test_download_command_prefetches_every_default_weight(fake_hub, tiny_weights, tmp_path, capsys):
    from aesthetic_dask.cli import main

    files, _ = fake_hub
    files[("ttj/sac-logos-ava1-l14-linearMSE", "model.safetensors")] = tiny_weights["safetensors"]
    assert main(["download", "--model-dir", str(tmp_path), "--skip-clip"]) == 0
    assert (tmp_path / "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors").is_file()
    assert "model.safetensors" in capsys.readouterr().out


def state_of(resolved, model_dir):
    """The checked state dict of a resolved head (models.checkpoint.load_state_dict)."""
    return checkpoint.load_state_dict(resolved.path, resolved.sha256, resolved.spec, model_dir)


def test_a_head_served_from_its_converted_copy_names_that_file(fake_hub, tiny_weights, tmp_path, monkeypatch, capsys):
    """The .pth is converted, then removed: the manifest and `download --list` name the
    .safetensors that is read, never a path that is not there."""
    from aesthetic_dask.cli import main
    from aesthetic_dask.models.load import load_head

    files, calls = fake_hub
    digest = hashlib.sha256(tiny_weights["pth"].read_bytes()).hexdigest()
    entry = registry.REGISTRY[DEFAULT_HEAD]
    only_pth = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[1], sha256=digest),))
    monkeypatch.setitem(registry.REGISTRY, DEFAULT_HEAD, only_pth)
    files[(only_pth.sources[0].repo_id, only_pth.sources[0].filename)] = tiny_weights["pth"]
    pth = fetch.resolve_weights(DEFAULT_HEAD, tmp_path).path
    load_head(DEFAULT_HEAD, tmp_path)  # converts it
    converted = checkpoint.converted_path(tmp_path, digest)
    assert converted.is_file()
    _, info = load_head(DEFAULT_HEAD, tmp_path)
    assert info["path"] == str(converted)  # what was read, even while the .pth is there
    pth.unlink()
    n = len(calls)
    got = fetch.resolve_weights(DEFAULT_HEAD, tmp_path)
    assert got.path == converted and len(calls) == n  # no download: the copy is the head
    assert load_head(DEFAULT_HEAD, tmp_path)[1]["path"] == str(converted)
    assert main(["download", "--list", "--model-dir", str(tmp_path)]) == 0
    assert f"{DEFAULT_HEAD}  [cached: {converted}]" in capsys.readouterr().out


def test_a_local_file_with_a_registered_digest_is_that_head(tiny_weights, tmp_path, monkeypatch):
    """The default head downloaded by hand is the default head: checked against its CLIP, not
    "vouched" for."""
    from aesthetic_dask.models.load import load_head

    digest = hashlib.sha256(tiny_weights["safetensors"].read_bytes()).hexdigest()
    entry = registry.REGISTRY[DEFAULT_HEAD]
    monkeypatch.setitem(registry.REGISTRY, DEFAULT_HEAD, dataclasses.replace(
        entry, sources=(dataclasses.replace(entry.sources[0], sha256=digest),)))
    by_hand = tmp_path / "downloaded-by-hand.safetensors"
    shutil.copyfile(tiny_weights["safetensors"], by_hand)
    got = fetch.resolve_weights(str(by_hand), tmp_path / "models")
    assert got.entry is registry.REGISTRY[DEFAULT_HEAD] and got.path == by_hand and got.name == DEFAULT_HEAD
    _, info = load_head(str(by_hand), tmp_path / "models")
    assert info["expected_clip"] == {"model": entry.clip.model, "pretrained": entry.clip.pretrained}
    other = tmp_path / "other.safetensors"  # an unknown file stays the user's to vouch for
    from safetensors.numpy import save_file

    save_file({k: v + 1 for k, v in tiny_weights["state"].items()}, str(other))
    assert fetch.resolve_weights(str(other), tmp_path / "models").entry is None
