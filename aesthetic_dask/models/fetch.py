"""Fetching and verifying the registered heads: a verified copy in ``model_dir`` first (no
network), else each pinned source in order (huggingface_hub at its revision, or a streamed GET),
checked against its sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from .. import network
from .checkpoint import converted_path
from .heads import PredictorSpec
from .registry import REGISTRY, HubFile, RegisteredWeights, UrlFile


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on local disk, with where it came from.

    ``entry`` is the registry entry (None for a local file the user vouches for); ``spec`` is
    None until the file is read, for local files whose layout is inferred from their keys.
    """

    path: Path
    sha256: str
    source: str
    spec: PredictorSpec | None
    entry: RegisteredWeights | None = None

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else str(self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, src: HubFile | UrlFile) -> Path:
    if src.sha256 is not None:
        digest = sha256_file(path)
        if digest != src.sha256:
            raise WeightsError(f"{path}: sha256 {digest} does not match the pinned {src.sha256} of {src.url}")
    return path


def _download(src: HubFile | UrlFile, target: Path) -> None:
    """Fetch ``src`` to ``target``: huggingface_hub for hub files, a streamed HTTP GET for URLs."""
    if isinstance(src, HubFile):
        from huggingface_hub import hf_hub_download

        got = Path(hf_hub_download(repo_id=src.repo_id, filename=src.filename, revision=src.revision,
                                   local_dir=target.parent))
        if got.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, target)
        return
    from urllib.request import urlopen

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with urlopen(src.url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(src: HubFile | UrlFile, model_dir: Path) -> Path:
    """Return a verified local copy of ``src`` under ``model_dir``, downloading it if needed."""
    target = src.local_copy(model_dir)
    if not target.exists():
        if network.offline():
            raise WeightsError(f"{src.url} is not in {model_dir} and HF_HUB_OFFLINE is set")
        if not network.reachable(network.hub_endpoint() if isinstance(src, HubFile) else src.url):
            raise WeightsError(f"{src.url}: not in {model_dir}, and its host is unreachable (no network?)")
        try:
            _download(src, target)
        except Exception as exc:  # network, auth, missing file: try the next source
            raise WeightsError(f"{src.url}: download failed: {type(exc).__name__}: {exc}") from None
    return _verified(target, src)


def _cached(entry: RegisteredWeights, model_dir: Path) -> ResolvedWeights | None:
    """A verified copy of ``entry`` already in ``model_dir``: any source's download, or the
    safetensors conversion of a pinned digest. Checked before any network access."""
    for src in entry.sources:
        target = src.local_copy(model_dir)
        if target.is_file():
            try:
                _verified(target, src)
            except WeightsError:
                continue
            return ResolvedWeights(target, src.sha256 or sha256_file(target), src.url, entry.spec, entry)
    for src in entry.sources:
        if src.sha256 and converted_path(model_dir, src.sha256).is_file():
            # The file that is there, and that is read: never the .pth it was converted from.
            return ResolvedWeights(converted_path(model_dir, src.sha256), src.sha256, src.url, entry.spec, entry)
    pinned = {src.sha256: src for src in entry.sources if src.sha256}
    for path, digest in _files_in(model_dir):  # a copy put there by hand, under any name
        if digest in pinned:
            return ResolvedWeights(path, digest, pinned[digest].url, entry.spec, entry)
    return None


HEAD_SUFFIXES = (".pth", ".pt", ".safetensors")
MAX_HEAD_BYTES = 64 * 2**20  # heads are a few MB: a CLIP checkpoint beside them is not hashed


def _files_in(model_dir: Path) -> list[tuple[Path, str]]:
    """(path, sha256) of the head-sized weight files directly in ``model_dir``."""
    try:
        candidates = sorted(p for p in Path(model_dir).iterdir()
                            if p.suffix in HEAD_SUFFIXES and p.is_file() and p.stat().st_size <= MAX_HEAD_BYTES)
    except OSError:
        return []
    return [(p, sha256_file(p)) for p in candidates]


def registered_entry(name_or_path: str) -> RegisteredWeights | None:
    """The registered head a name or a local file is (a file by its sha256), without fetching."""
    entry = REGISTRY.get(name_or_path)
    if entry is not None:
        return entry
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        return None
    return entry_by_sha256(sha256_file(path))


def entry_by_sha256(digest: str) -> RegisteredWeights | None:
    """The registered head one of whose pinned sources has ``digest``."""
    return next((e for e in REGISTRY.values() for src in e.sources if src.sha256 == digest), None)


def cached_weights(name: str, model_dir: Path) -> ResolvedWeights | None:
    """The verified copy of registered head ``name`` in ``model_dir``, if there is one (no network)."""
    return _cached(REGISTRY[name], model_dir)


def resolve_weights(name_or_path: str, model_dir: Path) -> ResolvedWeights:
    """A registry name (looked up in ``model_dir`` first, downloaded once) or a local
    .pth/.safetensors path (its layout is inferred from its keys when it is read)."""
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(REGISTRY))
            raise WeightsError(
                f"aesthetic weights {name_or_path!r}: no such file, and not a registered name ({known})"
            )
        if path.suffix not in {".pth", ".pt", ".safetensors"}:
            raise WeightsError(f"{path}: expected a .pth or .safetensors file")
        digest = sha256_file(path)
        # A registered head downloaded by hand is that head: its spec, license and expected CLIP.
        known = entry_by_sha256(digest)
        return ResolvedWeights(path, digest, str(path.resolve()), known.spec if known else None, known)
    cached = _cached(entry, model_dir)
    if cached is not None:
        return cached
    failures = []
    for src in entry.sources:
        try:
            path = _fetch(src, model_dir)
        except WeightsError as exc:
            failures.append(str(exc))
            continue
        return ResolvedWeights(path, src.sha256 or sha256_file(path), src.url, entry.spec, entry)
    raise WeightsError(
        f"cannot get weights {entry.name!r} (run `aesthetic-dask download --model-dir DIR` where "
        f"the hub is reachable, or pass --aesthetic-weights FILE): " + "; ".join(failures)
    )


def download_all(model_dir: Path, names: list[str] | None = None) -> list[ResolvedWeights]:
    """Prefetch registered weights (``names``, default every one) into ``model_dir``."""
    return [resolve_weights(name, model_dir) for name in (names or list(REGISTRY))]
