"""Issue 31: the keep rule as a list of criteria, `--filter NAME>=T` (also >, <, <=), ANDed with
`aesthetic_score >= score_threshold`, in config, fingerprint, every sink, refilter, summary and report."""

import html
import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import aesthetic_dask as ad
from aesthetic_dask.cli import main
from aesthetic_dask.errors import ConfigError
from aesthetic_dask.filters import Criterion, as_criteria, parse, parse_all
from conftest import assert_one_clear_line, run_cli_process, write_embeddings


@pytest.mark.parametrize("text, expected", [
    ("other>=5", Criterion("other", ">=", 5.0)), ("other > 5.5", Criterion("other", ">", 5.5)),
    ("aesthetic_score<9.5", Criterion("aesthetic_score", "<", 9.5)), ("b32<=-1e-1", Criterion("b32", "<=", -0.1)),
])
def test_a_criterion_is_name_op_number(text, expected):
    assert parse(text) == expected and parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["other=>5", "other==5", "other>=", ">=5", "other>=nan", "other<inf", "other>=5 6",
                                  "5<=other", "other", "ot-her>=5", "other>=5,x<3"])
def test_a_malformed_criterion_is_one_line_naming_it(text):
    with pytest.raises(ConfigError, match="is not NAME>=T") as info:
        parse(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


def test_a_criterion_on_a_column_the_job_does_not_score_is_refused():
    assert parse_all(["other<7", "aesthetic_score<9"], ["other"]) == (Criterion("other", "<", 7), Criterion("aesthetic_score", "<", 9))
    with pytest.raises(ConfigError, match="'caption>=3' names no score column of this job; a filter applies to aesthetic_score, other"):
        parse_all(["caption>=3"], ["other"])


def test_nan_passes_no_criterion():
    scores = np.array([1.0, np.nan, 9.0], np.float32)
    for op in (">=", ">", "<", "<="):
        assert not Criterion("x", op, 5).passes(scores)[1]


@pytest.fixture
def two_heads(tmp_path, tiny_weights):
    from safetensors.numpy import save_file

    from conftest import random_state_dict

    other = tmp_path / "other.safetensors"
    save_file(random_state_dict(seed=9), str(other))
    return tiny_weights["safetensors"], other


@pytest.fixture
def embeddings(tmp_path, rng):
    matrix = rng.standard_normal((300, 768)).astype(np.float32)
    matrix[7] = np.nan  # one error row
    for i in range(3):
        write_embeddings(tmp_path / "in" / f"f{i}.parquet", matrix[i * 100:(i + 1) * 100], f"f{i}-")
    return tmp_path / "in"


def score_args(inputs, out, main_head, other, *extra):
    return ["score", str(inputs), "-o", str(out), "--aesthetic-weights", str(main_head), "--extra-scores", f"other={other}",
            "--no-report", *map(str, extra)]


def medians(embeddings, main_head, other) -> tuple[float, float]:
    cfg = ad.load_config(aesthetic_weights=str(main_head), extra_scores={"other": str(other)})
    df = ad.score_embeddings(ad.read_embeddings(str(embeddings)), cfg).compute(scheduler="sync")
    return float(df["aesthetic_score"].median()), float(df["other"].median())


def test_filters_are_anded_with_the_threshold_in_every_output_and_count(tmp_path, embeddings, two_heads, capsys):
    main_head, other = two_heads
    a_mid, o_mid = medians(embeddings, main_head, other)
    out = tmp_path / "out"
    rule = [f"other<{o_mid:.4f}", f"aesthetic_score<={a_mid + 0.05:.4f}"]
    o_bound, a_bound = (np.float32(parse(r).value) for r in rule)
    t = round(a_mid - 0.05, 4)
    assert main(score_args(embeddings, out, main_head, other, "--threshold", t, "--keep-rejected",
                           "--filter", rule[0], "--filter", rule[1])) == 0
    kept, rejected = pd.read_parquet(out / "kept"), pd.read_parquet(out / "rejected")
    errors = pd.read_parquet(out / "errors")
    assert len(kept) + len(rejected) + len(errors) == 300 and errors["key"].tolist() == ["f0-00007"]
    assert 0 < len(kept) < len(rejected)
    passes = lambda df: (df["aesthetic_score"] >= np.float32(t)) & (df["other"] < o_bound) \
        & (df["aesthetic_score"] <= a_bound)  # noqa: E731
    assert passes(kept).all() and not passes(rejected).any()
    m = json.loads((out / "manifest.json").read_text())
    both = pd.concat([kept, rejected])
    assert m["rows_failing_filters"] == {str(parse(rule[0])): int((both["other"] >= o_bound).sum()),
                                         str(parse(rule[1])): int((both["aesthetic_score"] > a_bound).sum())}
    assert m["settings"]["filters"] == rule and m["config"]["filters"] == rule
    assert m["totals"]["rows_kept"] == len(kept) and m["totals"]["rows_below_threshold"] == len(rejected)
    provenance = json.loads(pq.read_schema(next((out / "kept").glob("*.parquet"))).metadata[b"aesthetic_dask"])
    assert provenance["filters"] == [str(parse(r)) for r in rule]
    printed = "".join(capsys.readouterr())
    assert "kept (all criteria):" in printed and f"filter:               {parse(rule[0])} (failed by" in printed

    # The notebook keeps exactly the job's rows, from the config's `filters`.
    cfg = ad.load_config(aesthetic_weights=str(main_head), extra_scores={"other": str(other)}, filters=rule,
                         threshold=t)
    lazy = ad.filter_by_score(ad.score_embeddings(ad.read_embeddings(str(embeddings)), cfg), cfg.score_threshold, cfg.filters)
    assert sorted(lazy.compute(scheduler="sync")["key"]) == sorted(kept["key"])

    # The report names the filters; its head's chart marks the criterion.
    from aesthetic_dask.report import write_report

    page = html.unescape((out / write_report(str(out)).rsplit("/", 1)[-1]).read_text())
    assert f"{parse(rule[0])} (failed by" in page and "kept (all criteria)" in page


def test_filters_are_in_the_fingerprint_but_an_out_without_them_still_resumes(tmp_path, embeddings, two_heads):
    main_head, other = two_heads
    out = tmp_path / "out"
    assert main(score_args(embeddings, out, main_head, other)) == 0
    assert "filters" not in json.loads((out / "manifest.json").read_text())["settings"]  # as OUTs written before it
    assert main(score_args(embeddings, out, main_head, other)) == 0
    proc = run_cli_process(score_args(embeddings, out, main_head, other, "--filter", "other>=4"))
    assert_one_clear_line(proc, 2, "holds the output of a different job (changed: filters)")
    assert main(score_args(embeddings, out, main_head, other, "--filter", "other>=4", "--overwrite")) == 0
    assert (pd.read_parquet(out / "kept")["other"] >= 4).all()


def test_a_filter_on_an_unscored_column_or_malformed_is_exit_2_in_one_line(tmp_path, embeddings, two_heads):
    main_head, other = two_heads
    proc = run_cli_process(score_args(embeddings, tmp_path / "out", main_head, other, "--filter", "caption>=3"))
    assert_one_clear_line(proc, 2, "'caption>=3' names no score column of this job")
    proc = run_cli_process(score_args(embeddings, tmp_path / "out", main_head, other, "--filter", "other=>3"))
    assert_one_clear_line(proc, 2, "'other=>3' is not NAME>=T")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_rejected", [True, False])
def test_refilter_keeps_the_jobs_filters(tmp_path, embeddings, two_heads, keep_rejected):
    main_head, other = two_heads
    a_mid, o_mid = medians(embeddings, main_head, other)
    flags = ["--filter", f"other>={o_mid:.4f}", *(["--keep-rejected"] if keep_rejected else [])]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(score_args(embeddings, out, main_head, other, "--threshold", f"{a_mid - 0.5:.4f}", *flags)) == 0
    assert main(["refilter", str(out), "--threshold", f"{a_mid:.4f}", "--no-report"]) == 0
    assert main(score_args(embeddings, fresh, main_head, other, "--threshold", f"{a_mid:.4f}", *flags)) == 0
    assert sorted(pd.read_parquet(out / "kept")["key"]) == sorted(pd.read_parquet(fresh / "kept")["key"])
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, fresh))
    assert a["totals"] == b["totals"] and a["rows_failing_filters"] == b["rows_failing_filters"]
    assert a["fingerprint"] == b["fingerprint"]  # the refiltered OUT is that job's: it resumes
    if keep_rejected:  # and back down, from the rejected rows
        assert main(["refilter", str(out), "--threshold", f"{a_mid - 0.5:.4f}", "--no-report"]) == 0
        kept = pd.read_parquet(out / "kept")
        assert (kept["other"] >= np.float32(o_mid)).all() and (kept["aesthetic_score"] >= np.float32(a_mid - 0.5)).all()


def test_write_shards_hold_the_rows_the_filters_keep(tmp_path, tiny_clip, tiny_weights):
    from conftest import photo_bytes, write_shard

    members = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera", "astronaut")):
        members += [(f"{i:04d}.jpg", photo_bytes(name)), (f"{i:04d}.txt", name.encode())]
    shard = write_shard(tmp_path / "shards" / "s-00000.tar", members)
    out = tmp_path / "out"
    clip = ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models")]
    # Score once to choose a bound that splits the rows, then filter with it (threshold 0 keeps all).
    assert main(["run", str(shard), "-o", str(tmp_path / "probe"), *clip, "--threshold", "-100", "--no-report"]) == 0
    scores = np.sort(pd.read_parquet(tmp_path / "probe" / "kept")["aesthetic_score"].to_numpy())
    bound = float((scores[2] + scores[3]) / 2)
    assert main(["run", str(shard), "-o", str(out), *clip, "--threshold", "-100", "--filter", f"aesthetic_score<{bound}",
                 "--write-shards", str(tmp_path / "kept-shards"), "--no-report"]) == 0
    kept = set(pd.read_parquet(out / "kept")["key"])
    assert len(kept) == 3
    with tarfile.open(tmp_path / "kept-shards" / "s-00000.tar") as tar:
        assert {n.split(".")[0] for n in tar.getnames()} == kept
    stats = json.loads((tmp_path / "kept-shards" / "s-00000_stats.json").read_text())
    assert stats["successes"] == 3 and stats["filters"] == [str(parse(f"aesthetic_score<{bound}"))]


def test_filter_by_score_takes_criteria_or_text():
    df = pd.DataFrame({"aesthetic_score": np.array([4, 6, 8, 6], np.float32), "other": np.array([1, 1, 1, np.nan], np.float32),
                       "error": [None, None, None, None]})
    assert ad.filter_by_score(df, 5.0, ["aesthetic_score<7"]).index.tolist() == [1, 3]
    assert ad.filter_by_score(df, 5.0, as_criteria(["other>0"])).index.tolist() == [1, 2]  # NaN fails
