"""Benchmark: the whole `aesthetic-dask run` command against a bare open_clip loop.

    python benchmarks/bench_run.py                 # ViT-L/14 (random weights) + tiny-model decode run
    python benchmarks/bench_run.py --skip-vit      # only the tiny-model part

Part 1 (decode-bound): a tiny open_clip model over many photos. Prints images/s per core for
each decoder (pil, torch), the whole command, and what the report's samples and thumbnails cost.
(How well the decode pool feeds the model is `benchmarks/bench_feed.py`.)

Part 2 (model-bound): 2 WebDataset shards of real photos (scikit-image samples). The whole `run`
command, with each decoder, is timed against a bare loop, all in fresh processes with the model
load included: create_model_and_transforms, preprocess, encode_image in batches of 8. The
weights are a random ViT-L-14-quickgelu checkpoint passed with --clip-pretrained PATH; the
compute is the real one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import REAL_WEIGHTS, make_shards, random_predictor, tiny_clip

BARE_LOOP = """
import io, sys, tarfile, time, torch, open_clip
from PIL import Image
model, _, preprocess = open_clip.create_model_and_transforms(sys.argv[1], pretrained=sys.argv[2])
model.eval()
images = []
for shard in sys.argv[3:]:
    with tarfile.open(shard) as tar:
        images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
with torch.no_grad():
    for start in range(0, len(images), 8):
        x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images[start:start + 8]])
        f = model.encode_image(x)
        f = f / f.norm(dim=-1, keepdim=True)
print(len(images))
"""


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def vit_part(work: Path, data: Path, per_shard: int, repeat: int) -> None:
    import open_clip
    import torch

    ckpt = data / "vit-l-14-quickgelu-random.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-L-14-quickgelu").state_dict(), ckpt)
    shards = make_shards(data / f"photos-2x{per_shard}", 2, per_shard)
    n = 2 * per_shard
    bare = [sys.executable, "-c", BARE_LOOP, "ViT-L-14-quickgelu", str(ckpt), *map(str, shards)]
    ours = [sys.executable, "-m", "aesthetic_dask", "run", *map(str, shards), "-o", str(work / "out-vit"), "--overwrite",
            "--clip-pretrained", str(ckpt), "--batch-size", "8", "--threshold", "0", "--model-dir", str(work / "models")]
    ours += ["--aesthetic-weights", str(REAL_WEIGHTS if REAL_WEIGHTS.exists() else random_predictor(work))]
    times: dict[str, list[float]] = {"bare": [], "torch": [], "pil": []}
    for _ in range(repeat):  # alternated, best of N: the machine is noisy
        times["bare"].append(timed(bare))
        times["torch"].append(timed(ours + ["--image-decoder", "torch"]))
        times["pil"].append(timed(ours + ["--image-decoder", "pil"]))
    t = {k: min(v) for k, v in times.items()}
    print(f"ViT-L/14 fp32 on CPU, {n} photos in 2 shards, model load included, best of {repeat}:")
    print(f"  bare open_clip loop (batch 8)               {t['bare']:7.1f}s  {n / t['bare']:6.2f} img/s")
    print(f"  aesthetic-dask run, torch decoder (auto)    {t['torch']:7.1f}s  {n / t['torch']:6.2f} img/s")
    print(f"  aesthetic-dask run, pil decoder             {t['pil']:7.1f}s  {n / t['pil']:6.2f} img/s")
    print(f"  RATIO run (torch) throughput / bare = {t['bare'] / t['torch']:.2f}  (target >= 1.1)")
    print(f"  RATIO run (pil) throughput / bare   = {t['bare'] / t['pil']:.2f}")


def tiny_part(work: Path, data: Path, per_shard: int) -> None:
    import torch

    from aesthetic_dask.models.clip import ClipSpec
    from aesthetic_dask.pipeline.decode import PilDecoder, TorchDecoder
    from aesthetic_dask.pipeline.encoder import input_spec

    config, ckpt = tiny_clip(work, image_size=224, layers=4, width=256, patch=16)
    shards = make_shards(data / f"photos-4x{per_shard}", 4, per_shard)
    images = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    spec = input_spec(ClipSpec("tiny-clip", str(ckpt), str(config), str(work / "models")))
    cores = os.cpu_count() or 1
    n = len(images)
    torch.set_num_threads(1)  # as in a host process of the decode pool
    print(f"tiny CLIP (224px, 4 layers, width 256), {n} photos in 4 shards, {cores} cores:")
    for decoder in (PilDecoder(spec, 10**9), TorchDecoder(spec, 10**9)):
        t0 = time.process_time()
        for data_ in images:
            assert decoder.decode(data_).reason is None
        t_one = time.process_time() - t0
        print(f"  {decoder.name:5s} header + decode + crop, one core: {n / t_one:6.1f} img/s ({1000 * t_one / n:.2f} CPU ms each)")
    torch.set_num_threads(cores)

    ours = [sys.executable, "-m", "aesthetic_dask", "run", *map(str, shards), "-o", str(work / "out-tiny"), "--overwrite",
            "--clip-model-config", str(config), "--clip-pretrained", str(ckpt), "--threshold", "0",
            "--aesthetic-weights", str(random_predictor(work)), "--model-dir", str(work / "models")]
    (work / "no-report.yaml").write_text("report: false\n")
    (work / "nothing.yaml").write_text("report: false\nreport_samples: false\n")
    with_samples = ours + ["--config", str(work / "no-report.yaml")]
    without = ours + ["--config", str(work / "nothing.yaml")]
    timed(with_samples), timed(without)
    cmd_t, samples_t, bare_t = [], [], []
    for _ in range(3):  # alternated, best of 3
        cmd_t.append(timed(ours))
        samples_t.append(timed(with_samples))
        bare_t.append(timed(without))
    t_cmd = min(cmd_t)
    print(f"  whole `run` command                 {t_cmd:6.2f}s  ({n / t_cmd:7.1f} img/s incl. start-up; best of 3)")
    print(f"  samples and thumbnails cost {(min(samples_t) - min(bare_t)) / min(samples_t) * 100:+.1f}% of the job "
          f"({min(samples_t):.2f}s vs {min(bare_t):.2f}s without; target < 3%); the report page "
          f"{(t_cmd - min(samples_t)) / t_cmd * 100:+.1f}% (fixed per job)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-shard", type=int, default=8, help="photos per shard for the ViT-L/14 part")
    parser.add_argument("--tiny-per-shard", type=int, default=100)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each ViT-L/14 command (best of N)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "aesthetic-dask-bench")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aesthetic-dask-bench-run-"))
    tiny_part(work, args.data, args.tiny_per_shard)
    if not args.skip_vit:
        vit_part(work, args.data, args.per_shard, args.repeat)


if __name__ == "__main__":
    main()
