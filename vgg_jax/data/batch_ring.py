"""Shared-memory slots that a grain worker process reuses for the batches it hands over.

A worker builds each batch's images straight into shared memory so that only a name
crosses to the consuming process. A fresh block per batch costs its page faults every
time: the kernel allocates and zeroes every page on first touch, about 0.16 ms per
224-pixel image on the development VM (docs/input_pipeline.md, "Throughput"), a sixth
of the transform itself. Here each worker owns one block of `slots` batch-sized slots,
created once and reused for the life of the worker, so its pages are touched for the
first time only once.

Protocol: the block starts with one flag byte per slot (1 = in use). The worker waits
until the next slot (round-robin) is free, marks it in use, writes the batch into it and
hands over a small `RingSlot` (block name, slot, shape). The consumer copies the images
out (`RingSlot.take`) and marks the slot free; a `RingSlot` that grain discards unread
(stale batches after `set_state`) frees its slot when it is garbage-collected. Only the
worker sets a flag and only the consumer clears it, each after the hand-off through
grain's queue, so no lock is needed. A worker waits on a slot only when every slot is
in flight, which grain's bounded per-worker queue (`per_worker_buffer_size`) keeps
below `slots` (see `slots_for_buffer`).

Lifetime: the consumer unlinks the block's name the first time it opens it, so the
memory goes with the last process that maps it: a consumer killed with SIGKILL leaves
nothing in /dev/shm once its workers exit (vgg_jax.data.orphan_watchdog). A worker
unlinks its block at exit if no consumer ever opened it.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np

IN_USE, FREE = 1, 0
# Slots beyond grain's per-worker queue: the batch being built, the one being put into
# the queue, and the one the consumer has dequeued but not yet copied out.
_SLOTS_BEYOND_QUEUE = 3
# How long a worker sleeps between looks at a slot that is still in use.
_WAIT_SECONDS = 0.0005
# The flag bytes are padded to this many so that the slots start cache-line aligned.
_HEADER_ALIGNMENT = 64

_worker_ring: WorkerRing | None = None
# Rings this (consuming) process has mapped, by block name, until `close_rings`.
_opened: dict[str, _OpenedRing] = {}


def slots_for_buffer(per_worker_buffer_size: int) -> int:
    """The slots a worker needs so that it never waits on one while its queue has room.

    Args:
      per_worker_buffer_size: grain's bound on each worker's hand-off queue.

    Returns:
      The number of slots.
    """
    return per_worker_buffer_size + _SLOTS_BEYOND_QUEUE


def _header_bytes(slots: int) -> int:
    return -(-slots // _HEADER_ALIGNMENT) * _HEADER_ALIGNMENT


class WorkerRing:
    """The worker's block of reusable batch slots.

    Args:
      shape: one batch's image array shape.
      dtype: its dtype.
      slots: the number of slots.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, slots: int):
        self.shape, self.dtype, self.slots = tuple(shape), np.dtype(dtype), slots
        slot_bytes = int(np.prod(shape)) * self.dtype.itemsize
        header = _header_bytes(slots)
        self._memory = shared_memory.SharedMemory(create=True, size=header + slots * slot_bytes)
        self._flags = np.ndarray((slots,), np.uint8, self._memory.buf)
        self._flags[:] = FREE
        self._slots = np.ndarray((slots, *shape), self.dtype, self._memory.buf, offset=header)
        self._next = 0
        atexit.register(_unlink_quietly, self._memory.name)

    @property
    def name(self) -> str:
        return self._memory.name

    def acquire(self) -> tuple[np.ndarray, RingSlot]:
        """The next slot, once the consumer has freed it, marked in use.

        Returns:
          (the slot's array, to write the batch into; the `RingSlot` to hand over).
        """
        slot = self._next
        self._next = (slot + 1) % self.slots
        while self._flags[slot] != FREE:
            time.sleep(_WAIT_SECONDS)
        self._flags[slot] = IN_USE
        return self._slots[slot], RingSlot(self.name, slot, self.shape, self.dtype.str,
                                           self.slots)


def worker_slot(shape: tuple[int, ...], dtype: Any, slots: int) -> tuple[np.ndarray, RingSlot]:
    """A free slot of this worker process's ring (created on first use).

    Args:
      shape: the batch's image array shape.
      dtype: its dtype.
      slots: the ring's number of slots (`slots_for_buffer`).

    Returns:
      As `WorkerRing.acquire`.
    """
    global _worker_ring
    ring = _worker_ring
    if ring is None or ring.shape != tuple(shape) or ring.dtype != np.dtype(dtype):
        ring = _worker_ring = WorkerRing(shape, dtype, slots)
    return ring.acquire()


def _unlink_quietly(name: str) -> None:
    # The consumer normally unlinked it already; this only catches a block never opened.
    with contextlib.suppress(FileNotFoundError):
        memory = shared_memory.SharedMemory(name=name)
        memory.close()
        memory.unlink()


class _OpenedRing:
    """A worker's ring as the consuming process maps it."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, slots: int):
        self._memory = shared_memory.SharedMemory(name=name)
        # Nobody opens it again: from now on it lives as long as the mappings.
        self._memory.unlink()
        header = _header_bytes(slots)
        self.flags = np.ndarray((slots,), np.uint8, self._memory.buf)
        self.slots = np.ndarray((slots, *shape), np.dtype(dtype), self._memory.buf,
                                offset=header)

    def close(self) -> None:
        """Unmaps the ring (its views first: a mapping with live views cannot close)."""
        del self.flags, self.slots
        self._memory.close()


def _open(name: str, shape: tuple[int, ...], dtype: str, slots: int) -> _OpenedRing:
    ring = _opened.get(name)
    if ring is None:
        ring = _opened[name] = _OpenedRing(name, shape, dtype, slots)
    return ring


def close_rings(names: set[str]) -> None:
    """Unmaps the named rings in this (consuming) process, once their workers are gone.

    Args:
      names: ring block names (`RingSlot.ring_name`).
    """
    for name in names:
        ring = _opened.pop(name, None)
        if ring is not None:
            ring.close()


class RingSlot:
    """A batch's images in a worker's ring, as handed to the consuming process.

    Args:
      name: the ring's shared-memory block.
      slot: the slot holding the images.
      shape: their shape.
      dtype: their dtype (numpy's `dtype.str`).
      slots: the ring's number of slots.
    """

    def __init__(self, name: str, slot: int, shape: tuple[int, ...], dtype: str, slots: int):
        self._fields = (name, slot, tuple(shape), dtype, slots)
        self._ring: _OpenedRing | None = None

    def __getstate__(self) -> tuple:
        return self._fields

    def __setstate__(self, fields: tuple) -> None:
        # Unpickled: in the consuming process, which maps the ring and owns the slot now.
        self._fields, self._ring = fields, None
        name, _, shape, dtype, slots = fields
        # FileNotFoundError: the ring was unmapped already (grain drains a stopping
        # worker's queue after the pipeline let go of its rings): nothing to free or take.
        with contextlib.suppress(FileNotFoundError):
            self._ring = _open(name, shape, dtype, slots)

    @property
    def ring_name(self) -> str:
        return self._fields[0]

    def take(self) -> np.ndarray:
        """Copies the images out of the slot and frees it for the worker.

        Returns:
          A private array (the slot is rewritten as soon as it is freed).
        """
        if self._ring is None:
            raise RuntimeError(f"The batch ring {self.ring_name} was closed before its batch "
                               "was taken; the pipeline that owned it is gone.")
        images = np.array(self._ring.slots[self._fields[1]])
        self._release()
        return images

    def _release(self) -> None:
        if self._ring is not None:
            self._ring.flags[self._fields[1]] = FREE
            self._ring = None

    def __del__(self) -> None:
        # A batch grain dropped without handing it over still frees its slot.
        self._release()
