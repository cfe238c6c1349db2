"""Scores before choosing a threshold (issue 12): the exact histogram, the report page, guidance."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import aesthetic_dask as ad
from aesthetic_dask import histogram
from aesthetic_dask.cli import main
from conftest import photo_bytes, write_embeddings, write_shard


@pytest.fixture
def embeddings(tmp_path, rng):
    for i in range(3):
        matrix = rng.standard_normal((700, 768)).astype(np.float32)
        matrix[::97] = np.nan  # error rows: never in the histogram
        write_embeddings(tmp_path / "in" / f"p{i}.parquet", matrix, f"f{i}-", row_group_size=250)
    return tmp_path / "in"


def score(inp, out, weights, *extra) -> dict:
    code = main(["score", str(inp), "-o", str(out), "--aesthetic-weights", str(weights), "--partition-rows", "250", *map(str, extra)])
    assert code == 0
    return json.loads((out / "manifest.json").read_text())


def test_the_histogram_is_exact_at_every_edge(tmp_path, embeddings, tiny_weights):
    m = score(embeddings, tmp_path / "out", tiny_weights["safetensors"], "--threshold", "5.45", "--no-report", "--keep-rejected")
    h = m["score_histogram"]
    assert h["edges"][:3] == [0.0, 0.05, 0.1] and h["edges"][-1] == 10.0 and len(h["edges"]) == 201
    assert len(h["counts"]) == 202
    t = m["totals"]
    assert sum(h["counts"]) == t["rows_kept"] + t["rows_below_threshold"] and t["rows_error"] > 0
    assert histogram.kept_at(h["counts"], 5.45) == t["rows_kept"]
    # Counts at or above an edge equal what a job with that threshold keeps.
    for edge in (5.3, 5.4, 5.5, 5.6):
        other = score(embeddings, tmp_path / f"out-{edge}", tiny_weights["safetensors"], "--threshold", edge, "--no-report")
        assert histogram.kept_at(h["counts"], edge) == other["totals"]["rows_kept"], edge
    q = m["score_quantiles"]
    assert list(q) == ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
    assert all(a <= b for a, b in zip(list(q.values()), list(q.values())[1:]))
    scores = pd.concat([pd.read_parquet(tmp_path / "out" / d) for d in ("kept", "rejected")])["aesthetic_score"].to_numpy()
    for name, value in q.items():  # bins are 0.05 wide: quantiles from them are within a bin of exact
        assert abs(value - np.percentile(scores, int(name[1:]))) <= 0.05, name


def test_the_histogram_survives_resume_and_matches_the_notebook_api(tmp_path, embeddings, tiny_weights):
    clean = score(embeddings, tmp_path / "clean", tiny_weights["safetensors"], "--no-report")
    out = tmp_path / "resumed"
    score(embeddings, out, tiny_weights["safetensors"], "--no-report")
    sorted((out / "kept").iterdir())[1].unlink()  # one partition is redone, the others are skipped
    resumed = score(embeddings, out, tiny_weights["safetensors"], "--no-report")
    assert resumed["this_run"]["partitions_processed"] == 1
    assert resumed["score_histogram"] == clean["score_histogram"]
    cfg = ad.load_config(aesthetic_weights=str(tiny_weights["safetensors"]))
    api = ad.score_histogram(ad.score_embeddings(ad.read_embeddings(str(embeddings)), cfg))
    assert api["count"].tolist() == clean["score_histogram"]["counts"] and len(api) == 202
    assert api.iloc[1].tolist() == [0.0, 0.05, 0]


def test_extra_heads_get_their_own_histograms(tmp_path, embeddings, tiny_weights):
    m = score(embeddings, tmp_path / "out", tiny_weights["safetensors"], "--extra-scores", f"again={tiny_weights['safetensors']}")
    assert m["extra_score_histograms"]["again"]["counts"] == m["score_histogram"]["counts"]


def test_the_summary_warns_when_the_threshold_keeps_nearly_everything(tmp_path, embeddings, tiny_weights, capsys):
    score(embeddings, tmp_path / "out", tiny_weights["safetensors"])  # the default 0.5
    err = capsys.readouterr().err
    assert "warning: threshold 0.5 kept 100.0% of the scored rows" in err
    assert re.search(r"instead 5\.0 keeps [\d,]+ \(\d+\.\d%\), 5\.5 keeps", err)
    assert f"report:               {tmp_path / 'out' / 'report.html'}" in err


def external_resources(page: str) -> list[str]:
    """Anything the page would load from elsewhere (links to sample URLs are not loads)."""
    loads = re.findall(r"""(?:src|srcset|data|poster)\s*=\s*["']?(?!data:)([^"'\s>]+)""", page, re.IGNORECASE)
    loads += re.findall(r"<link\b[^>]*>", page, re.IGNORECASE) + re.findall(r"<script\b", page, re.IGNORECASE)
    loads += re.findall(r"url\(\s*['\"]?(?!data:|#)[^)]*\)", page) + re.findall(r"@import", page)
    loads += re.findall(r"""xlink:href\s*=\s*["'](?!#|data:)""", page)
    return loads


@pytest.fixture
def run_out(tmp_path, tiny_clip, tiny_weights):
    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "camera"]
    members = []
    for i in range(24):
        members += [(f"{i:04d}.jpg", photo_bytes(names[i % 6])), (f"{i:04d}.txt", f"a <b>photo</b> of {names[i % 6]}".encode())]
    members += [("bad1.jpg", b"not an image"), ("bad2.jpg", b"")]
    write_shard(tmp_path / "shards" / "a.tar", members)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "shards"), "-o", str(out), "--clip-model-config", str(tiny_clip["config"]),
                 "--clip-pretrained", str(tiny_clip["checkpoint"]), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--model-dir", str(tmp_path / "models"), "--threshold", "5.5"]) == 0
    return out


def test_the_report_has_the_numbers_thumbnails_and_nothing_external(run_out):
    page = (run_out / "report.html").read_text()
    m = json.loads((run_out / "manifest.json").read_text())
    t = m["totals"]
    for label, value in (("images in", t["rows_in"]), ("kept (&gt;= threshold)", t["rows_kept"]), ("errors", t["rows_error"])):
        assert f"<td>{label}</td><td>{value:,}</td>" in page
    assert "<td>5.5 (this job)</td>" in page and "<td>6.0</td>" in page and page.count("<svg") >= 2
    thumbs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(thumbs) >= 4
    from PIL import Image
    import base64
    import io

    assert max(Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).size) <= 128
    assert "not a JPEG, PNG, WebP or GIF image" in page and "empty image file" in page
    assert "a &lt;b&gt;photo&lt;/b&gt; of" in page  # captions are text, never markup
    assert external_resources(page) == []
    assert len(page) < 3_000_000
    # kept/ holds exactly the kept rows; samples live beside the manifest.
    assert len(pd.read_parquet(run_out / "kept")) == t["rows_kept"] and (run_out / "samples").is_dir()


def test_paths_are_never_globbed_where_they_are_literal(tmp_path, run_out, tiny_clip, tiny_weights):
    """An OUT named out[v2] showed "No samples" (fs.glob read [v2] as a character class), and an
    input directory named shards[1] was a pattern matching nothing."""
    odd = tmp_path / "out[v2] *"
    shutil.copytree(run_out, odd)
    assert main(["report", str(odd)]) == 0
    page = (odd / "report.html").read_text()
    assert "No samples" not in page and len(re.findall(r'src="data:image/jpeg;base64,', page)) >= 4
    shutil.copytree(tmp_path / "shards", tmp_path / "shards[1]")
    again = tmp_path / "again[1]"
    assert main(["run", str(tmp_path / "shards[1]"), "-o", str(again), "--clip-model-config", str(tiny_clip["config"]),
                 "--clip-pretrained", str(tiny_clip["checkpoint"]), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--model-dir", str(tmp_path / "models"), "--threshold", "5.5"]) == 0
    m, first = (json.loads((d / "manifest.json").read_text()) for d in (again, run_out))
    assert m["totals"] == first["totals"] and list(m["inputs"]) == [str(tmp_path / "shards[1]" / "a.tar")]
    assert "No samples" not in (again / "report.html").read_text()


def test_report_command_and_no_report(tmp_path, run_out, embeddings, tiny_weights):
    target = tmp_path / "elsewhere" / "r.html"
    target.parent.mkdir()
    assert main(["report", str(run_out), "-o", str(target)]) == 0
    assert "aesthetic-dask run" in target.read_text()
    m = score(embeddings, tmp_path / "quiet", tiny_weights["safetensors"], "--no-report")
    assert not (tmp_path / "quiet" / "report.html").exists() and "report" not in m
    assert main(["report", str(tmp_path / "quiet")]) == 0
    page = (tmp_path / "quiet" / "report.html").read_text()
    assert "f0-00000" in page and "<img" not in page  # the score job shows keys and captions as text
    assert main(["report", str(tmp_path / "nothing")]) == 2


def browser() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium") or shutil.which("google-chrome")


@pytest.mark.skipif(browser() is None, reason="no headless Chromium installed (apt-get install chromium-headless-shell)")
def test_the_report_renders_in_a_real_headless_browser(run_out, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2000", (run_out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2000, 1200)
    blue_bars = ((abs(image[..., 0] - 0x4C) < 20) & (abs(image[..., 1] - 0x72) < 20) & (abs(image[..., 2] - 0xB0) < 20)).sum()
    assert blue_bars > 500, "the histogram did not render"
    photo_like = np.unique(image.reshape(-1, 3) // 16, axis=0)
    assert len(photo_like) > 200, "the thumbnails did not render"
