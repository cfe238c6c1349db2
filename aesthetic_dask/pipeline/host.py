"""A host process of the decode pool: it reads its inputs itself, decodes, and hands back crops.

Each process serves one job at a time: a source with ``items(failure)``, which an input kind
declares (:class:`sources.shards.ShardImages`: a shard; :class:`sources.image_parquet.ParquetImages`:
a Parquet row range), or a list of image bytes from the notebook API (:class:`BytesImages`). It
reads the samples itself (paths, not bytes, cross the process boundary for shards and Parquet),
and per chunk of up to ``chunk`` samples:

1. sends ``("hold", job, metas)``: the chunk's samples without their bytes (so if this process
   dies while decoding, the parent knows which samples it held and gives them a reason);
2. decodes each image (:mod:`.decode`: formats, pixel limit, reasons, thumbnails);
3. copies the uint8 crops into a free slot of its shared buffer and sends
   ``("chunk", job, generation, slot, reasons, thumbnails)``; the parent sends
   ``("release", generation, slot)`` once the model's side has copied them out.

Then ``("done", job, failure, kind)``: ``kind`` is None (the rows read are all there were, or
the samples before the damage), ``"unread"`` (nothing could be read: rows unknown) or
``"crash"`` (an exception of the job itself, which the partition's task raises). Imported by the
pool's launcher (:mod:`.launcher`) ahead of time, so a new or replacement process starts with
torch, torchvision, Pillow and open_clip already imported.

Each job says its chunk size and crop shape (they follow the job's model and batch size), so one
pool serves every config a worker process uses; a slot holds ``slot_bytes``.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .decode import make_decoder
from .thumbnails import wants_thumbnail


@dataclass(frozen=True)
class DecodeSettings:
    """How a job's images are decoded: the decoder, the model's input, the pixel limit, thumbnails."""

    decoder: str
    spec: Any  # InputSpec
    max_pixels: int
    thumbnails: bool = False


@dataclass
class Item:
    """One sample as the host process reads it: its metadata (what ``hold`` sends) and its image bytes."""

    meta: Any  # image_reader.Sample without bytes (shards), else None
    key: str | None
    image: bytes | None


@dataclass(frozen=True)
class BytesImages:
    """Image bytes already in the caller's memory (the notebook API), with their keys."""

    images: list[bytes | None]
    keys: list[str | None] | None = None

    def items(self, failure: list[str]) -> Iterator[Item]:
        for i, data in enumerate(self.images):
            yield Item(None, self.keys[i] if self.keys else None, data)


@dataclass(frozen=True)
class DecodeRequest:
    """One unit of the pool's work; ``skip`` samples (delivered before a process died) are passed over."""

    id: int
    source: Any  # an input kind's decode source (sources.shards.ShardImages, ...) or BytesImages: items(failure)
    decode: DecodeSettings
    chunk: int  # samples per chunk handed back
    skip: int = 0
    thumbnails_made: int = 0


class SlotBuffer:
    """``slots`` slots of ``slot_bytes`` in one shared mapping (the parent's fd); a chunk's crops
    are a view of the start of one."""

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.map = mmap.mmap(fd, slots * slot_bytes)
        os.close(fd)
        self.array = np.frombuffer(self.map, dtype=np.uint8).reshape(slots, slot_bytes)

    def crops(self, slot: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
        return crops_view(self.array, slot, n, shape)


def crops_view(array: np.ndarray, slot: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """``n`` uint8 crops of ``shape`` at the start of ``slot`` of a (slots, slot_bytes) buffer."""
    return array[slot, : n * int(np.prod(shape))].reshape(n, *shape)


def serve(to_fd: int, from_fd: int, buffer_fd: int, generation: int, slots: int, slot_bytes: int) -> None:
    """A decode process's main loop (forked by :mod:`.launcher`): jobs come on ``to_fd``, chunks
    go back on ``from_fd``, crops through the shared buffer ``buffer_fd``."""
    from multiprocessing.connection import Connection

    import torch

    torch.set_num_threads(1)  # one core per host process: the pool is the parallelism
    to_child, from_child = Connection(to_fd), Connection(from_fd, readable=False)
    buffer = SlotBuffer(buffer_fd, slots, slot_bytes)
    free = list(range(slots))
    decoders: dict[DecodeSettings, Any] = {}
    try:
        from_child.send(("ready", os.getpid()))
    except OSError:
        os._exit(0)

    def wait_for(kind: str) -> Any:
        """Read messages until one of ``kind`` (``release``: until a slot is free); releases free
        their slot on the way."""
        while True:
            try:
                message = to_child.recv()
            except (EOFError, OSError):  # the parent is gone
                os._exit(0)
            if message[0] == "release":
                if message[1] == generation:
                    free.append(message[2])
                    if kind == "release":
                        return message
            elif message[0] == "stop":
                os._exit(0)
            elif message[0] == kind:
                return message

    while True:
        job: DecodeRequest = wait_for("job")[1]
        settings = job.decode
        decoder = decoders.get(settings)
        if decoder is None:
            decoder = decoders[settings] = make_decoder(settings.decoder, settings.spec, settings.max_pixels)
        failure: list[str] = []  # the reason, then how many rows are known: "unread" (none) or "crash"
        try:
            _run(job, decoder, job.source.items(failure), buffer, free, wait_for, from_child)
        except Exception as exc:  # noqa: BLE001 - an exception of this job: the partition's, as in a task
            failure[:] = [f"{type(exc).__name__}: {exc}", "crash"]
        try:
            from_child.send(("done", job.id, failure[0] if failure else None, failure[1] if len(failure) > 1 else None))
        except OSError:  # the parent is gone
            os._exit(0)


def _run(job: DecodeRequest, decoder: Any, stream: Iterator[Item], buffer: SlotBuffer, free: list[int], wait_for: Any,
         send: Any) -> None:
    made, index, batch = job.thumbnails_made, 0, []
    shape = job.decode.spec.crop_shape

    def flush() -> None:
        nonlocal made
        if not batch:
            return
        send.send(("hold", job.id, [item.meta for item in batch] if batch[0].meta is not None else len(batch)))
        results = []
        for i, item in enumerate(batch, start=index - len(batch)):
            thumb = job.decode.thumbnails and item.image is not None and wants_thumbnail(i, item.key, made)
            made += bool(thumb)
            results.append(decoder.decode(item.image, thumb) if item.image is not None else None)
        crops = [r.crop for r in results if r is not None and r.reason is None]
        slot = None
        if crops:
            while not free:
                wait_for("release")
            slot = free.pop()
            view = buffer.crops(slot, len(crops), shape)
            for i, crop in enumerate(crops):
                view[i] = crop
        # No bytes: "no image" (a shard sample's own reason, in its metadata, wins in the parent).
        reasons = ["no image" if r is None else r.reason for r in results]
        thumbs = {i: r.thumbnail for i, r in enumerate(results) if r is not None and r.thumbnail is not None}
        send.send(("chunk", job.id, slot, reasons, thumbs))
        batch.clear()

    for item in stream:
        index += 1
        if index <= job.skip:
            continue
        batch.append(item)
        if len(batch) == job.chunk:
            flush()
    flush()
