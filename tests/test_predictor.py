import numpy as np
import torch

from aesthetic_dask.models.heads import AestheticPredictor, fold_affine
from aesthetic_dask.models.load import load_predictor
from aesthetic_dask.models.heads import PredictorSpec

from conftest import random_state_dict, unit_scores


def torch_reference(state, activation=None) -> torch.nn.Module:
    """The layered improved-aesthetic-predictor MLP in float64, as the upstream repository builds it."""
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    model.activation = activation
    return model.double().eval()


def reference_scores(model, emb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(emb.astype(np.float64))
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    with torch.no_grad():
        if model.activation is None:
            return model.layers(x)[:, 0].numpy()
        linears = [m for m in model.layers if isinstance(m, torch.nn.Linear)]
        for i, layer in enumerate(linears):
            x = layer(x)
            x = torch.relu(x) if i < len(linears) - 1 else x
        return x[:, 0].numpy()


def test_fold_equals_the_layered_model(rng):
    state = random_state_dict(seed=3)
    layered = AestheticPredictor.from_state_dict(state, PredictorSpec(activation="relu"))
    linear_layers = [(state[f"{k}.weight"], state[f"{k}.bias"]) for k in PredictorSpec().layer_keys]
    w, b = fold_affine(linear_layers)
    x = rng.standard_normal((50, 768))
    h = x
    for wt, bias in linear_layers:
        h = h @ wt.astype(np.float64).T + bias
    np.testing.assert_allclose(x @ w + b, h[:, 0], rtol=0, atol=1e-9)
    assert not layered.folded


def test_folded_predictor_matches_a_float64_reference(rng):
    state = random_state_dict(seed=5)
    pred = AestheticPredictor.from_state_dict(state, PredictorSpec())
    assert pred.folded and pred.layers is None
    emb = rng.standard_normal((2000, 768)).astype(np.float32) * 3
    expected = reference_scores(torch_reference(state), emb)
    got = pred.score_raw(emb, np.einsum("ij,ij->i", emb, emb))
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4


def test_layered_path_with_activations_matches_torch(rng):
    state = random_state_dict(seed=7)
    pred = AestheticPredictor.from_state_dict(state, PredictorSpec(activation="relu"))
    emb = rng.standard_normal((300, 768)).astype(np.float32)
    expected = reference_scores(torch_reference(state, "relu"), emb)
    got = pred.score_raw(emb, np.einsum("ij,ij->i", emb, emb))
    assert np.abs(got - expected).max() <= 1e-4


def test_real_weights_parity_with_the_layered_float64_reference(real_weights, rng, tmp_path):
    pred = load_predictor(str(real_weights), tmp_path)
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    model = torch_reference({k: v.numpy() for k, v in state.items()})
    # Real CLIP embeddings are dense unit-ish vectors; mix scales and a float16 round trip.
    emb = np.concatenate([rng.standard_normal((4000, 768)), rng.random((1000, 768)) * 40]).astype(np.float32)
    emb16 = emb[:500].astype(np.float16).astype(np.float32)
    for batch in (emb, emb16):
        expected = reference_scores(model, batch)
        got = pred.score_raw(batch, np.einsum("ij,ij->i", batch, batch))
        assert np.abs(got - expected).max() <= 1e-4
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.abs(unit_scores(pred, unit) - reference_scores(model, emb)).max() <= 1e-4


def test_predictor_pickles_small(rng):
    import pickle

    pred = AestheticPredictor.from_state_dict(random_state_dict(), PredictorSpec())
    unit_scores(pred, rng.standard_normal((4, 768)).astype(np.float32))
    assert len(pickle.dumps(pred)) < 10_000
