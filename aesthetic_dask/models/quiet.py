"""open_clip's note that a model got no pretrained weights, silenced where that is meant: a
meta-device model loaded later (the encoder) and the demo CLIP. Its own module: both the CLIP
spec's users and the demo need it, and neither may import the other."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

_QUIET = threading.Lock()
_quiet_users = 0


@contextmanager
def random_weights_expected() -> Iterator[None]:
    """Within: open_clip's root-logger note that a model got no pretrained weights is dropped,
    where that is meant (a meta-device model to be loaded later, the demo CLIP). Counted: a
    worker's threads enter it at once (partitions and the model's load), and the filter stays
    until the last one leaves."""
    global _quiet_users
    root = logging.getLogger()
    with _QUIET:
        _quiet_users += 1
        root.addFilter(_no_weights_note)
    try:
        yield
    finally:
        with _QUIET:
            _quiet_users -= 1
            if not _quiet_users:
                root.removeFilter(_no_weights_note)


def _no_weights_note(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()
