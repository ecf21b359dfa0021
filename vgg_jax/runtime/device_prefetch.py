"""Batches on their way to the devices while the step runs: a background transfer thread.

The training loop would otherwise take each batch from grain and start its host-to-device
transfer only once the previous step was dispatched, so a step could wait for its own
batch. `DevicePrefetcher` runs `next(host_iterator)` and the transfer on a thread that
stays `depth` batches ahead (each one already on the devices when the loop takes it; while
those wait, the thread may hold one more, being made or copied).

Checkpoints: grain's position must be that of the batches the loop CONSUMED, not of those
the thread pulled ahead, or a resume would skip them. The thread records the grain state
right after pulling each batch and hands it over with the batch; `get_state` returns the
state that came with the last batch taken. The saved file is the same as grain's own
(the JSON of the wrapped iterator's state), so checkpoints move freely between runs with
and without prefetching.

`grain.checkpoint.CheckpointSave/CheckpointRestore` accept the prefetcher in place of the
grain iterator: it follows grain's protocol for iterators that are not grain
`DatasetIterator`s (`get_state` -> bytes, `set_state(bytes)`, `start_prefetch`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax

from vgg_jax.runtime import parallel

# How often (s) a blocked producer looks whether it was asked to stop; a bound on how
# long `close` waits for a thread whose consumer went away, not a tuning knob.
_POLL_S = 0.1
# How long `close` waits for the thread to leave a `next()` still running in grain (a
# batch being decoded) before it gives up on it; it is a daemon thread either way.
_JOIN_TIMEOUT_S = 60.0


@dataclasses.dataclass
class PrefetchStats:
    """Where the loop's batches spent their time (seconds, summed over batches).

    Attributes:
      batches: batches handed to the loop.
      data_s: time in `next(host_iterator)` (grain: decoding, batching, the hand-off).
      transfer_s: time of the host-to-device transfer (with a thread: until the batch is
        on the device; without one: the dispatch of the copy only).
      blocked_data_s: time the loop itself waited while the batch was still being made.
      blocked_transfer_s: time the loop itself waited while the batch was being copied.
    """

    batches: int = 0
    data_s: float = 0.0
    transfer_s: float = 0.0
    blocked_data_s: float = 0.0
    blocked_transfer_s: float = 0.0

    @property
    def blocked_s(self) -> float:
        """Total time the loop waited for its next batch."""
        return self.blocked_data_s + self.blocked_transfer_s


class DevicePrefetcher(Iterator[Any]):
    """Iterates device batches, keeping `depth` of them in flight on a background thread.

    Args:
      host_iterator: the grain iterator of host batches (anything with `get_state` and
        `set_state`; its `close` is called by `close`).
      put: host batch -> device batch (e.g. `parallel.shard_batch` bound to the mesh).
      depth: batches made and transferred ahead of the loop; 0 = no thread, each batch is
        fetched and its transfer dispatched when the loop asks for it.
    """

    def __init__(self, host_iterator: Any, put: Callable[[Any], Any], depth: int):
        if depth < 0:
            raise ValueError(f"depth={depth} must be 0 or more.")
        self._inner = host_iterator
        self._put = put
        self._depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = copy.deepcopy(host_iterator.get_state())
        self.stats = PrefetchStats()

    # -- iteration ------------------------------------------------------------------------

    def __next__(self) -> Any:
        start = time.perf_counter()
        if self._depth == 0:
            batch, state, data_s, transfer_s = self._make_one()
            self._account(data_s, transfer_s, data_s, transfer_s)
            self._state = state
            return batch
        self.start_prefetch()
        batch, state, data_s, transfer_s, error = self._queue.get()
        if error is not None:
            self._join()
            raise error
        waited = time.perf_counter() - start
        # The transfer is the last part of making a batch: the end of a wait was spent on it.
        on_transfer = min(waited, transfer_s)
        self._account(data_s, transfer_s, waited - on_transfer, on_transfer)
        self._state = state
        return batch

    def _make_one(self) -> tuple[Any, Any, float, float]:
        start = time.perf_counter()
        host = next(self._inner)
        state = copy.deepcopy(self._inner.get_state())
        fetched = time.perf_counter()
        batch = self._put(host)
        if self._depth:  # on the thread: wait, so the loop gets a batch already there
            jax.block_until_ready(batch)
        return batch, state, fetched - start, time.perf_counter() - fetched

    def _account(self, data_s: float, transfer_s: float, blocked_data: float,
                 blocked_transfer: float) -> None:
        s = self.stats
        s.batches += 1
        s.data_s += data_s
        s.transfer_s += transfer_s
        s.blocked_data_s += blocked_data
        s.blocked_transfer_s += blocked_transfer

    def _produce(self, stop: threading.Event) -> None:
        # `stop` belongs to this thread alone: a thread that outlived its join (stuck in the
        # wrapped iterator) stays stopped when a later thread starts, so it never feeds a
        # batch from before a set_state.
        while not stop.is_set():
            try:
                item = (*self._make_one(), None)
            except BaseException as error:  # StopIteration too: raised in the loop's thread
                item = (None, None, 0.0, 0.0, error)
            while not stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[-1] is not None:
                return

    def start_prefetch(self) -> None:
        """Starts the thread (no-op if running or depth is 0); grain's restore calls it."""
        if self._depth and self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._produce, args=(self._stop,), name="device-prefetch", daemon=True)
            self._thread.start()

    def _join(self) -> bool:
        """Stops the thread and drops the batches it made ahead.

        Returns:
          False when the thread is still inside the wrapped iterator after the timeout.
        """
        if self._thread is None:
            return True
        self._stop.set()
        self._drain()
        self._thread.join(_JOIN_TIMEOUT_S)
        stopped = not self._thread.is_alive()
        self._thread = None
        self._drain()
        return stopped

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # -- checkpointing (grain's protocol for non-grain iterators) ---------------------------

    def get_state(self) -> bytes:
        """The wrapped iterator's state after the last batch the loop took, as bytes."""
        if isinstance(self._state, bytes):
            return self._state
        return json.dumps(self._state, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        """Moves the stream to `state` (from `get_state`); batches made ahead are dropped."""
        if not self._join():
            # Moving the wrapped iterator under a thread still reading it would mix batches
            # from before and after the restore.
            raise RuntimeError(
                f"The device prefetch thread did not stop within {_JOIN_TIMEOUT_S:.0f} s, so "
                "the data stream cannot be moved to the checkpoint's position.")
        native = isinstance(self._inner, grain.DatasetIterator)
        self._inner.set_state(json.loads(state) if native else state)
        self._state = copy.deepcopy(self._inner.get_state())

    def close(self) -> None:
        """Stops the thread, frees the batches in flight, then closes the wrapped iterator."""
        self._join()
        if hasattr(self._inner, "close"):
            self._inner.close()


def on_devices(host_iterator: Any, mesh: Any, depth: int) -> DevicePrefetcher:
    """The training loop's feed: host batches sharded over `mesh`, `depth` in flight.

    Args:
      host_iterator: the grain iterator of this process's host batches.
      mesh: the data mesh (`parallel.create_mesh`).
      depth: batches transferred ahead of the loop (config.data.device_prefetch); 0 =
        each batch fetched and its transfer dispatched when the loop asks for it.

    Returns:
      An iterator of device batches that checkpoints like the grain iterator.
    """
    return DevicePrefetcher(host_iterator, functools.partial(parallel.shard_batch, mesh=mesh),
                            depth)
