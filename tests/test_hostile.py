"""Hostile shards (issue 8): no decoder the job does not declare, no shard lost to one sample,
bounded memory, exact accounting. Every input here is crafted by the test."""

import bz2
import gzip
import io
import json
import lzma
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aesthetic_dask.cli import main
from aesthetic_dask.image_reader import ShardReader
from conftest import assert_one_clear_line, photo_bytes, run_cli_process, write_shard
from crafted import gnu_sparse_member, tar_bytes


def clip_args(tiny_clip, tiny_weights, tmp_path):
    return ["--clip-model-config", str(tiny_clip["config"]), "--clip-pretrained", str(tiny_clip["checkpoint"]),
            "--aesthetic-weights", str(tiny_weights["safetensors"]), "--model-dir", str(tmp_path / "models")]


def run(tmp_path, tiny_clip, tiny_weights, inputs, *extra, out="out") -> tuple[int, dict, Path]:
    target = tmp_path / out
    code = main(["run", *map(str, inputs), "-o", str(target), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", "0", "--keep-rejected", "--no-report", *map(str, extra)])
    m = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").exists() else {}
    return code, m, target


def every_row(out: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(out / d) for d in ("kept", "rejected", "errors") if (out / d).exists()]
    return pd.concat(frames, ignore_index=True)


def assert_accounted(m: dict, out: Path, keys: list[str]) -> None:
    """rows_in = kept + below + error, and every sample appears exactly once."""
    t = m["totals"]
    assert t["rows_in"] == t["rows_kept"] + t["rows_below_threshold"] + t["rows_error"] == len(keys)
    assert sorted(every_row(out)["key"]) == sorted(keys)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def ico_around(png: bytes) -> bytes:
    """An .ico container whose one image is ``png`` (ICO allows PNG-compressed entries)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def encoded(fmt: str, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"(ghostscript ran) print\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def test_only_declared_formats_are_decoded_and_no_container_escapes_the_pixel_limit(tmp_path, tiny_clip, tiny_weights, monkeypatch):
    # A fake Ghostscript on PATH: if anything hands it the shard's PostScript, it leaves a marker.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "gs-ran"
    (bindir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bindir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    members = [
        ("eps.jpg", EPS), ("bmp.png", encoded("BMP")), ("tiff.jpg", encoded("TIFF")), ("ico.png", encoded("ICO")),
        ("icobomb.png", ico_around(png_header_only(12000, 12000))), ("pngbomb.png", png_header_only(12000, 12000)),
        ("ok.jpg", photo_bytes("coffee")), ("ok2.webp", encoded("WEBP")), ("ok3.gif", encoded("GIF")), ("ok4.png", encoded("PNG")),
    ]
    write_shard(tmp_path / "formats.tar", members)
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [tmp_path / "formats.tar"], "--max-image-pixels", "2000000")
    assert code == 0 and not marker.exists()
    errors = pd.read_parquet(out / "errors").set_index("key")["error"]
    for key in ("eps", "bmp", "tiff", "ico", "icobomb"):
        assert errors[key] == "not a JPEG, PNG, WebP or GIF image (no other format is decoded)", key
    assert errors["pngbomb"].startswith("image is 12000x12000 = 144000000 pixels, over the limit of 2000000")
    assert sorted(pd.read_parquet(out / "kept")["key"]) == ["ok", "ok2", "ok3", "ok4"]
    assert_accounted(m, out, [n.split(".")[0] for n, _ in members])


def test_no_sample_can_lose_its_shard(tmp_path, tiny_clip, tiny_weights):
    deep = b"[" * 100_000 + b"]" * 100_000
    members = [
        ("good.jpg", photo_bytes("coffee")), ("good.json", json.dumps({"width": 3, "big": 1}).encode()),
        ("deep.jpg", photo_bytes("chelsea")), ("deep.json", b'{"width": ' + deep + b"}"),
        ("huge.jpg", photo_bytes("rocket")), ("huge.json", json.dumps({"width": 2**70, "big": 10**400}).encode()),
        ("badgif.gif", b"GIF89a" + b"\xff" * 40), ("badwebp.webp", b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x00" * 30),
        ("badpng.png", encoded("PNG")[:60]),
    ]
    shard = tmp_path / ("s" * 240 + ".tar")  # a file name near the filesystem's limit
    write_shard(shard, members)
    raw = shard.read_bytes()
    # A member name that is not valid UTF-8 (bytes 0xff 0xfe), patched into the tar header.
    name_field = b"good.jpg".ljust(100, b"\0")
    at = raw.index(name_field)
    header = bytearray(raw[at : at + 512])
    header[0:100] = b"\xff\xfename.jpg".ljust(100, b"\0")
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    patched = raw[:at] + bytes(header) + raw[at + 512 :]
    bad_names = tmp_path / "badnames.tar"
    bad_names.write_bytes(patched)
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [shard, bad_names], "--json-fields", "width:int64,big:float64",
                       "--max-sidecar-bytes", "1000000")
    assert code == 0, m
    rows = every_row(out)
    mine = rows[rows["source"] == str(shard)].set_index("key")
    assert mine.loc["good", "width"] == 3 and pd.isna(mine.loc["deep", "width"]) and pd.isna(mine.loc["huge", "width"])
    assert pd.isna(mine.loc["huge", "big"]) and pd.isna(mine.loc["good", "error"]) and pd.isna(mine.loc["deep", "error"])
    for key in ("badgif", "badwebp", "badpng"):
        assert mine.loc[key, "error"].startswith(("corrupt", "not a JPEG")), (key, mine.loc[key, "error"])
    theirs = rows[rows["source"] == str(bad_names)]
    # The renamed member is a sample of its own (its key is the name with U+FFFD), good.json another.
    assert (theirs["error"] == "member name is not valid UTF-8").sum() == 1 and len(theirs) == 7
    assert (theirs["key"] == "\ufffd\ufffdname").sum() == 1 and theirs.set_index("key").loc["good", "error"] == "no image"
    t = m["totals"]
    assert t["rows_in"] == t["rows_kept"] + t["rows_below_threshold"] + t["rows_error"] == len(rows) == 6 + 7


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_truncation_inside_compressed_shards_is_detected_and_every_suffix_is_listed(tmp_path, tiny_clip, tiny_weights, compress):
    members = []
    for i in range(6):
        members += [(f"{i:03d}.jpg", photo_bytes(("coffee", "rocket", "chelsea")[i % 3])), (f"{i:03d}.txt", b"caption")]
    plain = write_shard(tmp_path / "plain.tar", members).read_bytes()
    packer = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compress]
    whole = packer(plain)
    d = tmp_path / "in"
    d.mkdir()
    (d / f"whole.tar.{compress}").write_bytes(whole)
    # Cut at a member boundary of the uncompressed tar: a streaming read would see a clean end.
    boundary = plain.index(b"003.jpg")  # the header of the 4th sample
    (d / f"cut.tar.{compress}").write_bytes(packer(plain[:boundary]))
    (d / f"chopped.tar.{compress}").write_bytes(whole[: len(whole) * 2 // 3])  # the compressed stream itself cut
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [d])
    assert code == 3 and m["status"] == "partial"
    by = {Path(k).name: v for k, v in m["inputs"].items()}
    assert set(by) == {f"whole.tar.{compress}", f"cut.tar.{compress}", f"chopped.tar.{compress}"}
    assert by[f"whole.tar.{compress}"]["rows_in"] == 6 and "failures" not in by[f"whole.tar.{compress}"]
    assert by[f"cut.tar.{compress}"]["rows_in"] == 3 and "no end-of-archive marker" in by[f"cut.tar.{compress}"]["failures"][0]
    assert by[f"chopped.tar.{compress}"]["failures"]


def test_sidecars_are_capped_and_a_shards_memory_does_not_follow_them(tmp_path, tiny_clip, tiny_weights):
    import tracemalloc

    members = []
    for i in range(8):
        members += [(f"{i}.jpg", photo_bytes("coffee")), (f"{i}.txt", b"x" * (20 << 20) if i % 2 else b"short caption")]
    plain = write_shard(tmp_path / "p.tar", members).read_bytes()
    (tmp_path / "big.tar.gz").write_bytes(gzip.compress(plain, 1))
    assert (tmp_path / "big.tar.gz").stat().st_size < 2 << 20  # 80 MB of captions in a small file
    tracemalloc.start()
    samples = list(ShardReader(str(tmp_path / "big.tar.gz")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert [s.error is not None for s in samples] == [False, True] * 4
    assert samples[1].error == ".txt sidecar '1.txt' is 20971520 bytes, over the limit of 65536 (max_sidecar_bytes)"
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [tmp_path / "big.tar.gz"], "--max-sidecar-bytes", "100")
    assert code == 0 and m["totals"]["rows_error"] == 4 and m["totals"]["rows_in"] == 8


def test_reserved_names_never_collide(tmp_path, tiny_clip, tiny_weights, rng):
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee"))])
    for field in ("key", "source", "caption", "error", "aesthetic_score"):
        proc = run_cli_process(["run", str(tmp_path / "s.tar"), "-o", str(tmp_path / "o"), *clip_args(tiny_clip, tiny_weights, tmp_path),
                                "--json-fields", field])
        assert_one_clear_line(proc, 2, f"--json-fields {field}: {field!r} is a column the job writes")
    # Image Parquet whose own columns are named like the job's: read as NAME_input, nothing lost.
    imgs = [photo_bytes("coffee"), photo_bytes("rocket"), b"junk"]
    pq.write_table(pa.table({"key": ["p0", "p1", "p2"], "image": pa.array(imgs, pa.binary()),
                             "error": pa.array([1.5, None, 2.5], pa.float64()), "aesthetic_score": ["x", "y", "z"],
                             "embedding": [1, 2, 3], "source": ["web", "web", "web"]}), tmp_path / "img.parquet")
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [tmp_path / "img.parquet"], "--keep-embeddings")
    assert code == 0 and m["totals"]["rows_error"] == 1 and m["totals"]["rows_kept"] == 2
    kept = pd.read_parquet(out / "kept").set_index("key")
    assert {"error_input", "aesthetic_score_input", "embedding_input"} <= set(kept.columns) and "error" not in kept.columns
    assert kept.loc["p0", "error_input"] == 1.5 and kept.loc["p1", "aesthetic_score_input"] == "y"
    assert len(kept.loc["p0", "embedding"]) == 768
    err = pd.read_parquet(out / "errors")
    assert err["source"].tolist() == [str(tmp_path / "img.parquet")] and err["source_input"].tolist() == ["web"]
    # Embeddings Parquet (the score job): an input `error` string column does not make error rows.
    from conftest import write_embeddings

    write_embeddings(tmp_path / "emb" / "e.parquet", rng.standard_normal((4, 768)).astype(np.float32),
                     error=pa.array(["bad", None, "bad", None]), aesthetic_score=pa.array([1.0, 2.0, 3.0, 4.0]))
    assert main(["score", str(tmp_path / "emb"), "-o", str(tmp_path / "sout"), "--aesthetic-weights", str(tiny_weights["safetensors"]),
                 "--threshold", "0", "--no-report"]) == 0
    kept = pd.read_parquet(tmp_path / "sout" / "kept")
    assert len(kept) == 4 and kept["error_input"].fillna("-").tolist() == ["bad", "-", "bad", "-"]


def test_write_shards_holds_exactly_the_kept_samples_even_with_repeated_keys(tmp_path, tiny_clip, tiny_weights):
    members = [("a.jpg", photo_bytes("coffee")), ("a.txt", b"first a"),
               ("b.jpg", photo_bytes("rocket")), ("b.txt", b"b"),
               ("a.jpg", b"not an image, the second sample keyed a"), ("a.txt", b"second a"),
               ("c.jpg", photo_bytes("chelsea"))]
    write_shard(tmp_path / "rep.tar", members)
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [tmp_path / "rep.tar"], "--write-shards", tmp_path / "ws")
    assert code == 0 and m["totals"] == {**m["totals"], "rows_in": 4, "rows_error": 1, "rows_kept": 3}
    (written,) = (tmp_path / "ws").glob("*.tar")
    with tarfile.open(written) as tar:
        got = [(t.name, tar.extractfile(t).read()) for t in tar]
    assert got == [members[0], members[1], members[2], members[3], members[6]]


def test_samples_of_links_and_special_members_are_counted(tmp_path, tiny_clip, tiny_weights):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("real.jpg", photo_bytes("coffee"))
        link = tarfile.TarInfo("sym.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "real.jpg"
        tar.addfile(hard)
        fifo = tarfile.TarInfo("fifo.png")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory entry is not a sample
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [path])
    assert code == 0
    errors = pd.read_parquet(out / "errors").set_index("key")["error"]
    assert errors["sym"] == "member 'sym.jpg' is a symlink, not a regular file"
    assert errors["hard"] == "member 'hard.jpg' is a hard link, not a regular file"
    assert errors["fifo"] == "member 'fifo.png' is a special file, not a regular file"
    assert_accounted(m, out, ["real", "sym", "hard", "fifo"])


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_clip, tiny_weights):
    for s in range(30):
        write_shard(tmp_path / "many" / f"{s:03d}.tar", [(f"{s}{i}.jpg", photo_bytes("coffee")) for i in range(8)])
    argv = [sys.executable, "-m", "aesthetic_dask", "run", str(tmp_path / "many"), "-o", str(tmp_path / "out"),
            *clip_args(tiny_clip, tiny_weights, tmp_path), "--threads-per-worker", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out" / "_parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts.is_dir() and any(parts.glob("*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "terminated (SIGTERM); re-run the same command to resume" in err and "Traceback" not in err
    # Besides the progress output, that one line: nothing of distributed's or tornado's.
    assert not [line for line in err.splitlines() if "distributed." in line or "tornado" in line or "CancelledError" in line], err
    assert "terminated (SIGTERM)" in (tmp_path / "out" / "job.log").read_text()
    # OUT tells the truth (issue 29): interrupted, counting what was committed, its report, no _tmp.
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    committed = {p.stem for p in parts.glob("*.json")}
    assert m["status"] == "interrupted" and 1 <= m["partitions"]["done"] <= len(committed)
    assert set(m["partitions"]["done_names"]) <= committed and m["totals"]["rows_in"] == 8 * m["partitions"]["done"]
    assert (out / "report.html").exists() and not (out / "_tmp").exists() and not (out / "_lock.json").exists()
    refused = subprocess.run([sys.executable, "-m", "aesthetic_dask", "refilter", str(out), "--threshold", "5"],
                             capture_output=True, text=True, timeout=120)
    assert_one_clear_line(refused, 2, "its job has not finished (status interrupted); re-run the job first")
    # Ctrl-C twice while the job stops: exit 1 (never death by signal, 130), one line, no traceback.
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "out2")
    parts = tmp_path / "out2" / "_parts"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while time.time() < deadline + 120 and not (parts.is_dir() and any(parts.glob("*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert len([line for line in err.splitlines() if line.startswith("aesthetic-dask: error:")]) == 1, err
    assert "Traceback" not in err


def test_a_second_signal_stops_at_once_with_exit_1():
    """While the first Ctrl-C is being handled (the job unwinding), a second one ends the process
    at once: one line, exit 1."""
    script = ("import time\nfrom aesthetic_dask import interrupts\ninterrupts.install()\n"
              "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('unwinding', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "unwinding"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)  # not the 60 s the unwinding would take
    assert proc.returncode == 1
    assert err.strip() == "aesthetic-dask: error: interrupted again; stopped at once (re-run the same command to resume)"


def test_sigterm_during_the_final_report_leaves_a_done_manifest_with_its_report(tmp_path, tiny_clip, tiny_weights, monkeypatch):
    """The last writes (manifest, then report) are finished before a first signal is acted on."""
    from aesthetic_dask import report

    real = report.write_report

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the report is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "write_report", signalled)
    write_shard(tmp_path / "s.tar", [("a.jpg", photo_bytes("coffee")), ("b.jpg", photo_bytes("rocket"))])
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "s.tar"), "-o", str(out), *clip_args(tiny_clip, tiny_weights, tmp_path),
                 "--threshold", "0"])
    assert code == 1  # told to stop: it says so, after the writes
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "done" and (out / "report.html").is_file() and "2" in (out / "report.html").read_text()


def test_a_sparse_member_is_never_expanded(tmp_path, tiny_clip, tiny_weights):
    """A 250 MB hole in a few KiB of shard is that sample's error, never 250 MB of zeros read."""
    png, plain = photo_bytes("coffee", "PNG"), io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("good.jpg", photo_bytes("rocket")), ("good.txt", b"caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = plain.getvalue().rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    shard = tmp_path / "sparse.tar"
    shard.write_bytes(body + gnu_sparse_member("holes.png", png, 250 << 20) + b"\0" * 1024)
    with tarfile.open(shard) as tar:  # what every tar reader sees: a 250 MB file
        assert tar.getmember("holes.png").issparse() and tar.getmember("holes.png").size == 250 << 20
    samples = list(ShardReader(str(shard)))
    assert [s.key for s in samples] == ["good", "holes"] and samples[0].error is None
    assert samples[1].image is None and "sparse file (262144000 bytes once its holes are filled); not read" in samples[1].error
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [shard])
    assert code == 0 and m["totals"]["rows_error"] == 1
    assert_accounted(m, out, ["good", "holes"])


def test_an_over_long_key_is_its_samples_error_and_stays_small_everywhere(tmp_path, tiny_clip, tiny_weights):
    """PAX names may be any length; a 2 MiB name is the sample's error, shown cut (with a digest)
    in the rows, the manifest and the report, never copied whole."""
    long_a, long_b = "a" * (2 << 20), "a" * (2 << 20) + "b"
    shard = tmp_path / "pax.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("fine.jpg", photo_bytes("rocket")), (long_a + ".jpg", photo_bytes("coffee")),
                           (long_b + ".jpg", photo_bytes("chelsea"))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "out"
    code = main(["run", str(shard), "-o", str(target), *clip_args(tiny_clip, tiny_weights, tmp_path), "--threshold", "0"])
    m = json.loads((target / "manifest.json").read_text())
    assert code == 0 and m["totals"]["rows_error"] == 2 and m["totals"]["rows_kept"] == 1
    errors = pd.read_parquet(target / "errors")
    assert set(errors["error"]) == {f"key is {len(long_a)} characters, over the limit of 1024",
                                    f"key is {len(long_b)} characters, over the limit of 1024"}
    keys = list(errors["key"])
    assert len(set(keys)) == 2 and all(k.startswith("a" * 1024 + "...(") and len(k) < 1100 for k in keys)
    sizes = {p.name: p.stat().st_size for p in target.rglob("*") if p.is_file()}
    assert max(sizes.values()) < 200_000, sizes


def test_write_shards_writes_safe_member_names(tmp_path, tiny_clip, tiny_weights):
    """``../x.jpg``, absolute and dotted names would escape a naive extraction's directory: the
    written tar holds an injective escape of each, that extracts inside its directory."""
    from urllib.parse import unquote

    from aesthetic_dask.tar_stream import safe_member_name

    names = ["../escape.jpg", "/etc/abs.jpg", "ok/./dot.jpg", "back\\slash.jpg", "per%2E%2Ecent.jpg", "plain.jpg"]
    write_shard(tmp_path / "names.tar", [(n, photo_bytes("coffee")) for n in names])
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [tmp_path / "names.tar"], "--write-shards", tmp_path / "ws")
    assert code == 0 and m["totals"]["rows_kept"] == len(names)
    (written,) = (tmp_path / "ws").glob("*.tar")
    with tarfile.open(written) as tar:
        got = [t.name for t in tar]
        assert all(t.isreg() and t.mode == 0o644 and not t.pax_headers for t in tar)
        tar.extractall(tmp_path / "x", filter="data")  # refuses anything that leaves its directory
    assert got == [safe_member_name(n) for n in names] and len(set(got)) == len(names)
    assert got[-1] == "plain.jpg" and not any(g.startswith("/") or ".." in g.split("/") for g in got)
    assert ["/".join(unquote(p) if p != "%2F" else "" for p in g.split("/")) for g in got] == names


def test_a_ctrl_c_while_the_command_starts_is_one_line_and_exit_1(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "aesthetic_dask", "score", str(tmp_path), "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # still importing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (1, 2), err  # interrupted (1), or done already refusing the empty input (2)
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("aesthetic-dask: error:")]) == 1, err


COMPRESSORS = {".tar.gz": gzip.compress, ".tar.bz2": bz2.compress, ".tar.xz": lzma.compress}


@pytest.mark.parametrize("suffix", COMPRESSORS)
def test_compressed_members_that_expand_like_bombs_are_bounded(tmp_path, suffix, monkeypatch):
    """Zeros inflate 1000:1 and more: an image expanding past 50x is its sample's error and never
    read whole; once bombs inflated past their bound in all, the shard stops with the reason, and
    the samples before count."""
    from aesthetic_dask import tar_stream

    # The real bounds (16 MiB, 256 MiB) are tested below, in the job.
    monkeypatch.setattr(tar_stream, "EXPANSION_FLOOR", 1 << 20)
    monkeypatch.setattr(tar_stream, "MAX_BOMB_BYTES", 8 << 20)
    shard = tmp_path / f"bomb{suffix}"
    shard.write_bytes(COMPRESSORS[suffix](tar_bytes([
        ("good.jpg", photo_bytes("rocket")), ("good.txt", b"caption"), ("small_bomb.jpg", b"\0" * (4 << 20)),
        ("mid.jpg", photo_bytes("coffee")), ("big_bomb.jpg", b"\0" * (64 << 20)), ("after.jpg", photo_bytes("coffee"))])))
    assert shard.stat().st_size < 200_000
    inflated = []
    real_read = tar_stream.TarStream.read
    monkeypatch.setattr(tar_stream.TarStream, "read", lambda self, n=-1: inflated.append(len(r := real_read(self, n))) or r)
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert [s.key for s in samples] == ["good", "small_bomb", "mid", "big_bomb"]
    assert samples[0].error is None and samples[0].caption == "caption" and samples[2].error is None
    assert samples[1].image is None
    assert samples[1].error == "image 'small_bomb.jpg' expands over 50x from the compressed shard (a decompression bomb); not read"
    assert samples[3].error is not None and samples[3].image is None
    assert reader.failure.startswith("members expanding over 50x from the compressed bytes (decompression bombs, "
                                     "'big_bomb.jpg' the last) inflated past 8388608 bytes; the shard is not read past")
    assert sum(inflated) < 16 << 20, "the bombs were inflated past their bound"


def test_honest_compressed_shards_are_never_taken_for_bombs(tmp_path, tiny_clip, tiny_weights, monkeypatch):
    """Image data is compressed already (about 1:1); tar headers and tiny sidecars compress 80:1 and
    more, and are not measured; a bomb at the real bound ends its shard in the job (exit 3)."""
    from aesthetic_dask import tar_stream

    rng = np.random.default_rng(0)
    honest = tmp_path / "in" / "honest.tar.gz"
    honest.parent.mkdir()
    tiny = [(f"{i:06d}.{ext}", f"caption {i}".encode()) for i in range(20000) for ext in ("txt", "json")]
    honest.write_bytes(gzip.compress(tar_bytes([("big.jpg", rng.bytes(20 << 20)), ("photo.jpg", photo_bytes("coffee"))] + tiny)))
    samples = list(reader := ShardReader(str(honest)))
    assert reader.failure is None and len(samples) == 20002
    assert len(samples[0].image) == 20 << 20 and samples[1].error is None  # incompressible bytes: read whole
    monkeypatch.setattr(tar_stream, "EXPANSION_FLOOR", 64 << 10)
    assert ShardReader(str(honest)).failure is None and sum(1 for _ in ShardReader(str(honest))) == 20002
    monkeypatch.undo()
    bomb = tmp_path / "in" / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(tar_bytes([("good.jpg", photo_bytes("rocket")), ("zeros.jpg", b"\0" * (200 << 20))])))
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [bomb], "--write-shards", str(tmp_path / "ws"))
    assert code == 0 and m["totals"]["rows_in"] == 2 and m["totals"]["rows_error"] == 1
    errors = pd.read_parquet(out / "errors")
    assert list(errors["error"]) == ["image 'zeros.jpg' expands over 50x from the compressed shard (a decompression bomb); not read"]
    bombs = tmp_path / "in" / "bombs.tar.gz"  # two of them: past 256 MiB in all, the shard stops
    bombs.write_bytes(gzip.compress(tar_bytes([("good.jpg", photo_bytes("rocket"))] + [(f"z{i}.jpg", b"\0" * (200 << 20)) for i in range(2)])))
    code, m, out = run(tmp_path, tiny_clip, tiny_weights, [bombs], "--write-shards", str(tmp_path / "ws"), out="out2")
    assert code == 3 and m["totals"]["rows_error"] >= 1 and m["totals"]["rows_in"] <= 3
    failure, = m["inputs"][str(bombs)]["failures"]
    assert "decompression bombs" in failure and "inflated past 268435456 bytes" in failure
    with tarfile.open(next((tmp_path / "ws").glob("bombs*.tar"))) as tar:  # the kept sample before the bombs, copied
        assert [t.name for t in tar] == ["good.jpg"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_an_oversized_extended_header_is_skipped_unread(tmp_path, fmt, monkeypatch):
    """tarfile reads a PAX or GNU long-name header whole: one over 4 MiB is skipped instead, and its
    member is its own sample's error; the samples around it are read as usual."""
    from aesthetic_dask import tar_stream

    shard = tmp_path / "long.tar.gz"
    shard.write_bytes(gzip.compress(tar_bytes([("fine.jpg", photo_bytes("rocket")), ("x" * (6 << 20) + ".jpg", b"\xff\xd8"),
                                               ("x" * (6 << 20) + ".txt", b"c"), ("after.jpg", photo_bytes("coffee"))], fmt)))
    seen = []
    for name in ("_proc_pax", "_proc_gnulong"):
        real = getattr(tarfile.TarInfo, name)
        monkeypatch.setattr(tarfile.TarInfo, name, lambda self, tar, real=real: seen.append(self.size) or real(self, tar))
    samples = list(reader := ShardReader(str(shard)))
    assert reader.failure is None and not any(size > tar_stream.MAX_HEADER_BYTES for size in seen)
    assert [s.key.startswith("(a member with a ") for s in samples] == [False, True, True, False]
    assert samples[0].error is None and samples[3].error is None and samples[3].key == "after"
    assert all(s.error.startswith("member header is ") and s.error.endswith("over the limit of 4194304; not read")
               for s in samples[1:3])


def test_a_signal_during_pythons_own_teardown_keeps_the_exit_code(tmp_path):
    """Python's teardown puts the default handlers back after the atexit callbacks: a Ctrl-C pressed
    twice that lands there killed the process by the signal (exit -2), its code already decided."""
    script = ("import os, signal, sys, time\nfrom aesthetic_dask.cli import command\n"
              "class Late:\n    def __del__(self):\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(0.2)\n"
              "late = Late()  # finalised with the main module, after the default handlers are back\n"
              "sys.argv = ['aesthetic-dask', 'download', '--list']\nraise SystemExit(command())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
