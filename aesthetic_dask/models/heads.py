"""The aesthetic heads' architectures and their math: score = MLP(e / ||e||_2).

The published layouts are data (:data:`LAYOUTS`), told apart by their state-dict keys. Heads
without activations (linearMSE, LAION-Aesthetics V1) are one affine map, folded exactly (in
float64) to a vector and a bias, so scoring is one matrix-vector product; heads with activations
keep the layered path. All math takes an array module ``xp`` (numpy or cupy), so the CPU and GPU
paths share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

# Rows per matmul on the layered path: bounds the (rows x 1024) hidden activations.
_LAYER_CHUNK = 65536


@dataclass(frozen=True)
class PredictorSpec:
    """Architecture of an aesthetic head: linear layers stored under ``layer_keys``.

    ``activation`` is applied between linear layers; ``None`` (the linearMSE and LAION V1 heads)
    makes the whole head one affine map, which :class:`AestheticPredictor` folds. A layer key
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


def fold_affine(layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """Compose linear layers ``h = W h + b`` into one ``(w, b)`` in float64."""
    first_w, first_b = layers[0]
    a = first_w.astype(np.float64)
    c = first_b.astype(np.float64)
    for w, b in layers[1:]:
        a = w.astype(np.float64) @ a
        c = w.astype(np.float64) @ c + b.astype(np.float64)
    if a.shape[0] != 1:
        raise ValueError(f"folded map has {a.shape[0]} outputs, expected 1")
    return a[0], float(c[0])


class AestheticPredictor:
    """Aesthetic scores for batches of CLIP embeddings (numpy or cupy arrays).

    Pickles small: a folded predictor carries one vector and a bias.
    """

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]],
        activation: str | None = None,
        source: str = "",
        sha256: str = "",
    ) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.embed_dim = int(layers[0][0].shape[1])
        self.activation = activation
        self.source = source
        self.sha256 = sha256
        self.layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.weight: np.ndarray | None = None
        self.bias = 0.0
        if activation is None:
            w, b = fold_affine(layers)
            self.weight = w.astype(np.float32)
            self.bias = b
        else:
            self.layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]
        self._device_cache: dict[str, Any] = {}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, np.ndarray], spec: PredictorSpec, source: str = "", sha256: str = ""
    ) -> AestheticPredictor:
        layers = [(state[param_key(k, "weight")], state[param_key(k, "bias")]) for k in spec.layer_keys]
        return cls(layers, spec.activation, source=source, sha256=sha256)

    @property
    def folded(self) -> bool:
        return self.weight is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device_cache"] = {}  # device arrays never travel
        return state

    def _on(self, xp: Any) -> Any:
        """Parameters as arrays of module ``xp``, converted once per process."""
        key = xp.__name__
        if key not in self._device_cache:
            if self.folded:
                self._device_cache[key] = xp.asarray(self.weight)
            else:
                self._device_cache[key] = [(xp.asarray(w.T), xp.asarray(b)) for w, b in self.layers]
        return self._device_cache[key]

    def score_bounds(self) -> tuple[float, float]:
        """Scores no unit-norm embedding can go below or above: exact for a folded head
        (b -/+ ||w||), a Lipschitz bound for a layered one (f(0) -/+ the product of the layers'
        spectral norms; ReLU is 1-Lipschitz)."""
        if self.folded:
            reach = float(np.linalg.norm(self.weight.astype(np.float64)))
            return self.bias - reach, self.bias + reach
        h, lipschitz = np.zeros(self.embed_dim), 1.0
        for i, (w, b) in enumerate(self.layers):
            h = w.astype(np.float64) @ h + b
            if self.activation == "relu" and i < len(self.layers) - 1:
                h = np.maximum(h, 0)
            lipschitz *= float(np.linalg.norm(w.astype(np.float64), 2))
        return float(h[0]) - lipschitz, float(h[0]) + lipschitz

    def score_raw(self, emb: Any, sq_norm: Any, xp: Any = np) -> Any:
        """Scores of raw embeddings given their squared norms (all rows finite, non-zero).

        Folded path: ``w.e / ||e|| + b``, so the normalised copy of the matrix is never made.
        """
        norm = xp.sqrt(sq_norm.astype(xp.float32))
        if self.folded:
            return ((emb @ self._on(xp)) / norm + np.float32(self.bias)).astype(xp.float32)
        return self._layered(emb / norm[:, None], xp)

    def _layered(self, unit: Any, xp: Any) -> Any:
        params = self._on(xp)
        out = xp.empty(unit.shape[0], dtype=xp.float32)
        for start in range(0, unit.shape[0], _LAYER_CHUNK):
            h = unit[start : start + _LAYER_CHUNK].astype(xp.float32)
            for i, (wt, b) in enumerate(params):
                h = h @ wt + b
                if self.activation == "relu" and i < len(params) - 1:
                    h = xp.maximum(h, 0)
            out[start : start + h.shape[0]] = h[:, 0]
        return out
