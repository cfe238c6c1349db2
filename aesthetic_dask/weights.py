"""Registry of aesthetic-predictor weights with pinned sources, their download and loading.

Like open_clip's ``pretrained.py``: one table of named weights, each with sources pinned to a
revision (and a sha256 where one is published); files are fetched with huggingface_hub into
``model_dir`` on first use and reused after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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

    def local_copy(self, model_dir: Path) -> Path:
        return model_dir / self.repo_id / self.filename


@dataclass(frozen=True)
class UrlFile:
    """One file at a pinned URL (e.g. a GitHub raw URL at a commit), verified by its sha256."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def local_copy(self, model_dir: Path) -> Path:
        parsed = urlparse(self.url)
        return model_dir / "url" / (parsed.netloc or "local") / parsed.path.lstrip("/")


@dataclass(frozen=True)
class PredictorSpec:
    """Architecture of an aesthetic head: linear layers stored under ``layer_keys``.

    ``activation`` is applied between linear layers; ``None`` (the linearMSE and LAION V1 heads)
    makes the whole head one affine map, which :mod:`aesthetic_dask.predictor` folds. A layer key
    ``""`` means the bare ``weight``/``bias`` of a single ``nn.Linear``.
    """

    dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)
    layer_keys: tuple[str, ...] = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
    activation: str | None = None
    layout: str = "improved-linear"

    @property
    def embed_dim(self) -> int:
        return self.dims[0]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for key, n_in, n_out in zip(self.layer_keys, self.dims[:-1], self.dims[1:]):
            shapes[param_key(key, "weight")] = (n_out, n_in)
            shapes[param_key(key, "bias")] = (n_out,)
        return shapes


def param_key(layer: str, kind: str) -> str:
    """State-dict key of a layer's ``weight`` or ``bias``."""
    return f"{layer}.{kind}" if layer else kind


# The published head architectures, told apart by their state-dict keys (config as data).
# improved-aesthetic-predictor's linear MLP is nn.Sequential(Linear, Dropout, Linear, Dropout,
# Linear, Dropout, Linear, Linear); its ReLU MLP puts a ReLU after every hidden Linear, which moves
# the layer indices; LAION-Aesthetics V1 is one nn.Linear(dim, 1).
LAYOUTS: dict[str, PredictorSpec] = {
    "improved-linear": PredictorSpec(),
    "improved-relu": PredictorSpec(
        layer_keys=("layers.0", "layers.3", "layers.6", "layers.9", "layers.11"), activation="relu", layout="improved-relu"
    ),
    "linear": PredictorSpec(dims=(768, 1), layer_keys=("",), layout="linear"),
}


def infer_spec(state: dict[str, np.ndarray]) -> PredictorSpec:
    """The layout whose keys ``state`` has, with the dims its shapes give; if none matches
    exactly, the closest layout (whose check then names the offending keys)."""
    keys = set(state)
    best = max(LAYOUTS.values(), key=lambda spec: len(keys & set(spec.expected_shapes())))
    for spec in LAYOUTS.values():
        if keys == set(spec.expected_shapes()):
            first = np.shape(state[param_key(spec.layer_keys[0], "weight")])
            outs = [np.shape(state[param_key(k, "weight")])[0] for k in spec.layer_keys]
            if len(first) == 2:
                return dataclasses.replace(spec, dims=(int(first[1]), *map(int, outs)))
            return spec
    return best


@dataclass(frozen=True)
class ClipRef:
    """The CLIP embedding space a head was trained on: an open_clip model name and pretrained tag."""

    model: str
    pretrained: str

    def __str__(self) -> str:
        return f"--clip-model {self.model} --clip-pretrained {self.pretrained}"


@dataclass(frozen=True)
class RegisteredWeights:
    name: str
    sources: tuple[HubFile | UrlFile, ...]
    spec: PredictorSpec
    clip: ClipRef
    license: str
    description: str = ""

    @property
    def clip_model(self) -> str:
        return self.clip.model


_SAC_LOGOS_AVA1_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
_IMPROVED = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/6934dd81792f086e613a121dbce43082cb8be85e"
_LAION_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/6d122adad522ab246644d9dc1c6d7a3810ee255f"
_OPENAI_L14 = ClipRef("ViT-L-14-quickgelu", "openai")


def _v1(dim: int) -> PredictorSpec:
    return dataclasses.replace(LAYOUTS["linear"], dims=(dim, 1))


def _github_head(repo_at_commit: str, name: str, sha256: str, spec: PredictorSpec, clip: ClipRef, license: str,
                 description: str) -> RegisteredWeights:
    """A head published as ``NAME.pth`` in a GitHub repository, pinned to a commit and its sha256."""
    return RegisteredWeights(name=name, sources=(UrlFile(f"{repo_at_commit}/{name}.pth", sha256),), spec=spec, clip=clip,
                             license=license, description=description)


REGISTRY: dict[str, RegisteredWeights] = {
    entry.name: entry
    for entry in (
        RegisteredWeights(
            name="sac+logos+ava1-l14-linearMSE",
            sources=(
                # The revision NeMo Curator pins (short form 1e77fa0).
                HubFile("ttj/sac-logos-ava1-l14-linearMSE", "model.safetensors", "1e77fa05081323d99725fc40a9bf9f88180490e7"),
                HubFile("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth", "main",
                        sha256=_SAC_LOGOS_AVA1_SHA256),
                UrlFile(f"{_IMPROVED}/sac+logos+ava1-l14-linearMSE.pth", _SAC_LOGOS_AVA1_SHA256),
            ),
            spec=LAYOUTS["improved-linear"], clip=_OPENAI_L14, license="Apache-2.0",
            description="improved aesthetic predictor, SAC + LOGOS + AVA1, linear MLP (the default; NeMo Curator's)",
        ),
        _github_head(_IMPROVED, "ava+logos-l14-linearMSE", "390a3aafaf3b37d57148f9b22f30556de38343064b7d915acfa80d3812b4c9ff",
                     LAYOUTS["improved-linear"], _OPENAI_L14, "Apache-2.0", "improved aesthetic predictor, AVA + LOGOS, linear MLP"),
        _github_head(_IMPROVED, "ava+logos-l14-reluMSE", "0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4",
                     LAYOUTS["improved-relu"], _OPENAI_L14, "Apache-2.0", "improved aesthetic predictor, AVA + LOGOS, ReLU MLP"),
        _github_head(_LAION_V1, "sa_0_4_vit_l_14_linear", "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
                     _v1(768), _OPENAI_L14, "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-L/14"),
        _github_head(_LAION_V1, "sa_0_4_vit_b_16_linear", "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0",
                     _v1(512), ClipRef("ViT-B-16", "openai"), "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-B/16"),
        _github_head(_LAION_V1, "sa_0_4_vit_b_32_linear", "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
                     _v1(512), ClipRef("ViT-B-32-quickgelu", "openai"), "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-B/32"),
    )
}
DEFAULT_WEIGHTS = "sac+logos+ava1-l14-linearMSE"


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on local disk, with where it came from.

    ``entry`` is the registry entry (None for a local file the user vouches for); ``spec`` is
    None until the file is read, for local files whose layout is inferred from their keys.
    """

    path: Path
    sha256: str
    source: str
    spec: PredictorSpec | None
    entry: RegisteredWeights | None = None

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else str(self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    from .network import offline

    return offline()


def _verified(path: Path, src: HubFile | UrlFile) -> Path:
    if src.sha256 is not None:
        digest = sha256_file(path)
        if digest != src.sha256:
            raise WeightsError(f"{path}: sha256 {digest} does not match the pinned {src.sha256} of {src.url}")
    return path


def _download(src: HubFile | UrlFile, target: Path) -> None:
    """Fetch ``src`` to ``target``: huggingface_hub for hub files, a streamed HTTP GET for URLs."""
    if isinstance(src, HubFile):
        from huggingface_hub import hf_hub_download

        got = Path(hf_hub_download(repo_id=src.repo_id, filename=src.filename, revision=src.revision,
                                   local_dir=target.parent))
        if got.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, target)
        return
    from urllib.request import urlopen

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with urlopen(src.url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(src: HubFile | UrlFile, model_dir: Path) -> Path:
    """Return a verified local copy of ``src`` under ``model_dir``, downloading it if needed."""
    target = src.local_copy(model_dir)
    if not target.exists():
        if _offline():
            raise WeightsError(f"{src.url} is not in {model_dir} and HF_HUB_OFFLINE is set")
        from .network import hub_endpoint, reachable

        if not reachable(hub_endpoint() if isinstance(src, HubFile) else src.url):
            raise WeightsError(f"{src.url}: not in {model_dir}, and its host is unreachable (no network?)")
        try:
            _download(src, target)
        except Exception as exc:  # network, auth, missing file: try the next source
            raise WeightsError(f"{src.url}: download failed: {type(exc).__name__}: {exc}") from None
    return _verified(target, src)


def _cached(entry: RegisteredWeights, model_dir: Path) -> ResolvedWeights | None:
    """A verified copy of ``entry`` already in ``model_dir``: any source's download, or the
    safetensors conversion of a pinned digest. Checked before any network access."""
    for src in entry.sources:
        target = src.local_copy(model_dir)
        if target.is_file():
            try:
                _verified(target, src)
            except WeightsError:
                continue
            return ResolvedWeights(target, src.sha256 or sha256_file(target), src.url, entry.spec, entry)
    for src in entry.sources:
        if src.sha256 and _converted_path(model_dir, src.sha256).is_file():
            return ResolvedWeights(src.local_copy(model_dir), src.sha256, src.url, entry.spec, entry)
    return None


def cached_weights(name: str, model_dir: Path) -> ResolvedWeights | None:
    """The verified copy of registered head ``name`` in ``model_dir``, if there is one (no network)."""
    return _cached(REGISTRY[name], model_dir)


def resolve_weights(name_or_path: str, model_dir: Path) -> ResolvedWeights:
    """A registry name (looked up in ``model_dir`` first, downloaded once) or a local
    .pth/.safetensors path (its layout is inferred from its keys when it is read)."""
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
        return ResolvedWeights(path, sha256_file(path), str(path.resolve()), None)
    cached = _cached(entry, model_dir)
    if cached is not None:
        return cached
    failures = []
    for src in entry.sources:
        try:
            path = _fetch(src, model_dir)
        except WeightsError as exc:
            failures.append(str(exc))
            continue
        return ResolvedWeights(path, src.sha256 or sha256_file(path), src.url, entry.spec, entry)
    raise WeightsError(
        f"cannot get weights {entry.name!r} (run `aesthetic-dask download --model-dir DIR` where "
        f"the hub is reachable, or pass --aesthetic-weights FILE): " + "; ".join(failures)
    )


def download_all(model_dir: Path, names: list[str] | None = None) -> list[ResolvedWeights]:
    """Prefetch registered weights (``names``, default every one) into ``model_dir``."""
    return [resolve_weights(name, model_dir) for name in (names or list(REGISTRY))]


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
    _check_state(state, weights.spec or infer_spec(state), path)
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
    """A PyTorch state dict as numpy arrays, without torch and without running pickled code.

    torch's zip checkpoints are read by :class:`_StateDictUnpickler`, which rebuilds tensors from
    their storages and refuses every other global (so a pickle carrying code fails to load). The
    legacy pre-1.6 format falls back to ``torch.load(weights_only=True)`` where torch is installed.
    """
    import pickle
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                obj = _StateDictUnpickler.load_from(archive)
        else:
            obj = _load_legacy_pth(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: cannot load as a PyTorch state dict: {first}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k: v.astype(np.float32) for k, v in obj.items()}


def _load_legacy_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError("a legacy (pre-zip) PyTorch file needs torch to read; install aesthetic-dask[clip] "
                         "or convert it to .safetensors") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = {k: (v.detach().to(torch.float32).numpy() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}
    return obj


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: object) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2, in numpy."""
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16}


class _StateDictUnpickler(__import__("pickle").Unpickler):
    """Unpickles a torch zip checkpoint's ``data.pkl`` allowing only what a state dict needs."""

    def __init__(self, file: object, archive: object, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    @classmethod
    def load_from(cls, archive: object) -> object:
        import io

        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl[: -len("data.pkl")]
        return cls(io.BytesIO(archive.read(pkl)), archive, prefix).load()

    def find_class(self, module: str, name: str) -> object:
        import collections
        import pickle

        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are allowed")

    def persistent_load(self, pid: tuple) -> np.ndarray:
        import pickle

        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage" or dtype not in _STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f"unsupported storage {pid[:2]!r}")
        return np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype=dtype)


def _write_converted(state: dict[str, np.ndarray], target: Path) -> None:
    from safetensors.numpy import save

    from .storage import split, write_bytes

    try:
        fs, path = split(str(target))
        write_bytes(fs, path, save({k: np.ascontiguousarray(v) for k, v in state.items()}))
    except OSError:
        pass  # a read-only model_dir only costs reading the .pth again next time


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
