import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import aesthetic_dask as ad
from aesthetic_dask.models.heads import AestheticPredictor
from aesthetic_dask.embeddings_reader import table_to_frame
from aesthetic_dask.score import score_partition
from aesthetic_dask.models.heads import PredictorSpec
from conftest import embedding_array, random_state_dict


@pytest.fixture(scope="module")
def predictor():
    return AestheticPredictor.from_state_dict(random_state_dict(), PredictorSpec())


def frame(column: pa.Array, n: int | None = None) -> pd.DataFrame:
    n = len(column) if n is None else n
    return table_to_frame(pa.table({"key": [f"k{i}" for i in range(n)], "embedding": column}))


def test_every_invalid_row_kind_gets_a_reason_and_no_score(predictor, rng):
    good = rng.standard_normal(768).astype(np.float32)
    nan_row = good.copy()
    nan_row[10] = np.nan
    inf_row = good.copy()
    inf_row[0] = np.inf
    with_null = good.tolist()
    with_null[5] = None
    rows = [good.tolist(), None, good[:767].tolist(), [], nan_row.tolist(), inf_row.tolist(), [0.0] * 768, with_null, (good * 2).tolist()]
    out = score_partition(frame(embedding_array(rows)), predictor)
    assert out["error"].iloc[1:8].tolist() == [
        "null embedding",
        "embedding has 767 values, expected 768",
        "embedding has 0 values, expected 768",
        "embedding contains NaN or inf",
        "embedding contains NaN or inf",
        "embedding has zero norm",
        "embedding contains null values",
    ]
    assert out["error"].iloc[[0, 8]].isna().all()
    scores = out["aesthetic_score"].to_numpy()
    assert out["aesthetic_score"].dtype == np.float32
    assert np.isnan(scores[1:8]).all()
    # Scale does not change the score: the embedding is L2-normalised first.
    assert scores[0] == pytest.approx(scores[8], abs=1e-5)


@pytest.mark.parametrize("value_type", [pa.float16(), pa.float32(), pa.float64()])
@pytest.mark.parametrize("fixed", [None, 768])
def test_storage_types_score_alike(predictor, rng, value_type, fixed):
    emb = rng.standard_normal((20, 768)).astype(np.float16).astype(np.float32)
    expected = predictor.score_raw(emb, np.einsum("ij,ij->i", emb, emb))
    col = embedding_array(emb.astype(value_type.to_pandas_dtype()).tolist(), value_type, fixed)
    out = score_partition(frame(col), predictor)
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), expected, atol=1e-5)


def test_threshold_keeps_equal_scores(predictor, rng):
    emb = rng.standard_normal((50, 768)).astype(np.float32)
    scored = score_partition(frame(embedding_array(emb.tolist())), predictor)
    t = float(np.sort(scored["aesthetic_score"].to_numpy())[25])  # an exact float32 score
    kept = ad.filter_by_score(scored, t)
    assert len(kept) == 25 and kept["aesthetic_score"].min() == np.float32(t)
    above = np.nextafter(np.float32(t), np.float32(np.inf))
    assert (scored["aesthetic_score"] >= float(above)).sum() == 24


def test_lazy_api_on_a_dask_frame(tmp_path, tiny_weights, rng):
    import dask.dataframe as dd

    from conftest import write_embeddings

    emb = rng.standard_normal((300, 768)).astype(np.float32)
    emb[7] = 0
    write_embeddings(tmp_path / "in" / "a.parquet", emb[:150], "a")
    write_embeddings(tmp_path / "in" / "b.parquet", emb[150:], "b")
    cfg = ad.load_config(aesthetic_weights=str(tiny_weights["safetensors"]), model_dir=str(tmp_path / "models"))
    ddf = ad.read_embeddings(str(tmp_path / "in"))
    assert isinstance(ddf, dd.DataFrame) and ddf.npartitions == 2
    scored = ad.score_embeddings(ddf, cfg)
    assert {"aesthetic_score", "error"} <= set(scored.columns)
    t = float(scored["aesthetic_score"].quantile(0.5).compute())
    kept = ad.filter_by_score(scored, t).compute(scheduler="sync")
    full = scored.compute(scheduler="sync")
    assert len(kept) == int((full["aesthetic_score"] >= t).sum())
    assert full.loc[full["key"] == "a00007", "error"].item() == "embedding has zero norm"


def test_huge_and_tiny_finite_embeddings_score_as_their_direction(tiny_weights):
    """Finite values whose float32 squared norm over- or underflows (issue 29): scored like the
    same direction at unit scale, not called NaN/inf or zero; real NaN, inf and zero rows keep
    their reasons."""
    import pyarrow as pa

    from aesthetic_dask.models.heads import AestheticPredictor, infer_spec
    from aesthetic_dask.score import score_arrow

    state = tiny_weights["state"]
    head = AestheticPredictor.from_state_dict(state, infer_spec(state), "tiny", "0")
    unit = np.random.default_rng(7).standard_normal((3, 768)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    nan_row, inf_row, zero_row = unit[0].copy(), unit[0].copy(), np.zeros(768, np.float32)
    nan_row[5], inf_row[9] = np.nan, np.inf
    rows = np.stack([unit[0], unit[1] * np.float32(1e20), unit[2] * np.float32(1e-25), nan_row, inf_row, zero_row])
    chunk = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 768)
    scores, reasons, _ = score_arrow([chunk], head, xp=np)
    expected, _, _ = score_arrow([pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1)), 768)], head, xp=np)
    np.testing.assert_allclose(scores[:3], expected, atol=1e-5)
    assert list(reasons[:3]) == [None, None, None]
    assert list(reasons[3:]) == ["embedding contains NaN or inf"] * 2 + ["embedding has zero norm"]
