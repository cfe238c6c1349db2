"""What a job submitted to the decode pool gets back: its decoded :class:`Chunk`s in order on a
:class:`JobHandle`, then :class:`Done`, saying whether its source was read whole."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


@dataclass
class Chunk:
    """Up to ``chunk`` consecutive samples of a job, decoded."""

    metas: list[Any] | None  # shard samples without bytes, else None
    reasons: list[str | None]  # per sample: None where a crop was made
    thumbnails: dict[int, bytes]  # by position in the chunk
    crops: np.ndarray | None  # (samples without a reason, 3, H, W) uint8, in shared memory until released
    _release: Any = None

    def release(self) -> None:
        """Give the crops' slot back to its process (call once they are copied out)."""
        if self._release is not None:
            self._release()
            self._release = None


@dataclass
class Done:
    failure: str | None
    kind: str | None = None  # None, "unread" (rows unknown) or "crash" (see host)


class JobHandle:
    """A submitted job: iterate it for its :class:`Chunk`s in order; then ``failure`` says whether
    its source was read whole."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.failure: str | None = None
        self.failure_kind: str | None = None

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            event = self.events.get()
            if isinstance(event, Done):
                self.failure, self.failure_kind = event.failure, event.kind
                return
            yield event
