"""Is a download source reachable? Asked before downloading, so an offline run fails in seconds
instead of waiting through a client's retries (huggingface_hub's take ~23 s per file)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_seen: dict[tuple[str, int], bool] = {}


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: use only what is cached."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def reachable(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host (or the configured proxy) opens within a few
    seconds; ``file://`` URLs always are. Remembered per process. The hub's offline switch is the
    callers' to apply where they mean the hub (:func:`offline`): it concerns no other endpoint."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return True
    proxy = os.environ.get(f"{parsed.scheme}_proxy") or os.environ.get(f"{parsed.scheme.upper()}_PROXY")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    key = (host, port)
    if key not in _seen:
        try:
            socket.create_connection(key, timeout=PROBE_TIMEOUT_S).close()
            _seen[key] = True
        except OSError:
            _seen[key] = False
    return _seen[key]
