"""The decode pool (issue 17): host processes read shards themselves, hand crops back through shared
memory, and lose nothing when one dies; they never outlive their parent."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from aesthetic_dask.pipeline import pool as pool_module
from aesthetic_dask.pipeline.host import BytesImages, DecodeSettings
from aesthetic_dask.sources.shards import ShardImages
from aesthetic_dask.pipeline.pool import HostPool, PoolError
from aesthetic_dask.pipeline.preprocess import InputSpec
from conftest import photo_bytes, write_shard

SPEC = InputSpec((32, 32), "RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", "shortest", 0)
SETTINGS = DecodeSettings("torch", SPEC, 10**8)


@pytest.fixture
def pool():
    p = HostPool(1)
    yield p
    p.close()


def test_a_shard_comes_back_whole_and_in_order(tmp_path, pool):
    photos = [photo_bytes(n) for n in ("astronaut", "coffee", "chelsea")]
    members = [(f"s{i:02d}.jpg", photos[i % 3]) for i in range(7)] + [("s07.jpg", b"not an image"), ("s08.txt", b"no image")]
    write_shard(tmp_path / "a.tar", members)
    handle = pool.submit(ShardImages(str(tmp_path / "a.tar"), 65536), SETTINGS, 2)
    keys, reasons, crops = [], [], 0
    for chunk in handle:
        keys += [m.key for m in chunk.metas]
        reasons += chunk.reasons
        if chunk.crops is not None:
            assert chunk.crops.shape[1:] == SPEC.crop_shape and chunk.crops.dtype == np.uint8
            crops += len(chunk.crops)
        chunk.release()
    assert handle.failure is None
    assert keys == [f"s{i:02d}" for i in range(9)]
    assert reasons[:7] == [None] * 7 and reasons[7].startswith("not a JPEG") and reasons[8] == "no image"
    assert crops == 7


def test_a_killed_decode_process_is_replaced_and_its_samples_get_a_reason(tmp_path, pool):
    """With crops not released, the process fills its slots, then holds one more chunk: killed
    there, exactly that chunk gets the reason, and the job goes on in the replacement."""
    photo = photo_bytes("coffee")
    write_shard(tmp_path / "b.tar", [(f"k{i:02d}.jpg", photo) for i in range(14)])
    handle = pool.submit(ShardImages(str(tmp_path / "b.tar"), 65536), SETTINGS, 2)
    events = iter(handle)
    first = [next(events) for _ in range(pool_module.SLOTS)]  # every slot filled, none released
    state = pool.seats[0].state
    deadline = time.time() + 60
    while state.held is None and time.time() < deadline:  # the next chunk, read and being decoded
        time.sleep(0.01)
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    rest = list(events)
    for chunk in first + rest:
        chunk.release()
    reasons = [r for chunk in first + rest for r in chunk.reasons]
    keys = [m.key for chunk in first + rest for m in chunk.metas]
    assert keys == [f"k{i:02d}" for i in range(14)]  # every sample accounted for, in order
    died = [k for k, r in zip(keys, reasons) if r]
    assert died == ["k06", "k07"], reasons
    assert reasons[6] == "decode process died (signal SIGKILL) while decoding this sample"
    assert handle.failure is None and pool.deaths == 1 and pool.pids[0] != victim


def test_bytes_from_memory_and_a_pool_that_is_reused(pool):
    images = [photo_bytes("rocket"), None, b"", photo_bytes("camera", "PNG")]
    for _ in range(2):
        handle = pool.submit(BytesImages(images), SETTINGS, 2)
        chunks = list(handle)
        reasons = [r for c in chunks for r in c.reasons]
        assert reasons == [None, "no image", "empty image file", None]
        for c in chunks:
            c.release()


def test_no_shared_memory_is_one_clear_line(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pool_module.os, "posix_fallocate", no_space)
    with pytest.raises(PoolError) as info:
        HostPool(1)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "--shm-size" in message


# How users start Python: the pool must start in each (issue 27). Each script decodes one photo
# through a fresh pool and prints the reasons; nothing may import the script itself.
POOL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from aesthetic_dask.pipeline.host import BytesImages, DecodeSettings
from aesthetic_dask.pipeline.pool import HostPool
from aesthetic_dask.pipeline.preprocess import InputSpec
from conftest import photo_bytes

def decode():
    spec = InputSpec((32, 32), "RGB", (0.5,) * 3, (0.25,) * 3, "bicubic", "shortest", 0)
    pool = HostPool(1)
    handle = pool.submit(BytesImages([photo_bytes("rocket"), b"junk"]), DecodeSettings("torch", spec, 10**8), 2)
    reasons = [r for chunk in handle for r in chunk.reasons]
    pool.close()
    return reasons
"""


def _script(body: str) -> str:
    return POOL_SCRIPT.format(tests=os.path.dirname(__file__)) + textwrap.dedent(body)


@pytest.mark.parametrize("how", ["stdin", "-c", "unguarded script"])
def test_the_pool_starts_from_any_main_module(tmp_path, how):
    """``python -``, ``python -c`` and a script without ``if __name__ == "__main__":`` (an editor's
    "run selection"): the pool's processes never import the main module."""
    code = _script("""
        import os
        print("REASONS", decode())
        if not os.environ.get("REIMPORTED"):
            os.environ["REIMPORTED"] = "1"  # a child importing this module would say so twice
    """)
    if how == "stdin":
        result = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    elif how == "-c":
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    else:
        (tmp_path / "job.py").write_text(code)
        result = subprocess.run([sys.executable, str(tmp_path / "job.py")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("REASONS")]
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("REASONS [None, 'not a") and "Traceback" not in result.stderr


def test_the_pool_starts_in_a_daemonic_process(tmp_path):
    """A Dask worker is a daemonic process with Dask's defaults: multiprocessing forbids it
    children; the pool's launcher is not a multiprocessing child."""
    code = _script("""
        import multiprocessing

        def child(queue):
            queue.put((multiprocessing.current_process().daemon, decode()))

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            process = ctx.Process(target=child, args=(queue,), daemon=True)
            process.start()
            print("RESULT", queue.get(timeout=240))
            process.join()
    """)
    (tmp_path / "daemonic.py").write_text(code)
    result = subprocess.run([sys.executable, str(tmp_path / "daemonic.py")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RESULT (True, [None, 'not a" in result.stdout, result.stdout + result.stderr


def test_pool_processes_never_outlive_their_parent(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from aesthetic_dask.pipeline.pool import HostPool
        pool = HostPool(2)
        assert pool.wait_ready(120)
        print(pool.launcher.pid, *pool.pids, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 3 and all(_alive(p) for p in pids)  # the launcher and its two processes
    parent.kill()  # SIGKILL: no atexit, no cleanup
    parent.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_decode_processes_do_not_inherit_the_nannys_allocator_setting(monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers; decoding under it page-faults
    every image's buffers again (issue 28). The launcher's environment goes without it."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    pool = HostPool(1)
    try:
        assert pool.wait_ready(120)
        with open(f"/proc/{pool.pids[0]}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert b"MALLOC_TRIM_THRESHOLD_" not in env
        with open(f"/proc/{pool.launcher.pid}/environ", "rb") as f:
            assert b"MALLOC_TRIM_THRESHOLD_" not in f.read()
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_decode_process_killed_mid_job_loses_no_sample(tmp_path, tiny_clip, tiny_weights):
    """The whole job, with a decode process SIGKILLed while it holds a shard: exit 0, every sample
    counted (kept, or an error row saying why), and a re-run redoes nothing."""
    import json
    import threading

    from aesthetic_dask.cli import main

    photos = [photo_bytes(n) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    for s in range(4):
        write_shard(tmp_path / "in" / f"s{s}.tar", [(f"s{s}_{i:03d}.jpg", photos[i % 4]) for i in range(40)])
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            p = pool_module._POOL
            busy = [seat for seat in (p.seats if p and not p.closed else []) if seat.state and seat.state.delivered]
            if busy and busy[0].pid:
                os.kill(busy[0].pid, signal.SIGKILL)
                killed.append(busy[0].pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = tmp_path / "out"
    args = ["run", str(tmp_path / "in"), "-o", str(out), "--clip-model-config", str(tiny_clip["config"]),
            "--clip-pretrained", str(tiny_clip["checkpoint"]), "--aesthetic-weights", str(tiny_weights["safetensors"]),
            "--model-dir", str(tmp_path / "models"), "--threshold", "0", "--batch-size", "4", "--no-report"]
    assert main(args) == 0
    thread.join()
    assert killed, "no decode process was busy to kill"
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    assert t["rows_in"] == 160 and t["rows_kept"] + t["rows_error"] == 160 and t["rows_unknown_partitions"] == 0
    assert set(m["error_reasons"]) <= {"decode process died (signal SIGKILL) while decoding this sample"}
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["this_run"]["partitions_processed"] == 0
