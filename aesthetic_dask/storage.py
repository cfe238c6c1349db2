"""Every file the project reads or writes, local or in object storage, goes through fsspec here.

Paths are URLs (``s3://bucket/key``, ``gs://``, ``abfs://``, ``hf://``, ``file://``, ``http(s)://``
for inputs) or local paths. ``storage_options`` (``--storage-options``) go to the filesystem;
without them its standard credential chain applies.

Commit protocol (docs/object-storage.md): object stores have no atomic rename, so a file is
written once under its final name and appears whole or not at all (a single PUT, or a multipart
upload completed on close and aborted on error); locally it is written under ``OUT/_tmp/`` and
renamed into place. :func:`atomic_open` is the one helper behind every file the project writes.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import InputError

# fsspec protocol -> the extra that installs its filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "abfss": "azure", "az": "azure", "adl": "azure"}
# Option names whose values are secrets: never written to the manifest or the log. Everything
# under a key naming headers is secret too (Cookie, Authorization, X-Api-... whatever it is called).
_SECRET_WORDS = ("key", "secret", "token", "pass", "credential", "sas", "connection", "auth", "cookie",
                 "session", "signature", "private", "headers")


# Every S3 request is bounded (docs/object-storage.md): a store that stops answering fails a
# request after STORAGE_TIMEOUT s without an answer, and an operation after STORAGE_ATTEMPTS tries
# in all: s3fs's own retries (which also cover a body cut mid-read) times botocore's (standard
# mode: exponential backoff). Left alone they multiply: 5 x botocore's x a 15 s read timeout was
# ~409 s per read, times 3 task tries. The job's storage_timeout / storage_attempts travel to the
# workers with the storage options, under BOUND_KEY.
STORAGE_TIMEOUT, STORAGE_ATTEMPTS = 20.0, 8
BOUND_KEY = "aesthetic_dask_bound"


def with_bound(storage_options: dict[str, Any] | None, timeout: float, attempts: int) -> dict[str, Any]:
    """``storage_options`` carrying the job's bound on object-store requests (see :func:`split`)."""
    return {**(storage_options or {}), BOUND_KEY: {"timeout": float(timeout), "attempts": int(attempts)}}


def without_bound(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The user's storage options, without the job's bound (what the manifest shows)."""
    return {k: v for k, v in (storage_options or {}).items() if k != BOUND_KEY}


def _s3_bound(storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """(botocore config, s3fs retries) of the bound: s3fs x botocore tries = the attempts."""
    bound = {"timeout": STORAGE_TIMEOUT, "attempts": STORAGE_ATTEMPTS, **(storage_options or {}).get(BOUND_KEY, {})}
    from .s3_session import BoundedSession

    outer = min(2, bound["attempts"])
    config = {"connect_timeout": bound["timeout"], "read_timeout": bound["timeout"], "http_session_cls": BoundedSession,
              "retries": {"total_max_attempts": max(1, bound["attempts"] // outer), "mode": "standard"}}
    return config, outer


def _is_s3(url: str) -> bool:
    return str(url).split("://", 1)[0] in ("s3", "s3a")


def filesystem_options(url: str, storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], int | None]:
    """(options the filesystem of ``url`` is built with, s3fs retries or None): S3 gets the request
    bound (timeouts and tries); ``config_kwargs`` the user set explicitly win."""
    options = without_bound(storage_options)
    if not _is_s3(url):
        return options, None
    config, retries = _s3_bound(storage_options)
    return {**options, "config_kwargs": {**config, **options.get("config_kwargs", {})}}, retries


def split(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path on it) of ``url``; one clear error when its filesystem is not installed."""
    import fsspec

    try:
        options, retries = filesystem_options(url, storage_options)
        fs, path = fsspec.core.url_to_fs(str(url), **options)
        if retries is not None:
            fs.retries = retries  # s3fs takes its retries as an attribute only
        return fs, path
    except ImportError as exc:
        protocol = str(url).split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'aesthetic-dask[{extra}]'" if extra else f"install the fsspec filesystem for {protocol}://"
        raise InputError(f"{url}: no filesystem for {protocol}:// is installed ({hint})") from exc
    except ValueError as exc:
        raise InputError(f"{url}: {exc}") from None


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a remote object (``s3://...``, ``hf://...``) rather than a local file
    (a plain path or ``file://``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | Path) -> str:
    """A local path or ``file://`` URL as an absolute path (workers may run elsewhere than the client)."""
    import os

    return os.path.abspath(os.path.expanduser(str(path).removeprefix("file://")))


def is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def to_url(fs: Any, path: str) -> str:
    """The path as users see it: local paths stay paths, others keep their protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def redact(options: Any, secret: bool = False) -> Any:
    """``options`` (storage options) as the manifest and the log may show them: every value under
    a key naming a secret masked, at any depth, through mappings and lists (the keys stay, so a
    reader sees which were set), and a URL's ``user:password@`` masked wherever it appears."""
    if isinstance(options, dict):
        return {key: redact(value, secret or any(w in str(key).lower() for w in _SECRET_WORDS))
                for key, value in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(value, secret) for value in options]
    if secret and options is not None:
        return "***"
    if isinstance(options, str) and "@" in options and "://" in options:
        return _USERINFO.sub(r"\1***@", options)
    return options


_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")


def pyarrow_filesystem(fs: Any) -> Any:
    """A pyarrow filesystem for ``fs`` (pyarrow's own for local files: the fastest path)."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# What every commit of this thread's task checks first (set by :func:`commits_fenced_by`; the
# job's tasks check their lease on OUT: :func:`lock.holding`). A contextvar, so that each of a
# worker's threads fences its own task's writes.
_COMMIT_FENCE: ContextVar[Callable[[], None] | None] = ContextVar("aesthetic_dask_commit_fence", default=None)


@contextmanager
def commits_fenced_by(check: Callable[[], None] | None) -> Iterator[None]:
    """Call ``check()`` right before each file :func:`atomic_open` commits in this context; an
    exception from it aborts that commit (nothing appears) and propagates."""
    token = _COMMIT_FENCE.set(check)
    try:
        yield
    finally:
        _COMMIT_FENCE.reset(token)


def _fence() -> None:
    check = _COMMIT_FENCE.get()
    if check is not None:
        check()


@contextmanager
def atomic_open(fs: Any, path: str, tmp_dir: str | None = None, durable: bool = True) -> Iterator[Any]:
    """A binary file to write ``path`` through; the file appears whole, or not at all.

    Local: written under ``tmp_dir`` (or beside ``path``) and renamed into place; ``durable``:
    fsync-ed before the rename (a partition's data files are not: one :func:`sync_files` before
    its record covers them all). Object stores: written straight to ``path``, committed on
    close; on an error the upload is discarded. The commit (the rename, the close) is fenced
    (:func:`commits_fenced_by`): the check runs after the bytes are written, right before it.
    """
    if is_local(fs):
        directory = tmp_dir or os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(directory, f".{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            _fence()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
        _fence()
    except BaseException:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()  # abort a multipart upload: nothing appears
            f.closed = True  # and its __del__ must not try to upload what discard dropped
        raise
    f.close()


def write_bytes(fs: Any, path: str, data: bytes, tmp_dir: str | None = None, durable: bool = True) -> None:
    with atomic_open(fs, path, tmp_dir, durable) as f:
        f.write(data)


def _libc_syncfs() -> Any:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux
        return None


_SYNCFS = _libc_syncfs()


def sync_files(paths: Iterable[str]) -> None:
    """Make the local files ``paths`` durable at the cost of one ``syncfs(2)`` per filesystem they
    are on (usually one), instead of an fsync each; where syncfs is missing, fsync each."""
    by_device: dict[int, list[str]] = {}
    for path in paths:
        try:
            by_device.setdefault(os.stat(path).st_dev, []).append(path)
        except FileNotFoundError:
            continue
    for same in by_device.values():
        fd = os.open(same[0], os.O_RDONLY)
        try:
            if _SYNCFS is not None and _SYNCFS(fd) == 0:
                continue
        finally:
            os.close(fd)
        for path in same:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, tmp_dir: str | Path | None = None,
                       fs: Any = None, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all (:func:`atomic_open`)."""
    if fs is None:
        fs, path = split(str(path))
    write_bytes(fs, str(path), data, str(tmp_dir) if tmp_dir else None, durable)


def write_json(path: str | Path, obj: Any, tmp_dir: str | Path | None = None, fs: Any = None,
               durable: bool = True, indent: int | None = 2) -> None:
    """``obj`` as JSON at ``path``, whole or not at all; ``indent=None``: one line, through json's C
    encoder (Python's own encoder does the indenting, about 5x slower on a 100,000-partition manifest)."""
    text = json.dumps(obj, indent=indent, sort_keys=False, default=str)
    atomic_write_bytes(path, (text + "\n").encode(), tmp_dir, fs, durable)


def endpoint_of(storage_options: dict[str, Any] | None) -> str | None:
    """The endpoint URL the options name (S3-compatible stores), if any."""
    so = storage_options or {}
    return so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")


PROBE_S = 10.0  # how long the first request to a named endpoint may go unanswered


def check_reachable(url: str, storage_options: dict[str, Any] | None, what: str) -> None:
    """Fail in seconds, not after a client's retries, when a named endpoint does not answer: one
    that refuses connections, and one that accepts them and never replies (a hung proxy, a
    firewall that holds connections, a wrong port): one request, bounded by :data:`PROBE_S`."""
    from .network import reachable

    endpoint = endpoint_of(storage_options)
    if "://" not in str(url) or not endpoint:
        return
    if not reachable(endpoint):
        raise InputError(f"{what} {url}: cannot reach the storage endpoint {endpoint}")
    timeout = min(PROBE_S, (storage_options or {}).get(BOUND_KEY, {}).get("timeout", PROBE_S))
    fs, path = split(url, with_bound(storage_options, timeout, 1))
    try:
        fs.info(path.split("/", 1)[0])  # the bucket: one small request
    except Exception as exc:  # noqa: BLE001 - botocore's and aiohttp's timeouts share no base class
        if "timeout" in f"{type(exc).__name__} {exc}".lower():
            raise InputError(f"{what} {url}: the storage endpoint {endpoint} accepts connections but did not answer "
                             f"within {timeout:g}s") from None
        # Anything else (no such bucket, no access) is said by the checks that follow.


def check_output(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse, in one line, an OUT that cannot be written: a local file, an unreachable endpoint, a
    missing bucket."""
    fs, path = split(url, storage_options)
    if is_local(fs):
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"-o {url}: exists and is not a directory")
        return
    check_reachable(url, storage_options, "-o")
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket)
    except FileNotFoundError:
        raise InputError(f"-o {url}: the bucket {bucket!r} does not exist") from None
    except PermissionError as exc:
        raise InputError(f"-o {url}: no access to the bucket {bucket!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are not all OSError
        raise InputError(f"-o {url}: cannot reach the storage: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
