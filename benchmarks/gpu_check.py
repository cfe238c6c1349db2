"""GPU check (issues 11, 17): the GPU path measured on a real GPU, in one command.

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

- ``model_ceiling_images_per_s``: the bare fp16 image tower on ready tensors, batch 256 (and 32,
  the job's default), eager; ``model_ceiling_compiled_images_per_s`` with ``torch.compile``, and
  the compiled tower's embeddings against eager (cosine);
- ``decode_images_per_s``: each host decoder alone (pil, torch), one process per core;
- ``embedding_cosine_min``: CUDA fp16 through the pool and encoder against open_clip's own CPU
  fp32 (same images), torch against pil (both through the pool);
- ``score_max_abs_diff_cupy_vs_numpy``: the score stage on cupy against numpy, the linear (folded)
  and ReLU (layered) heads;
- ``run_images_per_s``: the whole ``aesthetic-dask run`` over >= 200,000 images (the distinct
  shards hard-linked under more names) through LocalCUDACluster with the defaults (compile auto),
  fixed costs included; ``steady_images_per_s`` from the partition records; ``fixed_s`` (command
  start to first batch, and after the last partition); GPU utilisation sampled through NVML
  (``nvidia-smi``) and the host pool's processes and CPU use sampled during the run; the same
  run kernel by kernel (``clip_compile: false``, ``clip_cuda_graph: false``) where time is left;
- ``cuda_graph``, ``launch_cpu_ms_per_image``: whether the run's encoder replayed its step as one
  CUDA graph, and the CPU ms per image its thread spent launching batches (issue 28: the model's
  process at <= 0.15 with the rest);

- ``score_max_abs_diff_fp16_vs_fp32``: the real default head's scores of the same crops through the
  tower in the precision the job uses (fp16 or bf16 matrix products, fp32 LayerNorm) against fp32
  (on a CPU dry run, fp16 as torch emulates it);
- ``first_batch_after_s``: from the command's start to the first batch on the model.

It cannot waste the device's minutes: the heads are found (``$AESTHETIC_WEIGHTS``, a file or a
folder, then ``.gpu/``, then ``../shared``) and checked before any device work (none: one line,
exit 2, in seconds); every step is bounded by ``--deadline`` (a run that reaches it is stopped
cleanly and reports the steady rate so far); one compiled shape serves the ceiling and the
cosine; every key is written (null where a step did not run); the last line is a one-line
summary. Results go to ``--results`` (default ``$OUT`` where it is set, as on the device machine,
whose ``$OUT`` comes back; else benchmarks/results): gpu-<yyyymmdd>-<device>.json and .log.
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
    "psutil==7.1.3",
)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "horse", "moon", "page")
# Every key a device run writes; a dry run (or a step that did not run) writes them as null.
RESULT_KEYS = (
    "device", "command", "versions", "cpu_cores", "inputs", "model", "heads", "embedding_cosine_min",
    "model_ceiling", "model_ceiling_images_per_s", "model_ceiling_compiled_images_per_s", "compiled_vs_eager_cosine_min",
    "decode_images_per_s", "score_max_abs_diff_cupy_vs_numpy", "score_max_abs_diff_by_head",
    "score_max_abs_diff_fp16_vs_fp32", "precision", "run", "images", "run_images_per_s", "steady_images_per_s", "fixed_s",
    "first_batch_after_s", "cuda_graph", "launch_cpu_ms_per_image", "run_vs_ceiling", "run_steady_vs_ceiling", "run_eager", "summary",
)
# Rough seconds each optional step needs on an H100 (the run takes what is left, less a margin).
STEP_S = {"cosines": 60, "ceiling": 90, "decode": 40, "scores": 30, "precision": 40, "run_eager": 150}
RUN_MARGIN_S = 45  # left after the run for its clean stop and the rest
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

def find_heads() -> list[Path]:
    """The real predictor heads: ``$AESTHETIC_WEIGHTS`` (a file or a folder of them), else the
    carried ``.gpu/``, else ``../shared``. The default head comes first."""
    given = os.environ.get("AESTHETIC_WEIGHTS")
    if given:
        where = Path(given)
        if where.is_file():
            return [where]
        return [where / h for h in HEADS if (where / h).is_file()]
    for folder in (HEADS_DIR, SHARED):
        found = [folder / h for h in HEADS if (folder / h).is_file()]
        if found:
            return found
    return []


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

    def fits(self, name: str, needs_s: float) -> bool:
        """Whether a step needing ``needs_s`` fits in what is left of the deadline (else recorded as skipped)."""
        if self.left() >= needs_s:
            return True
        self.results["errors"][name] = f"skipped: {self.left():.0f}s left of the deadline, the step needs ~{needs_s:.0f}s"
        self.log(f"skip {name}")
        return False

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


def embed_with(spec, images: list[bytes], decoder: str, compile_mode: str = "false"):
    """Embeddings (host, in order) of ``images`` through the job's own pool and encoder; NaN where refused."""
    import numpy as np

    from aesthetic_dask.pipeline.host import BytesImages
    from aesthetic_dask.pipeline.stage import EmbedOptions, embed_source

    result = embed_source(BytesImages(images), spec, EmbedOptions(32, 10**9, decoder, compile=compile_mode))
    matrix = result.embeddings.values.to_numpy(zero_copy_only=False).reshape(len(images), -1).copy()
    matrix[[r is not None for r in result.reasons.to_pylist()]] = np.nan
    return matrix


def decode_rate(args: tuple) -> int:
    """One process's share of the decode-alone measurement: decode ``photos`` with ``decoder``."""
    decoder_name, spec, photos = args
    import torch

    from aesthetic_dask.pipeline.decode import make_decoder

    torch.set_num_threads(1)
    decoder = make_decoder(decoder_name, spec, 10**9)
    for data in photos:
        decoder.decode(data)
    return len(photos)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download the wheels and copy the heads, then exit")
    parser.add_argument("--quick", action="store_true", help="small inputs and a tiny model: a dry run of every step")
    parser.add_argument("--distinct", type=int, default=2048, help="distinct photos (default 2048)")
    parser.add_argument("--images", type=int, default=200_000, help="images in the run (default 200,000)")
    parser.add_argument("--distinct-images", type=int, default=32_000,
                        help="images in distinct shards; the rest are hard links under other names (default 32,000)")
    parser.add_argument("--deadline", type=float, default=480,
                        help="seconds the whole check may take: steps that would pass it skip, the run stops at it")
    parser.add_argument("--results", type=Path,
                        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results",
                        help="where the JSON and log go (default $OUT where set, else benchmarks/results)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--steps", default="all",
                        help="comma-separated steps to run (default all): cosines,ceiling,decode,scores,run,run_eager")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (a partial re-check)")
    args = parser.parse_args()
    if args.fetch:
        fetch()
        return 0
    heads = find_heads()
    if not heads:  # before any device work: a run without heads would be minutes lost
        print(f"gpu_check: no predictor heads: set AESTHETIC_WEIGHTS to a head file or folder, or run "
              f"`python benchmarks/gpu_check.py --fetch` (copies them from {SHARED} into {HEADS_DIR})", file=sys.stderr)
        return 2
    ensure_packages()
    if args.quick:
        args.distinct, args.images, args.distinct_images = min(args.distinct, 64), min(args.images, 512), 256
    check = Check(args.results, args.deadline)
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    check.name(device + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else ""))
    wanted = set(args.steps.split(",")) if args.steps != "all" else {"cosines", "ceiling", "decode", "scores", "precision",
                                                                     "run", "run_eager"}
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
        per_shard = 1000 if not args.quick else 128
        distinct = write_shards(work / "shards", photos, min(args.images, args.distinct_images), per_shard)
        shards = list(distinct)
        while len(shards) * per_shard < args.images:  # more names for the same bytes: no 20 GB of tars
            link = work / "shards" / f"link-{len(shards):05d}.tar"
            os.link(distinct[len(shards) % len(distinct)], link)
            shards.append(link)
        r["inputs"] = {"distinct_photos": len(photos), "sample_photos": list(PHOTOS), "images_in_shards": len(shards) * per_shard,
                       "shards": len(shards), "distinct_shards": len(distinct),
                       "mean_jpeg_kib": round(sum(map(len, photos)) / len(photos) / 1024, 1)}
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

    from aesthetic_dask.models.clip import ClipSpec
    from aesthetic_dask.pipeline.encoder import ClipEncoder, input_spec

    spec = ClipSpec(model_name, str(ckpt), str(model_config) if model_config else None, str(work / "cache"))
    encoder, pil = None, np.empty((0, 0), np.float32)
    if wanted & {"cosines", "ceiling"}:
        with check.step("load"):
            encoder = ClipEncoder(spec, 32, "false")
            r["model"] |= {"compute": encoder.compute, "load_s": encoder.load_s}
            check.log(f"model loaded in {encoder.load_s}s (meta device, open_clip's load_checkpoint)")

    cos = r["embedding_cosine_min"] = {}
    sample = photos[:64]
    if "cosines" in wanted and check.fits("cosines", STEP_S["cosines"]):
        with check.step("cosine_device_vs_cpu_fp32"):
            from open_clip.transform import PreprocessCfg, image_transform_v2
            from PIL import Image

            preprocess = image_transform_v2(PreprocessCfg(**cpu_model.visual.preprocess_cfg), is_train=False)
            torch.set_num_threads(r["cpu_cores"])
            with torch.inference_mode():
                x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in sample])
                ref = torch.cat([cpu_model.encode_image(x[i:i + 16]) for i in range(0, len(x), 16)])
                ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
            got = embed_with(spec, sample, "pil")
            cos[f"{encoder.compute}_pool_vs_open_clip_cpu_fp32"] = round(cosine_min(got, ref), 6)
        with check.step("cosine_decoders"):
            pil = embed_with(spec, photos, "pil")
            torch_dec = embed_with(spec, photos, "torch")
            cos["torch_vs_pil"] = round(cosine_min(torch_dec, pil), 6)
            kinds = {"greyscale": lambda i: i % 16 == 7, "progressive": lambda i: i % 8 == 3 and i % 16 != 7,
                     "baseline_colour": lambda i: i % 8 != 3 and i % 16 != 7}
            r["embedding_cosine_min_by_kind"] = {
                f"torch_vs_pil_{kind}": round(cosine_min(torch_dec[rows], pil[rows]), 6)
                for kind, test in kinds.items() if (rows := [i for i in range(len(photos)) if test(i)])}
            check.log(f"cosines {cos}")
    del cpu_model

    if "ceiling" in wanted and check.fits("ceiling", STEP_S["ceiling"]):
        with check.step("model_ceiling"):
            # The job's own image tower: fp16 weights on the GPU, as the run computes.
            dev, dtype = encoder.device, encoder.dtype
            ceiling = r["model_ceiling"] = {"weights": str(dtype)}
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            # One compiled shape (batch 256) serves both its ceiling and its cosine: each shape compiles anew.
            compiled = torch.compile(encoder.visual, dynamic=False) if cuda else None
            for batch in (32, 256) if cuda else (8,):
                x = torch.randn(batch, 3, *encoder.input.size, device=dev, dtype=dtype)
                n = max(8, 4096 // batch) if cuda else 2
                for label, fn in (("eager", encoder.visual), ("compiled", compiled if batch == 256 else None)):
                    if fn is None:
                        continue
                    with torch.inference_mode():
                        for _ in range(3):
                            fn(x)
                        sync()

                        def run_batches(fn=fn, x=x, n=n):
                            for _ in range(n):
                                fn(x)
                            sync()

                        ceiling[f"{label}_batch{batch}"] = images_per_s(batch * n, run_batches)
            r["model_ceiling_images_per_s"] = ceiling.get("eager_batch256", ceiling.get("eager_batch8"))
            if compiled is not None:
                r["model_ceiling_compiled_images_per_s"] = ceiling["compiled_batch256"]
                with torch.inference_mode():
                    x = torch.randn(256, 3, *encoder.input.size, device=dev, dtype=dtype)
                    a, b = encoder.visual(x).float(), compiled(x).float()
                r["compiled_vs_eager_cosine_min"] = round(cosine_min(a.cpu().numpy(), b.cpu().numpy()), 6)
            check.log(f"ceiling {ceiling}")
    encoder = None

    if "decode" in wanted and check.fits("decode", STEP_S["decode"]):
        with check.step("decode"):
            procs = r["cpu_cores"]
            dec = r["decode_images_per_s"] = {"processes": procs}
            in_spec = input_spec(spec)
            for name in ("pil", "torch"):
                share = [(name, in_spec, photos[i::procs]) for i in range(procs)]
                with Pool(procs) as pool:
                    pool.map(decode_rate, [(name, in_spec, photos[:2])] * procs)  # imports, once
                    dec[name] = images_per_s(len(photos), lambda: pool.map(decode_rate, share), repeat=2)
            check.log(f"decode {dec}")

    r["heads"] = [h.name for h in heads]
    if "scores" in wanted and not cuda:
        r["errors"]["scores_cupy_vs_numpy"] = "skipped: no CUDA device (cupy computes on one)"
    elif "scores" in wanted and check.fits("scores", STEP_S["scores"]):
        with check.step("scores_cupy_vs_numpy"):
            import cupy
            import pyarrow as pa

            from aesthetic_dask.models.load import load_predictor
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

    if "precision" in wanted and check.fits("precision", STEP_S["precision"]):
        with check.step("precision"):
            r["precision"] = precision_error(spec, photos[:256], heads[0], work, "cuda" if cuda else "cpu")
            r["score_max_abs_diff_fp16_vs_fp32"] = r["precision"]["score_max_abs_diff"]
            check.log(f"precision {r['precision']}")

    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if "run" in wanted:
        with check.step("run"):
            budget = check.left() - RUN_MARGIN_S - (STEP_S["run_eager"] if "run_eager" in wanted and not args.quick else 0)
            r["run"] = run_job(check, work, shards, spec, heads, "default", [], max(60.0, budget))
            for key in ("images", "steady_images_per_s", "fixed_s", "first_batch_after_s", "cuda_graph",
                        "launch_cpu_ms_per_image"):
                r[key] = r["run"][key]
            r["run_images_per_s"] = r["run"]["images_per_s"]
            if "model_ceiling_images_per_s" in r:
                r["run_vs_ceiling"] = round(r["run_images_per_s"] / r["model_ceiling_images_per_s"], 3)
                r["run_steady_vs_ceiling"] = round(r["steady_images_per_s"] / r["model_ceiling_images_per_s"], 3)
    if "run_eager" in wanted:
        with check.step("run_eager", optional_s=STEP_S["run_eager"]) as go:
            if go:
                eager = work / "eager.yaml"
                eager.write_text("clip_compile: false\nclip_cuda_graph: false\n")  # kernel by kernel
                r["run_eager"] = run_job(check, work, shards, spec, heads, "eager", ["--config", str(eager)],
                                         max(30.0, check.left() - 15))
    for key in RESULT_KEYS:
        r.setdefault(key, None)
    r["summary"] = summary_line(r)
    check.log(r["summary"])
    check.save()
    return 0


def summary_line(r: dict) -> str:
    """The check in one line: what a reader of the log needs first."""
    def show(key: str, fmt: str = "{:,.0f}") -> str:
        value = r.get(key)
        return "n/a" if value is None else fmt.format(value)

    return (f"gpu_check {r.get('device')}: ceiling {show('model_ceiling_images_per_s')} eager / "
            f"{show('model_ceiling_compiled_images_per_s')} compiled images/s; run {show('run_images_per_s')} "
            f"({show('steady_images_per_s')} steady, first batch after {show('first_batch_after_s', '{:.1f}')}s, "
            f"fixed {show('fixed_s', '{:.1f}')}s; CUDA graph {r.get('cuda_graph')}, launching "
            f"{show('launch_cpu_ms_per_image', '{:.3f}')} CPU ms per image); score error vs fp32 {show('score_max_abs_diff_fp16_vs_fp32', '{:.2g}')}; "
            f"{len(r.get('errors') or {})} step(s) failed or skipped")


def precision_error(spec, photos: list[bytes], head: Path, work: Path, device: str) -> dict:
    """The real head's scores of the same crops through the tower in the job's reduced precision
    (fp16 or bf16 products, fp32 LayerNorm; fp16 where the job computes in fp32, as on a CPU) and
    in fp32: the largest score difference and the smallest embedding cosine."""
    import copy

    import numpy as np
    import torch

    from aesthetic_dask.models.clip import compute_precision
    from aesthetic_dask.models.load import load_predictor
    from aesthetic_dask.pipeline.decode import make_decoder
    from aesthetic_dask.pipeline.encoder import load_image_tower, reduced_precision, torch_dtype
    from aesthetic_dask.pipeline.preprocess import InputSpec, Normalizer

    compute = compute_precision(spec.precision, device)
    reduced = compute.split("-")[1] if not compute.endswith("fp32") else "fp16"
    visual, cfg = load_image_tower(spec, device)
    model_input = InputSpec.of(cfg)
    decoder = make_decoder("pil", model_input, 10**9)
    crops = [d.crop for d in map(decoder.decode, photos) if d.reason is None]
    batch = torch.from_numpy(np.stack(crops)).to(device)
    features = {}
    with torch.inference_mode():
        for name, tower in (("fp32", visual), (reduced, reduced_precision(copy.deepcopy(visual), torch_dtype(reduced)))):
            normalize = Normalizer(model_input, device, torch_dtype(name))
            out = torch.cat([tower(normalize(batch[i:i + 32])).float() for i in range(0, len(batch), 32)])
            features[name] = (out / out.norm(dim=-1, keepdim=True)).cpu().numpy()
    predictor = load_predictor(str(head), work / "models")
    scores = {name: predictor.score_raw(f, np.einsum("ij,ij->i", f, f)) for name, f in features.items()}
    return {"compared": f"{device}-{reduced} vs {device}-fp32", "job_compute": compute, "head": head.name,
            "images": len(crops), "score_max_abs_diff": float(np.abs(scores["fp32"] - scores[reduced]).max()),
            "embedding_cosine_min": round(cosine_min(features["fp32"], features[reduced]), 7)}


class Sampler:
    """GPU utilisation (nvidia-smi, i.e. NVML) and the job's process tree (CPU use, processes) every 0.5 s."""

    def __init__(self) -> None:
        import threading

        self.gpu: list[float] = []
        self.cpu: list[float] = []
        self.processes: list[int] = []
        self.root: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        smi = shutil.which("nvidia-smi")
        tree = []
        while not self.stop.wait(0.5):
            if smi:
                out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout.split()
                if out:
                    self.gpu.append(float(out[0]))
            if psutil and self.root:
                try:
                    root = psutil.Process(self.root)
                    now = [root, *root.children(recursive=True)]
                    if {p.pid for p in now} != {p.pid for p in tree}:
                        tree = now
                        for p in tree:
                            p.cpu_percent(None)  # the first reading of a process is a baseline
                        continue
                    self.cpu.append(sum(p.cpu_percent(None) for p in tree) / 100)
                    self.processes.append(len(tree))
                except psutil.Error:
                    pass

    def summary(self) -> dict:
        def stats(xs):
            return {"mean": round(sum(xs) / len(xs), 1), "max": round(max(xs), 1), "samples": len(xs)} if xs else None

        return {"gpu_utilisation_percent": stats(self.gpu), "job_cores_busy": stats(self.cpu),
                "job_processes": stats(self.processes)}


def run_job(check: Check, work: Path, shards: list[Path], spec, heads: list[Path], label: str, extra: list[str],
            budget_s: float) -> dict:
    """The whole `aesthetic-dask run` CLI over ``shards`` with the defaults; what it did, from its
    manifest and records. At ``budget_s`` it is stopped cleanly (SIGTERM: the partitions done stay
    done) and the rates are those of the partitions finished by then."""
    out = work / f"out-{label}"
    cmd = [sys.executable, "-m", "aesthetic_dask", "run", *map(str, shards), "-o", str(out), "--clip-model", spec.model,
           "--clip-pretrained", spec.pretrained, "--model-dir", str(work / "models"), *extra]
    if spec.model_config:
        cmd += ["--clip-model-config", spec.model_config]
    if heads:
        cmd += ["--aesthetic-weights", str(heads[0])]
    t, started = time.perf_counter(), time.time()
    sampler = Sampler()
    sampler.thread.start()
    # In the work directory: the repository's own aesthetic_dask/ must not shadow the installed package.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
    sampler.root = proc.pid
    stopped = False
    try:
        _, stderr = proc.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.terminate()  # the job's clean stop: finished partitions stay, the manifest is written
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop.set()
    check.log(f"run {label}: exit {proc.returncode} in {wall:.1f}s{' (stopped at the deadline)' if stopped else ''}"
              f"\n{stderr[-3000:]}")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    records = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("*.json"))]
    spans = sorted((rec["finished_at"] - rec["seconds"], rec["finished_at"]) for rec in records)
    rows = sum(rec.get("rows_in") or 0 for rec in records)
    # Steady: between the end of the first tenth of the partitions and the last one's end.
    ends = sorted(b for _, b in spans)
    cut = ends[len(ends) // 10] if ends else None
    steady_rows = sum(rec["rows_in"] for rec in records if rec["finished_at"] > cut) if cut else 0
    steady = steady_rows / (ends[-1] - cut) if ends and ends[-1] > cut else float("nan")
    first_batch = min((rec.get("worker") or {}).get("first_batch_at") or float("inf") for rec in records) if records else None
    stages = {}
    for rec in records:
        for k, v in rec.get("stage_s", {}).items():
            stages[k] = round(stages.get(k, 0) + v, 2)
    worker = next((rec["worker"] for rec in records if rec.get("worker")), {})
    launches = [(rec["finished_at"], (rec.get("worker") or {})["launch_cpu_ms_per_image"]) for rec in records
                if (rec.get("worker") or {}).get("launch_cpu_ms_per_image") is not None]
    busy = (ends[-1] - spans[0][0]) if spans else 0
    return {
        "exit_code": proc.returncode,
        "stopped_at_deadline": stopped,
        "images": rows,
        "wall_s": round(wall, 1),
        "images_per_s": round(rows / wall, 1),
        "steady_images_per_s": round(steady, 1),
        "fixed_s": round(wall - busy, 1) if spans else None,
        "first_batch_after_s": round(first_batch - started, 1) if first_batch not in (None, float("inf")) else None,
        "model_load_s": worker.get("model_load_s"),
        "compiled": worker.get("compiled"),
        "cuda_graph": worker.get("cuda_graph"),
        # The model thread's CPU per image launching batches (the copy in, the forward, the copy out):
        # the model process's own cost on the device path (issue 28's goal: <= 0.15 ms with the rest).
        # A running figure: the last partition to finish has it over all the run's batches (null if none has).
        "launch_cpu_ms_per_image": max(launches)[1] if launches else None,
        "decode_processes": worker.get("decode_processes"),
        "decode_processes_replaced": max(((rec.get("worker") or {}).get("decode_processes_replaced") or 0 for rec in records), default=0),
        "sampled": sampler.summary(),
        "stage_s_summed_over_partitions": stages,
        "partition_seconds_summed": round(sum(rec["seconds"] for rec in records), 1),
        "settings": {k: manifest.get("settings", {}).get(k) for k in ("clip_compute", "image_decoder")},
        "manifest_timings": manifest.get("timings"),
        "cluster": manifest.get("cluster"),
        "totals": manifest.get("totals"),
    }


if __name__ == "__main__":
    sys.exit(main())
