"""Reading a head's checkpoint file: safetensors, or torch's zip ``.pth`` without torch and
without running pickled code (a restricted unpickler), checked against its layout; a ``.pth`` is
converted once to a ``.safetensors`` copy named by its sha256."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from .heads import PredictorSpec, infer_spec
from ..storage import split, write_bytes


def converted_path(model_dir: Path, sha256: str) -> Path:
    """Where the ``.safetensors`` conversion of the file with ``sha256`` lives in ``model_dir``."""
    return model_dir / "converted" / f"{sha256}.safetensors"


def served_path(path: Path, sha256: str, model_dir: Path | None = None) -> Path:
    """The file :func:`load_state_dict` reads for ``path``: a ``.safetensors`` itself; a ``.pth``'s
    converted copy in ``model_dir`` once there is one, else the ``.pth``."""
    if path.suffix == ".safetensors" or model_dir is None:
        return path
    cached = converted_path(model_dir, sha256)
    return cached if cached.exists() else path


def load_state_dict(path: Path, sha256: str, spec: PredictorSpec | None,
                    model_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The head's state dict as float32 numpy arrays, checked against ``spec`` (or the layout its
    keys give). A ``.pth`` is read by :func:`_load_pth` (no pickled code runs) and, when
    ``model_dir`` is given, kept as a ``.safetensors`` copy named by ``sha256``, which later loads
    find first."""
    served = served_path(path, sha256, model_dir)
    from_pth = served.suffix != ".safetensors"
    state = _load_pth(served) if from_pth else _load_safetensors(served)
    _check_state(state, spec or infer_spec(state), path)
    if from_pth and model_dir is not None:
        _write_converted(state, converted_path(model_dir, sha256))
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


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's ``data.pkl`` allowing only what a state dict needs."""

    def __init__(self, file: object, archive: object, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    @classmethod
    def load_from(cls, archive: object) -> object:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl[: -len("data.pkl")]
        return cls(io.BytesIO(archive.read(pkl)), archive, prefix).load()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are allowed")

    def persistent_load(self, pid: tuple) -> np.ndarray:
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage" or dtype not in _STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f"unsupported storage {pid[:2]!r}")
        return np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype=dtype)


def _write_converted(state: dict[str, np.ndarray], target: Path) -> None:
    from safetensors.numpy import save

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
