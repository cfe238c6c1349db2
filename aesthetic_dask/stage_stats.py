"""Seconds per stage of one partition: kept by the worker's stages and the writer alike, so it
sits below both."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Stats:
    """Seconds per stage of one partition (datatrove's per-step stats): what its thread spent waiting
    for decodes and features, scoring, writing. Recorded as ``stage_s``."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 4)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)
