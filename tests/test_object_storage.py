"""Object storage (issue 10) on a real S3 API: moto's server on 127.0.0.1, s3fs as the client."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_one_clear_line, photo_bytes, run_cli_process, write_embeddings, write_shard

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SECRET = "not-a-real-secret-7f3a"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server; yields (storage options, s3fs filesystem)."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": SECRET}
    fs = s3fs.S3FileSystem(**options)
    try:
        yield options, fs
    finally:
        server.stop()


@pytest.fixture
def bucket(s3, request):
    options, fs = s3
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


def cli(*argv, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "aesthetic_dask", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def no_aws_env() -> dict:
    """The environment without any AWS credentials: options must reach everything themselves."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def table(out: str, d: str, options=None) -> pd.DataFrame:
    if options:
        import s3fs

        s3fs.S3FileSystem(**options).invalidate_cache()  # fsspec reuses the instance: drop stale listings
    df = pd.read_parquet(f"{out}/{d}", storage_options=options)
    return df.sort_values(list(df.columns[:2])).reset_index(drop=True)


def manifest(out: str, fs=None) -> dict:
    if fs is not None:
        fs.invalidate_cache()
    return json.loads(fs.cat(out.removeprefix("s3://") + "/manifest.json") if fs else (Path(out) / "manifest.json").read_text())


def comparable(m: dict) -> tuple:
    strip = lambda inputs: {k.rsplit("/", 1)[-1]: v for k, v in inputs.items()}  # noqa: E731
    return m["totals"], strip(m["inputs"]), m["score_histogram"], m["status"]


@pytest.fixture
def embeddings(tmp_path, rng):
    for i in range(3):
        write_embeddings(tmp_path / "emb" / f"part-{i}.parquet", rng.standard_normal((300, 768)).astype(np.float32),
                         f"f{i}-", row_group_size=100, url=[f"https://example.com/{i}/{j}.jpg" for j in range(300)])
    return tmp_path / "emb"


def test_score_s3_to_s3_and_s3_to_local_equal_the_local_job(tmp_path, s3, bucket, embeddings, tiny_weights):
    options, fs = s3
    fs.put(str(embeddings), f"{bucket}/emb", recursive=True)
    common = ["--aesthetic-weights", tiny_weights["safetensors"], "--threshold", "5.4", "--keep-rejected",
              "--partition-rows", "100", "--storage-options", json.dumps(options)]
    local = cli("score", embeddings, "-o", tmp_path / "local", *common)
    to_s3 = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/out", *common, env=no_aws_env())
    to_local = cli("score", f"s3://{bucket}/emb/*.parquet", "-o", tmp_path / "fromS3", *common, env=no_aws_env())
    assert local.returncode == to_s3.returncode == to_local.returncode == 0, to_s3.stderr + to_local.stderr
    m_local, m_s3, m_mixed = manifest(str(tmp_path / "local")), manifest(f"s3://{bucket}/out", fs), manifest(str(tmp_path / "fromS3"))
    assert comparable(m_local) == comparable(m_s3) == comparable(m_mixed)
    assert all(k.startswith(f"s3://{bucket}/emb/") for k in m_s3["inputs"])  # the protocol is kept
    for d in ("kept", "rejected"):
        want = table(str(tmp_path / "local"), d).drop(columns=[])
        pd.testing.assert_frame_equal(table(f"s3://{bucket}/out", d, options), want)
        pd.testing.assert_frame_equal(table(str(tmp_path / "fromS3"), d), want)
    # Read back by pyarrow too, and the secret is nowhere in what the job wrote.
    import pyarrow.fs as pafs

    s3_pa = pafs.S3FileSystem(access_key="testing", secret_key=SECRET, endpoint_override=options["endpoint_url"],
                              scheme="http", region="us-east-1")
    assert pq.ParquetDataset(f"{bucket}/out/kept", filesystem=s3_pa).read().num_rows == m_s3["totals"]["rows_kept"]
    written = b"".join(fs.cat(p) for p in fs.find(f"{bucket}/out") if p.endswith((".json", ".log", ".html")))
    assert SECRET.encode() not in written and b"***" in fs.cat(f"{bucket}/out/manifest.json")
    assert not [p for p in fs.find(f"{bucket}/out") if "_tmp" in p or p.endswith(".tmp")]


@pytest.fixture
def shards(tmp_path):
    names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera")
    for s in range(3):
        members = []
        for i in range(8):
            members += [(f"{s}{i:03d}.jpg", photo_bytes(names[(s + i) % 6])), (f"{s}{i:03d}.txt", f"caption {s} {i}".encode())]
        members.append((f"{s}999.jpg", b"not an image"))
        write_shard(tmp_path / "shards" / f"shard-{s}.tar", members)
    return tmp_path / "shards"


def run_args(tiny_clip, tiny_weights, tmp_path, options):
    return ["--clip-model-config", tiny_clip["config"], "--clip-pretrained", tiny_clip["checkpoint"],
            "--aesthetic-weights", tiny_weights["safetensors"], "--model-dir", tmp_path / "models", "--threshold", "5.45",
            "--keep-rejected", "--storage-options", json.dumps(options)]


def test_run_s3_shards_to_s3_equals_the_local_job(tmp_path, s3, bucket, shards, tiny_clip, tiny_weights):
    options, fs = s3
    fs.put(str(shards), f"{bucket}/shards", recursive=True)
    args = run_args(tiny_clip, tiny_weights, tmp_path, options)
    local = cli("run", shards, "-o", tmp_path / "local", *args, "--write-shards", tmp_path / "ws")
    remote = cli("run", f"s3://{bucket}/shards", "-o", f"s3://{bucket}/out", *args, "--write-shards", f"s3://{bucket}/ws",
                 env=no_aws_env())
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert comparable(manifest(str(tmp_path / "local"))) == comparable(manifest(f"s3://{bucket}/out", fs))
    for d in ("kept", "rejected", "errors"):
        if not (tmp_path / "local" / d).exists():
            assert not fs.exists(f"{bucket}/out/{d}")
            continue
        a = table(str(tmp_path / "local"), d).drop(columns=["source"])
        b = table(f"s3://{bucket}/out", d, options)
        assert b["source"].str.startswith(f"s3://{bucket}/shards/").all()
        pd.testing.assert_frame_equal(b.drop(columns=["source"]), a)
    stems = lambda names: sorted(n.rsplit("-", 1)[0] for n in names)  # noqa: E731  (the digest is of the path)
    assert stems(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/ws")) == stems(p.name for p in (tmp_path / "ws").iterdir())
    assert fs.exists(f"{bucket}/out/report.html") and fs.exists(f"{bucket}/out/job.log")


def test_sigkill_on_s3_then_rerun_equals_a_clean_run(tmp_path, s3, bucket, tiny_clip, tiny_weights):
    options, fs = s3
    for s in range(10):
        write_shard(tmp_path / "many" / f"{s:03d}.tar", [(f"{s}{i}.jpg", photo_bytes(("coffee", "rocket")[i % 2])) for i in range(12)])
    fs.put(str(tmp_path / "many"), f"{bucket}/many", recursive=True)
    args = run_args(tiny_clip, tiny_weights, tmp_path, options)
    clean = cli("run", f"s3://{bucket}/many", "-o", f"s3://{bucket}/clean", *args)
    assert clean.returncode == 0, clean.stderr
    argv = [sys.executable, "-m", "aesthetic_dask", "run", f"s3://{bucket}/many", "-o", f"s3://{bucket}/killed", *map(str, args),
            "--threads-per-worker", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(fs.glob(f"{bucket}/killed/_parts/*.json", refresh=True)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {p: fs.info(p)["LastModified"] for p in fs.find(f"{bucket}/killed/kept", refresh=True)}
    # finished = marked done when killed; a kept file written just before the kill, without its marker, is redone
    marked_before = {q.rsplit("/", 1)[-1][:-5] for q in fs.find(f"{bucket}/killed/_parts", refresh=True)}
    assert len(fs.glob(f"{bucket}/killed/_parts/*.json", refresh=True)) < 10, "the job finished before it could be killed"
    for p in fs.find(f"{bucket}/killed/kept"):  # whatever is there reads whole
        pd.read_parquet(f"s3://{p}", storage_options=options)
    rerun = cli("run", f"s3://{bucket}/many", "-o", f"s3://{bucket}/killed", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert comparable(manifest(f"s3://{bucket}/killed", fs)) == comparable(manifest(f"s3://{bucket}/clean", fs))
    pd.testing.assert_frame_equal(table(f"s3://{bucket}/killed", "kept", options), table(f"s3://{bucket}/clean", "kept", options))
    m = manifest(f"s3://{bucket}/killed", fs)
    finished_before = [p for p in done_before if p.rsplit("/", 1)[-1][:-8] in marked_before]
    assert finished_before, "no partition was marked done before the kill"
    for p in finished_before:  # finished partitions untouched
        if m["this_run"]["partitions_skipped"] and fs.exists(p):
            assert fs.info(p, refresh=True)["LastModified"] == done_before[p]
    assert m["this_run"]["partitions_skipped"] >= 2
    import boto3

    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # no temporary objects left
    assert not [p for p in fs.find(f"{bucket}/killed") if "_tmp" in p]


def test_a_loopback_cluster_reads_and_writes_s3_with_the_options(tmp_path, s3, bucket, embeddings, tiny_weights):
    """`dask scheduler` + `dask worker` processes without AWS credentials in their environment."""
    options, fs = s3
    fs.put(str(embeddings), f"{bucket}/emb", recursive=True)
    from conftest import loopback_dask

    with loopback_dask(tmp_path, nthreads=2, env=no_aws_env()) as (scheduler_file, _, _):
        proc = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/out", "--aesthetic-weights", tiny_weights["safetensors"],
                   "--scheduler-file", scheduler_file, "--storage-options", json.dumps(options), "--partition-rows", "100",
                   env=no_aws_env())
    assert proc.returncode == 0, proc.stderr
    m = manifest(f"s3://{bucket}/out", fs)
    assert m["totals"]["rows_in"] == 900 and m["cluster"]["scheduler_address"].startswith("tcp://127.0.0.1")


def test_wrong_endpoint_missing_bucket_and_missing_filesystem_are_one_line_exit_2(tmp_path, s3, bucket, embeddings, tiny_weights):
    options, fs = s3
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    w = ["--aesthetic-weights", str(tiny_weights["safetensors"])]
    # Each call is bounded by run_cli_process's timeout: a client retrying a dead endpoint would hang past it.
    proc = run_cli_process(["score", f"s3://{bucket}/emb", "-o", str(tmp_path / "o"), *w, "--storage-options",
                            json.dumps(options | {"endpoint_url": dead})])
    assert_one_clear_line(proc, 2, f"input s3://{bucket}/emb: cannot reach the storage endpoint {dead}")
    # An endpoint that accepts connections and never answers (issue 29: it took 335 s): in seconds.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        for argv in (["score", f"s3://{bucket}/emb", "-o", str(tmp_path / "o")],
                     ["score", str(embeddings), "-o", f"s3://{bucket}/out"]):
            # (run_cli_process's timeout bounds it; the retries it replaced took minutes)
            proc = run_cli_process([*argv, *w, "--storage-options", json.dumps(options | {"endpoint_url": held})])
            assert_one_clear_line(proc, 2, f"the storage endpoint {held} accepts connections but did not answer within 10s")
    finally:
        silent.close()
    proc = run_cli_process(["score", str(embeddings), "-o", "s3://no-such-bucket-here/out", *w, "--storage-options", json.dumps(options)])
    assert_one_clear_line(proc, 2, "-o s3://no-such-bucket-here/out: the bucket 'no-such-bucket-here' does not exist")
    proc = run_cli_process(["score", "s3://no-such-bucket-here/emb", "-o", str(tmp_path / "o"), *w, "--storage-options", json.dumps(options)])
    assert_one_clear_line(proc, 2, "input s3://no-such-bucket-here/emb: no such file or directory")
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        proc = run_cli_process(["score", "gs://bucket/emb", "-o", str(tmp_path / "o"), *w])
        assert_one_clear_line(proc, 2, "gs://bucket/emb: no filesystem for gs:// is installed (pip install 'aesthetic-dask[gcs]')")


def test_a_grown_bucket_and_a_replaced_shard_on_s3(tmp_path, s3, bucket, shards, tiny_clip, tiny_weights):
    """Issue 18 on S3: new shards run alone, a shard replaced in place (a new ETag) is redone, and
    OUT equals a clean run over what the bucket holds now; a refilter re-splits it there."""
    options, fs = s3
    for s in (0, 1):
        fs.put(str(shards / f"shard-{s}.tar"), f"{bucket}/shards/shard-{s}.tar")
    args = run_args(tiny_clip, tiny_weights, tmp_path, options)
    first = cli("run", f"s3://{bucket}/shards", "-o", f"s3://{bucket}/out", *args, env=no_aws_env())
    assert first.returncode == 0, first.stderr
    fs.put(str(shards / "shard-2.tar"), f"{bucket}/shards/shard-2.tar")  # the bucket grew
    replaced = tmp_path / "replaced.tar"
    write_shard(replaced, [("r0.jpg", photo_bytes("camera")), ("r1.jpg", photo_bytes("coffee"))])
    fs.put(str(replaced), f"{bucket}/shards/shard-0.tar")  # and a shard was re-uploaded
    again = cli("run", f"s3://{bucket}/shards", "-o", f"s3://{bucket}/out", *args, env=no_aws_env())
    assert again.returncode == 0, again.stderr
    run = manifest(f"s3://{bucket}/out", fs)["this_run"]
    assert (run["partitions_new"], run["partitions_changed"], run["partitions_skipped"]) == (1, 1, 1)
    clean = cli("run", f"s3://{bucket}/shards", "-o", f"s3://{bucket}/clean", *args, env=no_aws_env())
    assert clean.returncode == 0, clean.stderr
    assert comparable(manifest(f"s3://{bucket}/out", fs)) == comparable(manifest(f"s3://{bucket}/clean", fs))
    pd.testing.assert_frame_equal(table(f"s3://{bucket}/out", "kept", options), table(f"s3://{bucket}/clean", "kept", options))
    up = cli("refilter", f"s3://{bucket}/out", "--threshold", "5.5", "--storage-options", json.dumps(options), env=no_aws_env())
    assert up.returncode == 0, up.stderr
    m = manifest(f"s3://{bucket}/out", fs)
    assert m["settings"]["score_threshold"] == 5.5 and m["status"] == "done"
    assert (table(f"s3://{bucket}/out", "kept", options)["aesthetic_score"] >= np.float32(5.5)).all()


def test_one_job_per_out_on_s3(tmp_path, s3, bucket, embeddings, tiny_weights):
    """The lease works on an object store: a live one refuses the job in one line; a silent one is
    taken over; and a foreign object in OUT is never touched."""
    options, fs = s3
    fs.put(str(embeddings), f"{bucket}/emb", recursive=True)
    common = ["--aesthetic-weights", tiny_weights["safetensors"], "--storage-options", json.dumps(options), "--no-report"]
    live = {"run_id": "other-run", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    fs.pipe(f"{bucket}/out/_lock.json", json.dumps(live).encode())
    busy = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/out", *common, env=no_aws_env())
    assert_one_clear_line(busy, 2, "is in use by another job (run other-run, pid 1 on elsewhere")
    fs.pipe(f"{bucket}/out/_lock.json", json.dumps(live | {"heartbeat": time.time() - 3600}).encode())
    done = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/out", *common, env=no_aws_env())
    assert done.returncode == 0, done.stderr
    assert manifest(f"s3://{bucket}/out", fs)["lock"]["took_over"]["run_id"] == "other-run"
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_lock.json")
    fs.pipe(f"{bucket}/mine/notes.txt", b"my notes")
    foreign = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/mine", *common, "--overwrite", env=no_aws_env())
    assert_one_clear_line(foreign, 2, "holds files no aesthetic-dask job wrote (notes.txt)")
    fs.invalidate_cache()
    assert fs.cat(f"{bucket}/mine/notes.txt") == b"my notes" and fs.ls(f"{bucket}/mine") == [f"{bucket}/mine/notes.txt"]


def test_an_upload_under_way_when_the_lease_is_lost_never_appears(s3, bucket):
    """The commit fence on an object store: the upload is discarded, not completed."""
    from test_lock import assert_a_write_spanning_the_loss_commits_nothing

    options, fs = s3
    assert_a_write_spanning_the_loss_commits_nothing(f"s3://{bucket}/out", fs, f"{bucket}/out", options)


def test_the_hubs_offline_switch_concerns_the_hub_only(tmp_path, s3, bucket, embeddings, tiny_weights):
    """HF_HUB_OFFLINE=1 must not make a reachable S3 endpoint "unreachable" (issue 21)."""
    options, fs = s3
    fs.put(str(embeddings), f"{bucket}/emb", recursive=True)
    proc = cli("score", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/out", "--aesthetic-weights", tiny_weights["safetensors"],
               "--storage-options", json.dumps(options), "--no-report", env=no_aws_env() | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_arrow_ipc_embeddings_on_s3_score_as_they_do_locally(tmp_path, s3, bucket, embeddings, tiny_weights):
    """The Arrow IPC input kind (issue 31) reads its files through fsspec like every kind: a Feather
    file and an IPC stream on S3 give what the same files give locally."""
    import pyarrow.feather as feather

    options, fs = s3
    arrow = tmp_path / "arrow"
    arrow.mkdir()
    rows = pq.read_table(embeddings / "part-0.parquet")
    feather.write_feather(rows, arrow / "a.feather", chunksize=64)
    with pa.ipc.new_stream(arrow / "b.arrow", rows.schema) as writer:
        for batch in rows.to_batches(max_chunksize=70):
            writer.write_batch(batch)
    fs.put(str(arrow), f"{bucket}/arrow", recursive=True)
    common = ["--aesthetic-weights", tiny_weights["safetensors"], "--threshold", "5.4", "--partition-rows", "100",
              "--storage-options", json.dumps(options), "--no-report"]
    local = cli("score", arrow, "-o", tmp_path / "local", *common)
    remote = cli("score", f"s3://{bucket}/arrow", "-o", tmp_path / "remote", *common, env=no_aws_env())
    assert local.returncode == remote.returncode == 0, remote.stderr
    m_local, m_remote = manifest(str(tmp_path / "local")), manifest(str(tmp_path / "remote"))
    assert comparable(m_local) == comparable(m_remote) and m_remote["totals"]["rows_in"] == 600
    pd.testing.assert_frame_equal(table(str(tmp_path / "remote"), "kept"), table(str(tmp_path / "local"), "kept"))


@pytest.fixture
def stoppable_s3():
    """A moto S3 server in its own process, so a test can stall it (SIGSTOP: connections are still
    accepted by the kernel, nothing answers) and let it go on (SIGCONT)."""
    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": SECRET}
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("stall")
    try:
        yield options, fs, server
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()


def stall_after_two_partitions(server, argv, records):
    """Run the job (requests bounded to 2 tries of 1 s), stop the store once ``records()`` says two
    partitions finished, and wait for the job: (process, stderr, seconds from the stall to the end)."""
    proc = subprocess.Popen([sys.executable, "-m", "aesthetic_dask", *map(str, argv), "--storage-timeout", "1",
                             "--storage-attempts", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and records() < 2 and proc.poll() is None:
        time.sleep(0.02)
    server.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=240)
        return proc, stderr, time.monotonic() - stopped
    finally:
        server.send_signal(signal.SIGCONT)


def test_a_store_that_stops_answering_fails_its_partitions_within_the_bound(tmp_path, stoppable_s3, rng):
    """The store stalls mid-run: each partition still waiting on it fails with the reason after
    about storage_attempts x storage_timeout, the job ends (exit 3, the store named), and a re-run
    after the store is back equals a clean run."""
    options, fs, server = stoppable_s3
    for i in range(6):
        write_embeddings(tmp_path / "emb" / f"part-{i:02d}.parquet", rng.standard_normal((50, 768)).astype(np.float32), f"f{i}-")
    fs.put(str(tmp_path / "emb"), "stall/emb", recursive=True)
    weights = tmp_path / "w.safetensors"
    from safetensors.numpy import save_file

    from conftest import random_state_dict

    save_file(random_state_dict(), str(weights))
    argv = ["score", "s3://stall/emb", "--aesthetic-weights", str(weights), "--threshold", "5.4", "--keep-rejected",
            "--storage-options", json.dumps(options), "--n-workers", "1", "--threads-per-worker", "1", "--no-report"]
    clean = cli(*argv, "-o", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "stalled"
    proc, stderr, ended = stall_after_two_partitions(server, [*argv, "-o", out], lambda: len(list((out / "_parts").glob("*.json"))))
    m = manifest(str(out))
    assert proc.returncode == 3, stderr
    failed = m["totals"]["partitions_failed"] if "partitions_failed" in m["totals"] else m["partitions"]["failed"]
    assert failed >= 1 and m["partitions"]["done"] >= 2
    reasons = [r for v in m["inputs"].values() for r in v.get("failures", [])]
    assert reasons and all(options["endpoint_url"].split("//")[1] in r or "timed out" in r.lower() or "timeout" in r.lower()
                           for r in reasons), reasons
    assert "Traceback" not in stderr
    # Bounded: each request waited at most its tries (2 x 1 s plus backoff), not minutes.
    assert ended < 90, ended
    rerun = cli(*argv, "-o", out)
    assert rerun.returncode == 0, rerun.stderr
    assert comparable(manifest(str(out))) == comparable(manifest(str(tmp_path / "clean")))
    for d in ("kept", "rejected"):
        pd.testing.assert_frame_equal(table(str(out), d), table(str(tmp_path / "clean"), d))


def test_an_out_on_a_store_that_stops_answering_ends_the_job_in_one_line(tmp_path, stoppable_s3, rng):
    """OUT itself stalls: the job cannot record anything there; it ends within the bound, exit 1,
    one line naming the store, and a re-run after the store is back completes it."""
    options, fs, server = stoppable_s3
    for i in range(6):
        write_embeddings(tmp_path / "emb" / f"part-{i:02d}.parquet", rng.standard_normal((50, 768)).astype(np.float32), f"f{i}-")
    from safetensors.numpy import save_file

    from conftest import random_state_dict

    save_file(random_state_dict(), str(tmp_path / "w.safetensors"))
    argv = ["score", tmp_path / "emb", "--aesthetic-weights", tmp_path / "w.safetensors", "--threshold", "5.4",
            "--storage-options", json.dumps(options), "--n-workers", "1", "--threads-per-worker", "2", "--no-report"]
    proc, stderr, ended = stall_after_two_partitions(server, [*argv, "-o", "s3://stall/out"],
                                                     lambda: len(fs.glob("stall/out/_parts/*.json", refresh=True)))
    assert proc.returncode == 1, stderr
    assert_last_line_names(stderr, options["endpoint_url"].split("//")[1])
    assert ended < 90, ended
    rerun = cli(*argv, "-o", "s3://stall/out")
    assert rerun.returncode == 0, rerun.stderr
    assert manifest("s3://stall/out", fs)["totals"]["rows_in"] == 300


def assert_last_line_names(stderr: str, what: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("aesthetic-dask: error:")]
    assert len(errors) == 1 and what in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def test_a_refilter_on_s3_stopped_at_any_write_and_run_again_equals_a_clean_run(tmp_path, s3, bucket, embeddings,
                                                                                tiny_weights):
    """Issue 29 on S3: each object appears whole or not at all, and the refilter's write order
    makes any stop recoverable there too (more seeds: benchmarks/bench_faults.py)."""
    import random
    import shutil

    from aesthetic_dask.refilter import refilter
    from faults import Killed, full_disk, stopped_at_write

    options, fs = s3
    common = ["--aesthetic-weights", tiny_weights["safetensors"], "--keep-rejected", "--partition-rows", "100",
              "--no-report", "--storage-options", json.dumps(options)]
    assert cli("score", embeddings, "-o", f"s3://{bucket}/job", *common, "--threshold", "5.25").returncode == 0
    clean = cli("score", embeddings, "-o", tmp_path / "clean", *common, "--threshold", "5.4")
    assert clean.returncode == 0, clean.stderr
    for seed in range(2):  # (more seeds: benchmarks/bench_faults.py)
        out = f"s3://{bucket}/out{seed}"
        fs.copy(f"{bucket}/job", out.removeprefix("s3://"), recursive=True)
        pick = random.Random(seed)
        with stopped_at_write(pick.randrange(20), pick.random() < 0.5, pick.choice((Killed(), full_disk()))):
            try:
                refilter(out, 5.4, options, report=False)
            except (Killed, OSError):
                pass
        fs.invalidate_cache()
        _, code = refilter(out, 5.4, options, report=False)
        assert code == 0
        assert comparable(manifest(out, fs)) == comparable(manifest(str(tmp_path / "clean")))
        for d in ("kept", "rejected"):
            pd.testing.assert_frame_equal(table(out, d, options), table(str(tmp_path / "clean"), d))


def test_a_no_op_rerun_on_s3_reads_one_index_not_every_record(tmp_path, s3, bucket, embeddings, tiny_weights, monkeypatch):
    """Issue 32: a re-run with nothing new costs one listing and the record index, not a request
    per finished partition; without the index (a cache) it reads each record and is still right."""
    import s3fs

    from aesthetic_dask.cli import main

    options, fs = s3
    out = f"s3://{bucket}/out"
    argv = ["score", str(embeddings), "-o", out, "--aesthetic-weights", str(tiny_weights["safetensors"]),
            "--partition-rows", "50", "--no-report", "--storage-options", json.dumps(options)]
    assert main(argv) == 0
    calls = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Key", ""), kwargs.get("Prefix", "")))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    for index in (True, False):
        calls.clear()
        fs.invalidate_cache()
        assert main(argv) == 0
        m = manifest(out, fs)
        assert m["this_run"]["partitions_processed"] == 0 and m["partitions"]["done"] == 9
        record_reads = [k for method, k, _ in calls if method == "get_object" and "/_parts/" in k and k.endswith(".json")]
        out_listings = [p for method, _, p in calls if method == "list_objects_v2" and p.startswith("out")]
        if index:
            assert record_reads == [] and len(out_listings) == 1, (record_reads, out_listings)
            fs.rm(f"{bucket}/out/_parts/_index.json.gz")
        else:
            assert len(record_reads) == 9
