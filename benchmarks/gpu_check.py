"""GPU check (issue 11): the GPU path measured on a real GPU, in one command.

    python benchmarks/gpu_check.py --fetch          # where the package index is reachable: wheels into
                                                    # .whl/, the real predictor heads into .gpu/
    python3 benchmarks/gpu_check.py                 # on the GPU machine (with .whl/ and .gpu/ beside)
    python benchmarks/gpu_check.py --quick          # a small dry run of every step (CPU: GPU steps skip)

On the GPU machine the wheels its image lacks (dask, distributed, dask-cuda, open_clip and their
small dependencies, and this project) are installed into /tmp/site from .whl/ and the script
re-runs itself with them. It builds its inputs there: >= 2,000 distinct JPEGs made from
scikit-image's sample photos (crops at several sizes, qualities, subsamplings; some progressive,
some greyscale) in WebDataset shards, a randomly initialised ViT-L/14 (the compute is the real
one), and the real predictor heads copied from ../shared. It then measures, each step timed and
the JSON rewritten after each (a step that fails records its error, the rest still run):

- ``model_ceiling_images_per_s``: bare fp16 open_clip ``encode_image`` on ready tensors, batch 256
  (and batch 32, the job's default);
- ``decode_images_per_s``: each decoder alone (pil, torch on CPU, torch with nvJPEG on the GPU);
- ``embedding_cosine_min``: CUDA fp16 against CPU fp32 (same images, PIL), nvJPEG against PIL
  (same model), torch-on-CPU against PIL;
- ``score_max_abs_diff_cupy_vs_numpy``: the score stage on cupy against numpy, the linear (folded)
  and ReLU (layered) heads;
- ``run_images_per_s``: the whole ``aesthetic-dask run`` over the shards through LocalCUDACluster
  with the defaults, model load included (and steady-state, from the partition records), with
  ``tasks_per_gpu_observed`` (partitions that ran at once on the GPU) and where the time went.

Writes benchmarks/results/gpu-<yyyymmdd>-<device>.json and .log.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
HEADS_DIR = REPO / ".gpu"
SHARED = REPO.parent / "shared" / "models" / "improved-aesthetic-predictor"
HEADS = ("sac+logos+ava1-l14-linearMSE.pth", "ava+logos-l14-reluMSE.pth")
SITE = Path("/tmp/site")
# What the GPU image lacks, pinned to the versions the `gpu` extra resolves to (RAPIDS 26.10).
PINNED_WHEELS = (
    "dask==2026.7.1", "distributed==2026.7.1", "dask-cuda==26.10.0", "open_clip_torch==3.3.0", "ftfy==6.3.1",
    "wcwidth==0.9.4", "partd==1.4.2", "locket==1.0.0", "tblib==3.2.2", "zict==3.0.0", "tornado==6.6.1",
)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "horse", "moon", "page")
TINY_CLIP = {
    "embed_dim": 768, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}


# ---------------------------------------------------------------------------------------------
# Here: fetch what travels.

def fetch() -> None:
    """Download the pinned wheels for the GPU image (Python 3.12, x86-64), build this project's
    wheel, copy the real heads from ../shared, and keep all of it out of git."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *PINNED_WHEELS],
                   check=True)
    for old in WHEELS.glob("aesthetic_dask-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), str(REPO)], check=True)
    HEADS_DIR.mkdir(exist_ok=True)
    for name in HEADS:
        if (SHARED / name).exists():
            shutil.copy2(SHARED / name, HEADS_DIR / name)
    exclude = REPO / ".git" / "info" / "exclude"
    if exclude.parent.exists():
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        exclude.write_text("\n".join(lines + [p for p in ("/.whl/", "/.gpu/") if p not in lines]) + "\n")
    size = sum(p.stat().st_size for p in [*WHEELS.iterdir(), *HEADS_DIR.iterdir()]) / 2**20
    print(f"{len(list(WHEELS.iterdir()))} wheels in {WHEELS}, heads in {HEADS_DIR}: {size:.1f} MiB to carry")


def ensure_packages() -> None:
    """Install the carried wheels into /tmp/site and re-run with them, where they are missing."""
    try:
        import aesthetic_dask  # noqa: F401
        import dask_cuda  # noqa: F401
        import open_clip  # noqa: F401
        return
    except ImportError:
        if os.environ.get("GPU_CHECK_INSTALLED") or not WHEELS.is_dir():
            return  # run what can run; the steps that need the missing package record why
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE), *map(str, sorted(WHEELS.glob("*.whl")))], check=True)
    env = dict(os.environ, GPU_CHECK_INSTALLED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------------------------------------
# There: build the inputs.

def make_photo(i: int) -> bytes:
    """Distinct JPEG number ``i``: a crop of a sample photo at one of several sizes and qualities."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(i)
    image = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])())
    image = image.convert("L" if i % 16 == 7 else "RGB")
    w, h = image.size
    f = rng.uniform(0.45, 1.0)
    cw, ch = max(8, int(w * f)), max(8, int(h * rng.uniform(0.45, 1.0)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    long_side = int(rng.choice([224, 320, 480, 640, 800, 1024, 1600]))
    scale = long_side / max(cw, ch)
    image = image.crop((x, y, x + cw, y + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(60, 96)), subsampling=int(rng.choice([0, 1, 2])),
               progressive=bool(i % 8 == 3))
    return buf.getvalue()


def available_photos() -> None:
    global PHOTOS
    from skimage import data

    ok = []
    for name in PHOTOS:
        try:
            getattr(data, name)()
            ok.append(name)
        except Exception:  # noqa: BLE001 - a sample that needs a download: not on this machine
            pass
    PHOTOS = tuple(ok)


def write_shards(directory: Path, photos: list[bytes], total: int, per_shard: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, total, per_shard):
        path = directory / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(total, s + per_shard)):
                blob = photos[(i * 7919) % len(photos)]  # every shard a different mix
                for name, payload in ((f"{i:08d}.jpg", blob), (f"{i:08d}.txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The check.

class Check:
    """Results, written after every step; a failing step records its error and the rest go on."""

    def __init__(self, results_dir: Path, deadline_s: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s
        self.results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps_s": {}, "errors": {}}
        self.results_dir = results_dir
        self.json_path = self.log_path = None
        self.log_lines: list[str] = []

    def name(self, device: str) -> None:
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        stem = f"gpu-{datetime.now(timezone.utc):%Y%m%d}-{slug}"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = self.results_dir / f"{stem}.json", self.results_dir / f"{stem}.log"

    def log(self, line: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {line}"
        print(line, flush=True)
        self.log_lines.append(line)
        self.save()

    def save(self) -> None:
        if self.json_path:
            self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
            self.json_path.write_text(json.dumps(self.results, indent=2) + "\n")
            self.log_path.write_text("\n".join(self.log_lines) + "\n")

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.t0)

    @contextmanager
    def step(self, name: str, optional_s: float | None = None):
        """Run a step; with ``optional_s``, skip it unless that much of the deadline is left."""
        if optional_s is not None and self.left() < optional_s:
            self.results["errors"][name] = f"skipped: {self.left():.0f}s left of the deadline, the step needs ~{optional_s:.0f}s"
            self.log(f"skip {name}")
            yield False
            return
        t = time.perf_counter()
        self.log(f"step {name}")
        try:
            yield True
        except Exception as exc:  # noqa: BLE001 - recorded; the other steps still run
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.log(f"FAILED {name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        self.results["steps_s"][name] = round(time.perf_counter() - t, 1)
        self.save()


def images_per_s(n: int, fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(n / best, 1)


def cosine_min(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def embed_with(clip, images: list[bytes], decoder: str, cpu_decode: bool = False):
    """Embeddings (host, in order) of ``images`` through the job's own embedder; None where refused."""
    import numpy as np

    from aesthetic_dask.decode import TorchDecoder
    from aesthetic_dask.embed import ImageEmbedder

    embedder = ImageEmbedder(clip, 32, 10**9, decoder=decoder)
    if cpu_decode:
        embedder.decoder = TorchDecoder(clip.preprocess, 10**9, clip.tensor_preprocess, "cpu")
    rows = []
    for decoded, features in embedder.batches(images):
        feats = iter(features.float().cpu().numpy()) if features is not None else iter(())
        rows += [next(feats) if d.reason is None else np.full(clip.embed_dim, np.nan, np.float32) for d in decoded]
    return np.stack(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download the wheels and copy the heads, then exit")
    parser.add_argument("--quick", action="store_true", help="small inputs and a tiny model: a dry run of every step")
    parser.add_argument("--distinct", type=int, default=2048, help="distinct photos (default 2048)")
    parser.add_argument("--images", type=int, default=32000, help="images in the shards of the run (default 32000)")
    parser.add_argument("--deadline", type=float, default=420, help="seconds after which optional steps skip")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--steps", default="all",
                        help="comma-separated steps to run (default all): cosines,ceiling,decode,scores,run,run_pil")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (a partial re-check)")
    args = parser.parse_args()
    if args.fetch:
        fetch()
        return 0
    ensure_packages()
    if args.quick:
        args.distinct, args.images = min(args.distinct, 64), min(args.images, 256)
    check = Check(args.results, args.deadline)
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    check.name(device + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else ""))
    wanted = set(args.steps.split(",")) if args.steps != "all" else {"cosines", "ceiling", "decode", "scores", "run", "run_pil"}
    r = check.results
    r["device"] = device
    r["command"] = " ".join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]])
    from importlib import metadata

    r["versions"] = {}
    for pkg in ("torch", "torchvision", "cupy-cuda13x", "dask", "distributed", "dask-cuda", "open_clip_torch",
                "aesthetic-dask", "pillow", "numpy", "pyarrow"):
        try:
            r["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            r["versions"][pkg] = None
    r["cpu_cores"] = len(os.sched_getaffinity(0))
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check.log(f"device {device}, {r['cpu_cores']} cores, versions {r['versions']}")

    photos: list[bytes] = []
    with check.step("photos"):
        available_photos()
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            photos = pool.map(make_photo, range(args.distinct), chunksize=16)
        shards = write_shards(work / "shards", photos, args.images, 1000 if not args.quick else 128)
        r["inputs"] = {"distinct_photos": len(photos), "sample_photos": list(PHOTOS), "images_in_shards": args.images,
                       "shards": len(shards), "mean_jpeg_kib": round(sum(map(len, photos)) / len(photos) / 1024, 1)}
        check.log(f"{len(photos)} photos, {args.images} images in {len(shards)} shards")

    import open_clip

    model_name, model_config = "ViT-L-14-quickgelu", None
    if args.quick:
        model_config = work / "tiny-clip.json"
        model_config.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(str(model_config))
        model_name = "tiny-clip"
    ckpt = work / "clip-random.pt"
    cpu_model = None
    with check.step("checkpoint"):
        torch.manual_seed(0)
        cpu_model = open_clip.create_model(model_name).eval()
        torch.save(cpu_model.state_dict(), ckpt)
        r["model"] = {"name": model_name, "weights": "random (seed 0): the compute is the real model's"}

    from aesthetic_dask.embed import ClipModel, ClipSpec

    spec = ClipSpec(model_name, str(ckpt), str(model_config) if model_config else None, str(work / "cache"))
    clip, pil = None, np.empty((0, 0), np.float32)
    if wanted & {"cosines", "ceiling", "decode"}:
        with check.step("load"):
            clip = ClipModel(spec)
            r["model"]["compute"] = clip.compute

    cos = r["embedding_cosine_min"] = {}
    sample = photos[:64]
    if "cosines" in wanted:
        with check.step("cosine_cuda_fp16_vs_cpu_fp32"):
            preprocess = clip.preprocess
            from PIL import Image

            torch.set_num_threads(r["cpu_cores"])
            with torch.inference_mode():
                x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in sample])
                ref = torch.cat([cpu_model.encode_image(x[i:i + 16]) for i in range(0, len(x), 16)])
                ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
            got = embed_with(clip, sample, "pil")
            cos[f"{clip.compute}_vs_cpu_fp32"] = round(cosine_min(got, ref), 6)
            if clip.device == "cuda":
                cos["cuda_fp16_vs_cpu_fp32"] = cos[f"{clip.compute}_vs_cpu_fp32"]
    del cpu_model

    if "cosines" in wanted:
        with check.step("cosine_decoders"):
            pil = embed_with(clip, photos, "pil")
            torch_dec = embed_with(clip, photos, "torch")
            name = "nvjpeg_vs_pil" if clip.device == "cuda" else "torch_vs_pil"
            cos[name] = round(cosine_min(torch_dec, pil), 6)
            # By kind of JPEG (make_photo's pattern), so a failing kind shows itself.
            kinds = {"greyscale": lambda i: i % 16 == 7, "progressive": lambda i: i % 8 == 3 and i % 16 != 7,
                     "baseline_colour": lambda i: i % 8 != 3 and i % 16 != 7}
            r["embedding_cosine_min_by_kind"] = {
                f"{name}_{kind}": round(cosine_min(torch_dec[rows], pil[rows]), 6)
                for kind, test in kinds.items() if (rows := [i for i in range(len(photos)) if test(i)])}
            if clip.device == "cuda":
                cos["torch_cpu_vs_pil"] = round(cosine_min(embed_with(clip, photos, "torch", cpu_decode=True), pil), 6)
            check.log(f"cosines {cos}")

    if cuda:
        if "ceiling" in wanted:
            with check.step("model_ceiling"):
                # The job's own model object: fp16 weights on the GPU, as the run computes.
                ceiling = r["model_ceiling"] = {"weights": str(clip.dtype)}
                for batch in (32, 256):
                    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=clip.dtype)
                    n = max(8, 4096 // batch)
                    with torch.inference_mode():
                        for _ in range(3):
                            clip.model.encode_image(x)
                        torch.cuda.synchronize()

                        def run_batches(x=x, n=n):
                            for _ in range(n):
                                clip.model.encode_image(x)
                            torch.cuda.synchronize()

                        ceiling[f"batch{batch}"] = images_per_s(batch * n, run_batches)
                r["model_ceiling_images_per_s"] = ceiling["batch256"]
                check.log(f"ceiling {ceiling}")

    if "decode" in wanted:
        with check.step("decode"):
            from concurrent.futures import ThreadPoolExecutor

            from aesthetic_dask.decode import PilDecoder, TorchDecoder

            threads = r["cpu_cores"]
            dec = r["decode_images_per_s"] = {"threads": threads}
            pil_dec = PilDecoder(clip.preprocess, 10**9)
            cpu_dec = TorchDecoder(clip.preprocess, 10**9, clip.tensor_preprocess, "cpu")
            with ThreadPoolExecutor(threads) as pool:
                dec["pil"] = images_per_s(len(photos), lambda: list(pool.map(pil_dec.decode, photos)), repeat=2)
                dec["torch_cpu"] = images_per_s(len(photos), lambda: list(pool.map(cpu_dec.decode, photos)), repeat=2)
                if cuda:
                    gpu_dec = TorchDecoder(clip.preprocess, 10**9, clip.tensor_preprocess, "cuda")
                    for batch in (32, 256):
                        def nvjpeg(batch=batch):
                            headers = list(pool.map(gpu_dec.decode, photos))
                            for i in range(0, len(headers), batch):
                                gpu_dec.finish(headers[i:i + batch])
                            torch.cuda.synchronize()

                        dec[f"torch_nvjpeg_batch{batch}"] = images_per_s(len(photos), nvjpeg, repeat=2)
            check.log(f"decode {dec}")

    heads = [HEADS_DIR / h for h in HEADS if (HEADS_DIR / h).exists()] or [SHARED / h for h in HEADS if (SHARED / h).exists()]
    r["heads"] = [h.name for h in heads]
    if "scores" in wanted:
        with check.step("scores_cupy_vs_numpy"):
            import cupy
            import pyarrow as pa

            from aesthetic_dask.predictor import load_predictor
            from aesthetic_dask.score import score_arrow

            emb = np.random.default_rng(0).standard_normal((200_000, 768)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            emb = np.concatenate([pil[np.isfinite(pil).all(1)], emb]) if pil.shape[1] == 768 else emb
            chunks = [pa.FixedSizeListArray.from_arrays(pa.array(emb[i:i + 65536].reshape(-1)), 768)
                      for i in range(0, len(emb), 65536)]
            diffs = {}
            for h in heads:
                predictor = load_predictor(str(h), work / "models")
                on_cpu = score_arrow(chunks, predictor, xp=np)[0]
                on_gpu = score_arrow(chunks, predictor, xp=cupy)[0]
                diffs[h.name] = float(np.abs(on_cpu - on_gpu).max())
            r["score_max_abs_diff_cupy_vs_numpy"] = max(diffs.values())
            r["score_max_abs_diff_by_head"] = diffs
            check.log(f"score diffs {diffs}")

    clip = None  # the run's worker loads its own model
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if "run" in wanted:
        with check.step("run"):
            r["run"] = run_job(check, work, shards, spec, heads, "default", [])
            r["run_images_per_s"] = r["run"]["images_per_s"]
            r["tasks_per_gpu_observed"] = r["run"]["tasks_at_once_max"]
            if "model_ceiling_images_per_s" in r:
                r["run_vs_ceiling"] = round(r["run_images_per_s"] / r["model_ceiling_images_per_s"], 3)
                r["run_steady_vs_ceiling"] = round(r["run"]["steady_images_per_s"] / r["model_ceiling_images_per_s"], 3)
    n_pil = max(1, len(shards) // 4)
    if "run_pil" in wanted:
        with check.step("run_pil_decoder", optional_s=90) as go:
            if go:
                r["run_pil"] = run_job(check, work, shards[:n_pil], spec, heads, "pil", ["--image-decoder", "pil"])
    check.log(f"done: {json.dumps({k: r.get(k) for k in ('model_ceiling_images_per_s', 'run_images_per_s', 'tasks_per_gpu_observed')})}")
    check.save()
    return 0


def run_job(check: Check, work: Path, shards: list[Path], spec, heads: list[Path], label: str, extra: list[str]) -> dict:
    """The whole `aesthetic-dask run` CLI over ``shards`` with the defaults; what it did, from its manifest and records."""
    out = work / f"out-{label}"
    cmd = [sys.executable, "-m", "aesthetic_dask", "run", *map(str, shards), "-o", str(out), "--clip-model", spec.model,
           "--clip-pretrained", spec.pretrained, "--model-dir", str(work / "models"), *extra]
    if spec.model_config:
        cmd += ["--clip-model-config", spec.model_config]
    if heads:
        cmd += ["--aesthetic-weights", str(heads[0])]
    t, started = time.perf_counter(), time.time()
    # In the work directory: the repository's own aesthetic_dask/ must not shadow the installed package.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t
    check.log(f"run {label}: exit {proc.returncode} in {wall:.1f}s\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("*.json"))]
    spans = sorted((rec["finished_at"] - rec["seconds"], rec["finished_at"]) for rec in records)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    at_once = most = 0
    for _, delta in events:
        at_once += delta
        most = max(most, at_once)
    rows = manifest["totals"]["rows_in"]
    steady = (spans[-1][1] - spans[0][0]) if spans else float("nan")
    stages = {}
    for rec in records:
        for k, v in rec.get("stage_s", {}).items():
            stages[k] = round(stages.get(k, 0) + v, 2)
    return {
        "exit_code": proc.returncode,
        "images": rows,
        "wall_s": round(wall, 1),
        "images_per_s": round(rows / wall, 1),
        "steady_images_per_s": round(rows / steady, 1),
        "first_partition_started_after_s": round(spans[0][0] - started, 1) if spans else None,
        "tasks_at_once_max": most,
        "stage_s_summed_over_partitions": stages,
        "partition_seconds_summed": round(sum(rec["seconds"] for rec in records), 1),
        "settings": {k: manifest["settings"].get(k) for k in ("clip_compute", "image_decoder")},
        "decoders_used": sorted({rec.get("image_decoder") for rec in records}),
        "manifest_timings": manifest.get("timings"),
        "cluster": manifest.get("cluster"),
        "totals": manifest["totals"],
    }


if __name__ == "__main__":
    sys.exit(main())
