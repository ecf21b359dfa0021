"""Shared-memory slots that a grain worker process reuses for the batches it hands over.

A worker builds each batch's images straight into shared memory so that only a name
crosses to the consuming process. A fresh block per batch costs its page faults every
time: the kernel allocates and zeroes every page on first touch, 0.06-0.16 ms per
224-pixel image on the development VM (docs/input_pipeline.md, "Throughput"), up to a
sixth of the transform itself. Here each worker owns one block of batch-sized slots,
created once and reused for the life of the worker, so its pages are faulted in once.

Protocol: the block starts with one flag byte per slot (1 = in use). The worker takes a
free slot, marks it in use, writes the batch into it and hands over a small `RingSlot`
(block name, slot, shape). The consumer copies the images out (`RingSlot.take`) and
marks the slot free; a `RingSlot` that grain drops unread (stale batches after
`set_state`, a queue drained at a stop) frees its slot when it is garbage-collected.
Only the worker sets a flag and only the consumer clears it, each after the hand-off
through grain's queue, so no lock is needed. A worker waits for a slot only when every
slot is in flight, which grain's bounded buffers keep below the ring's size
(`slots_for_buffer`).

Memory order: x86 never lets the consumer's flag store pass its earlier loads from the
slot; ARMv8 allows it in principle, but the copy's loads complete thousands of
instructions before the store. A release-ordered store would remove even that; Python
exposes none.

Lifetime: the consuming process maps a ring through the `RingRegistry` of the pipeline
that started the worker and unlinks the block's name at once, so the memory goes with
the last process that maps it; the registry unmaps its rings when the pipeline is
dropped. A name never opened is unlinked by the worker at exit, or by the
multiprocessing resource tracker after a SIGKILL (it tracks every block it created).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import threading
import time
import uuid
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np

IN_USE, FREE = 1, 0
# Batches of one worker in flight beyond the ring's own: grain 0.2 holds up to
# `per_worker_buffer_size` in the worker's hand-off queue and as many again in the
# consuming process's per-worker read-ahead thread.
_BUFFERS_PER_WORKER = 2
# ... plus the batch being built, the one the read-ahead thread holds while it waits to
# put it, and the one between grain's iterator and `RingSlot.take`.
_SLOTS_BEYOND_BUFFERS = 3
# How long a worker sleeps between looks for a free slot.
_WAIT_SECONDS = 0.0005
# The flag bytes are padded to this many so that the slots start cache-line aligned.
_HEADER_ALIGNMENT = 64
# Where Linux keeps POSIX shared memory (multiprocessing.shared_memory's blocks).
SHARED_MEMORY_FOLDER = "/dev/shm"
_MIB = 1 << 20
# Shared-memory block names: a prefix and 128 random bits, never reused while mapped.
_NAME_PREFIX = "vgg_jax_ring_"

_worker_ring: WorkerRing | None = None
# The consuming process's registries, by id: a RingSlot finds its pipeline's here.
_registries: weakref.WeakValueDictionary[int, RingRegistry] = weakref.WeakValueDictionary()
_registry_ids = itertools.count()


def slots_for_buffer(per_worker_buffer_size: int) -> int:
    """The slots a worker needs so that it never waits for one while grain has room.

    Args:
      per_worker_buffer_size: grain's bound on each worker's hand-off queue
        (config.data.prefetch_buffer_size).

    Returns:
      The number of slots.
    """
    return _BUFFERS_PER_WORKER * per_worker_buffer_size + _SLOTS_BEYOND_BUFFERS


def check_shared_memory(num_workers: int, slots: int, slot_bytes: int,
                        folder: str = SHARED_MEMORY_FOLDER) -> None:
    """Fails at once when the workers' rings cannot fit in the shared-memory file system.

    A ring's pages are only allocated when written, so a ring that does not fit would
    start and then kill its worker with SIGBUS at the first batch past the limit (a
    container's /dev/shm is often 64 MB).

    Args:
      num_workers: grain worker processes, one ring each.
      slots: slots per ring (`slots_for_buffer`).
      slot_bytes: bytes of one batch's images.
      folder: where POSIX shared memory lives; nothing is checked if it does not exist.

    Raises:
      ValueError: one sentence with the sizes and the fixes.
    """
    if not os.path.isdir(folder):
        return
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    needed = num_workers * ring_bytes(slots, slot_bytes)
    if needed > free:
        raise ValueError(
            f"The {num_workers} data workers need {needed / _MIB:,.0f} MiB of shared memory "
            f"({slots} batch slots of {slot_bytes / _MIB:,.1f} MiB each), but {folder} has "
            f"{free / _MIB:,.0f} MiB free; lower config.data.num_workers, "
            "config.data.prefetch_buffer_size or the batch size, or give the machine more "
            "shared memory (a container's --shm-size).")


def ring_bytes(slots: int, slot_bytes: int) -> int:
    """The shared memory of one worker's ring: its flag bytes (padded) and its slots.

    Args:
      slots: slots of the ring (`slots_for_buffer`).
      slot_bytes: bytes of one batch's images.

    Returns:
      The ring's size in bytes.
    """
    return _header_bytes(slots) + slots * slot_bytes


def _header_bytes(slots: int) -> int:
    return -(-slots // _HEADER_ALIGNMENT) * _HEADER_ALIGNMENT


class WorkerRing:
    """The worker's block of reusable batch slots.

    Args:
      shape: one batch's image array shape.
      dtype: its dtype.
      slots: the number of slots.
      registry: the id of the consuming pipeline's `RingRegistry`.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, slots: int, registry: int):
        self.shape, self.dtype, self.slots = tuple(shape), np.dtype(dtype), slots
        self.registry = registry
        slot_bytes = int(np.prod(shape)) * self.dtype.itemsize
        header = _header_bytes(slots)
        self._memory = shared_memory.SharedMemory(
            name=_NAME_PREFIX + uuid.uuid4().hex, create=True, size=header + slots * slot_bytes)
        self._flags = np.ndarray((slots,), np.uint8, self._memory.buf)
        self._flags[:] = FREE
        self._slots = np.ndarray((slots, *shape), self.dtype, self._memory.buf, offset=header)
        atexit.register(_unlink_quietly, self._memory.name)

    @property
    def name(self) -> str:
        return self._memory.name

    def acquire(self) -> tuple[np.ndarray, RingSlot]:
        """A free slot (waiting for the consumer to free one if need be), marked in use.

        Returns:
          (the slot's array, to write the batch into; the `RingSlot` to hand over).
        """
        while True:
            free = np.flatnonzero(self._flags == FREE)
            if free.size:
                break
            time.sleep(_WAIT_SECONDS)
        slot = int(free[0])
        self._flags[slot] = IN_USE
        return self._slots[slot], RingSlot(
            self.registry, self.name, slot, self.shape, self.dtype.str, self.slots)

    def abandon(self, slot: RingSlot) -> None:
        """Frees a slot acquired here that will not be handed over (its batch failed)."""
        self._flags[slot.index] = FREE


def worker_slot(shape: tuple[int, ...], dtype: Any, slots: int,
                registry: int) -> tuple[np.ndarray, RingSlot]:
    """A free slot of this worker process's ring (created on first use).

    Args:
      shape: the batch's image array shape.
      dtype: its dtype.
      slots: the ring's number of slots (`slots_for_buffer`).
      registry: the id of the consuming pipeline's `RingRegistry`.

    Returns:
      As `WorkerRing.acquire`.
    """
    global _worker_ring
    ring = _worker_ring
    if ring is None or (ring.shape, ring.dtype, ring.registry) != (
            tuple(shape), np.dtype(dtype), registry):
        ring = _worker_ring = WorkerRing(shape, dtype, slots, registry)
    return ring.acquire()


def abandon_worker_slot(slot: RingSlot) -> None:
    """Frees a slot of this worker's ring whose batch failed before it was handed over."""
    if _worker_ring is not None and _worker_ring.name == slot.ring_name:
        _worker_ring.abandon(slot)


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
        self.closed = False

    def close(self) -> None:
        """Unmaps the ring (its views first: a mapping with live views cannot close)."""
        self.closed = True
        del self.flags, self.slots
        # BufferError: a view taken just before is still alive; the mapping then goes
        # with the process.
        with contextlib.suppress(BufferError):
            self._memory.close()


class RingRegistry:
    """The rings of one pipeline's workers, as the consuming process maps them.

    Created with the pipeline (in the consuming process); its id travels to the workers
    and back in every `RingSlot`, which maps its ring here on arrival. The rings are
    unmapped when the registry is dropped with its pipeline, or at interpreter exit.
    """

    def __init__(self):
        self.id = next(_registry_ids)
        self._rings: dict[str, _OpenedRing] = {}
        self._closed = threading.Event()
        # grain's consuming threads unpickle batches of several workers at once.
        self._lock = threading.Lock()
        _registries[self.id] = self
        weakref.finalize(self, _close_all, self._rings, self._lock, self._closed)

    def open(self, name: str, shape: tuple[int, ...], dtype: str,
             slots: int) -> _OpenedRing | None:
        """The named ring, mapped on first use.

        Args:
          name, shape, dtype, slots: as a `RingSlot` describes its ring.

        Returns:
          The mapped ring; None once the registry has closed its rings (grain drains a
          stopping worker's queue at interpreter exit, after the rings went).
        """
        with self._lock:
            if self._closed.is_set():
                return None
            ring = self._rings.get(name)
            if ring is None:
                ring = self._rings[name] = _OpenedRing(name, shape, dtype, slots)
            return ring


def _close_all(rings: dict[str, _OpenedRing], lock: threading.Lock,
               closed: threading.Event) -> None:
    with lock:
        closed.set()
        for ring in rings.values():
            ring.close()
        rings.clear()


class RingSlot:
    """A batch's images in a worker's ring, as handed to the consuming process.

    Args:
      registry: the id of the consuming pipeline's `RingRegistry`.
      name: the ring's shared-memory block.
      index: the slot holding the images.
      shape: their shape.
      dtype: their dtype (numpy's `dtype.str`).
      slots: the ring's number of slots.
    """

    def __init__(self, registry: int, name: str, index: int, shape: tuple[int, ...],
                 dtype: str, slots: int):
        self._fields = (registry, name, index, tuple(shape), dtype, slots)
        self._ring: _OpenedRing | None = None

    def __getstate__(self) -> tuple:
        return self._fields

    def __setstate__(self, fields: tuple) -> None:
        # Unpickled: in the consuming process, which maps the ring and owns the slot now.
        self._fields, self._ring = fields, None
        registry_id, name, _, shape, dtype, slots = fields
        registry = _registries.get(registry_id)
        if registry is not None:  # None: its pipeline is gone; nothing to free or take.
            self._ring = registry.open(name, shape, dtype, slots)

    @property
    def ring_name(self) -> str:
        return self._fields[1]

    @property
    def index(self) -> int:
        return self._fields[2]

    def take(self) -> np.ndarray:
        """Copies the images out of the slot and frees it for the worker.

        Returns:
          A private array (the slot is rewritten as soon as it is freed).
        """
        ring = self._ring
        if ring is None or ring.closed:
            raise RuntimeError(f"The batch in slot {self.index} of ring {self.ring_name} "
                               "was taken already, or its pipeline is gone.")
        images = np.array(ring.slots[self.index])
        self._release()
        return images

    def _release(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None and not ring.closed:
            ring.flags[self.index] = FREE

    def __del__(self) -> None:
        # A batch grain dropped without handing it over still frees its slot.
        self._release()
