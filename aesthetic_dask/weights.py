"""Registry of aesthetic-predictor weights with pinned sources, their download and loading.

Like open_clip's ``pretrained.py``: one table of named weights, each with sources pinned to a
revision (and a sha256 where one is published); files are fetched with huggingface_hub into
``model_dir`` on first use and reused after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightsError

__all__ = ["REGISTRY", "WeightsError", "resolve_weights", "load_state_dict", "download_all"]


@dataclass(frozen=True)
class HubFile:
    """One file on the Hugging Face hub at a pinned revision."""

    repo_id: str
    filename: str
    revision: str
    sha256: str | None = None

    @property
    def url(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"


@dataclass(frozen=True)
class PredictorSpec:
    """Architecture of an aesthetic MLP: linear layers stored under ``layer_keys``.

    ``activation`` is applied between linear layers; ``None`` (the linearMSE weights) makes the
    whole MLP one affine map, which :mod:`aesthetic_dask.predictor` folds.
    """

    dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)
    layer_keys: tuple[str, ...] = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
    activation: str | None = None

    @property
    def embed_dim(self) -> int:
        return self.dims[0]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for key, n_in, n_out in zip(self.layer_keys, self.dims[:-1], self.dims[1:]):
            shapes[f"{key}.weight"] = (n_out, n_in)
            shapes[f"{key}.bias"] = (n_out,)
        return shapes


@dataclass(frozen=True)
class RegisteredWeights:
    name: str
    sources: tuple[HubFile, ...]
    spec: PredictorSpec
    clip_model: str
    license: str


_SAC_LOGOS_AVA1_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"

REGISTRY: dict[str, RegisteredWeights] = {
    "sac+logos+ava1-l14-linearMSE": RegisteredWeights(
        name="sac+logos+ava1-l14-linearMSE",
        sources=(
            # The revision NeMo Curator pins (short form 1e77fa0).
            HubFile(
                "ttj/sac-logos-ava1-l14-linearMSE",
                "model.safetensors",
                "1e77fa05081323d99725fc40a9bf9f88180490e7",
            ),
            HubFile(
                "camenduru/improved-aesthetic-predictor",
                "sac+logos+ava1-l14-linearMSE.pth",
                "main",
                sha256=_SAC_LOGOS_AVA1_SHA256,
            ),
        ),
        spec=PredictorSpec(),
        clip_model="ViT-L-14",
        license="Apache-2.0",
    ),
}
DEFAULT_WEIGHTS = "sac+logos+ava1-l14-linearMSE"


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on local disk, with where it came from."""

    path: Path
    sha256: str
    source: str
    spec: PredictorSpec


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _local_copy(model_dir: Path, src: HubFile) -> Path:
    return model_dir / src.repo_id / src.filename


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _fetch(src: HubFile, model_dir: Path) -> Path:
    """Return a verified local copy of ``src`` under ``model_dir``, downloading it if needed."""
    target = _local_copy(model_dir, src)
    if not target.exists():
        if _offline():
            raise WeightsError(f"{src.url} is not in {model_dir} and HF_HUB_OFFLINE is set")
        from huggingface_hub import hf_hub_download

        try:
            got = Path(
                hf_hub_download(
                    repo_id=src.repo_id,
                    filename=src.filename,
                    revision=src.revision,
                    local_dir=target.parent,
                )
            )
        except Exception as exc:  # network, auth, missing file: try the next source
            raise WeightsError(f"{src.url}: download failed: {type(exc).__name__}: {exc}") from None
        if got.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, target)
    if src.sha256 is not None:
        digest = sha256_file(target)
        if digest != src.sha256:
            raise WeightsError(
                f"{target}: sha256 {digest} does not match the pinned {src.sha256} of {src.url}"
            )
    return target


def resolve_weights(name_or_path: str, model_dir: Path) -> ResolvedWeights:
    """A registry name (downloaded into ``model_dir`` once) or a local .pth/.safetensors path."""
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(REGISTRY))
            raise WeightsError(
                f"aesthetic weights {name_or_path!r}: no such file, and not a registered name ({known})"
            )
        if path.suffix not in {".pth", ".pt", ".safetensors"}:
            raise WeightsError(f"{path}: expected a .pth or .safetensors file")
        return ResolvedWeights(path, sha256_file(path), str(path.resolve()), PredictorSpec())
    failures = []
    for src in entry.sources:
        try:
            path = _fetch(src, model_dir)
        except WeightsError as exc:
            failures.append(str(exc))
            continue
        return ResolvedWeights(path, src.sha256 or sha256_file(path), src.url, entry.spec)
    raise WeightsError(
        f"cannot get weights {entry.name!r} (run `aesthetic-dask download --model-dir DIR` where "
        f"the hub is reachable, or pass --aesthetic-weights FILE): " + "; ".join(failures)
    )


def download_all(model_dir: Path) -> list[ResolvedWeights]:
    """Prefetch every registered weight into ``model_dir`` (for clusters without internet)."""
    return [resolve_weights(name, model_dir) for name in REGISTRY]


def _converted_path(model_dir: Path, sha256: str) -> Path:
    return model_dir / "converted" / f"{sha256}.safetensors"


def load_state_dict(
    weights: ResolvedWeights, model_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Load and check the weights as float32 numpy arrays.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (no pickled code runs) and, when
    ``model_dir`` is given, kept as a ``.safetensors`` copy named by the source's sha256 so later
    runs skip importing torch (~1.5 s).
    """
    path = weights.path
    cached = _converted_path(model_dir, weights.sha256) if model_dir is not None else None
    from_pth = path.suffix != ".safetensors" and not (cached is not None and cached.exists())
    if from_pth:
        state = _load_pth(path)
    else:
        state = _load_safetensors(path if path.suffix == ".safetensors" else cached)
    _check_state(state, weights.spec, path)
    if from_pth and cached is not None:
        _write_converted(state, cached)
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file: {exc}") from None


def _load_pth(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: cannot load as a PyTorch state dict: {first}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def _write_converted(state: dict[str, np.ndarray], target: Path) -> None:
    from safetensors.numpy import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only model_dir only costs the torch import next time


def _check_state(state: dict[str, np.ndarray], spec: PredictorSpec, path: Path) -> None:
    expected = spec.expected_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append("missing keys " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys " + ", ".join(unexpected))
    problems.extend(wrong)
    if problems:
        raise WeightsError(
            f"{path}: not an aesthetic predictor with layers {spec.dims}: " + "; ".join(problems)
        )
