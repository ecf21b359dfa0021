"""The grain datasets of training and validation, built from `sources` and `transforms`.

Training stream (per process):

  TrainBatches (batch k: epoch permutations, per-example generators, the transform)
         -> workers (mp_prefetch; each builds whole batches, handed over in shared memory)
         -> WarnUndecodableOnce                      (in the consuming process)

Batch k is a pure function of (seed, k) (vgg_jax.data.train_stream): the stream is
deterministic, the same for any worker count (each worker computes whole batches, and
mp_prefetch interleaves them back in order), and its iterator state holds positions only,
which orbax saves with `grain.checkpoint.CheckpointSave(iterator)` (with workers,
grain's record of each worker's position). Processes take
interleaved positions of one global stream, so within every epoch they read disjoint
examples that together cover the split exactly once, and the augmentation of an example
does not depend on how many processes there are.

Validation runs through vgg_jax.evaluation (the single-crop protocol), which lays the split
out over the processes and pads every process's share to the same number of batches.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Any

import grain
import grain.python
import numpy as np

from vgg_jax.config_values import require
from vgg_jax.data import orphan_watchdog, train_stream, transforms
from vgg_jax.data import sources as sources_lib

logger = logging.getLogger(__name__)

# Number of independent seeds derived from the user's seed (shuffle, augmentation).
_NUM_DERIVED_SEEDS = 2
# uint8 RGB crops: bytes per pixel of a batch's images.
_RGB_CHANNELS = 3
# Arrays smaller than this travel from a worker pickled, not in shared memory.
_MIN_SHARED_MEMORY_BYTES = 1 << 16
# Batches of one worker in shared memory at a time, counted from grain's documented bound
# on its hand-off queue (per_worker_buffer_size, b): up to b in the queue, as many read
# ahead in the consuming process, and the one being taken: 2 b + 1. An estimate for a
# check that fails early, not a bound anything waits on.
_BUFFERS_IN_SHARED_MEMORY, _BATCHES_BEYOND_BUFFERS = 2, 1
# Where Linux keeps POSIX shared memory (the blocks grain hands batches over in).
SHARED_MEMORY_FOLDER = "/dev/shm"
_MIB = 1 << 20


def check_config(data_config: Any) -> None:
    """The rules of config.data: the source's, the transforms' and the pipeline's own.

    Args:
      data_config: config.data.

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    sources_lib.check_config(data_config)
    transforms.check_config(data_config)
    require(data_config.num_workers >= 0,
            f"config.data.num_workers={data_config.num_workers} must be 0 or more.")
    require(data_config.prefetch_buffer_size >= 1,
            f"config.data.prefetch_buffer_size={data_config.prefetch_buffer_size} must be at "
            "least 1.")
    require(data_config.device_prefetch >= 0,
            f"config.data.device_prefetch={data_config.device_prefetch} must be 0 (no "
            "prefetch thread) or more.")


def finish_shared_memory_release() -> None:
    """Waits until grain has unlinked the shared memory of every batch dropped so far; for
    a process about to end at once (os._exit), after its pipelines were closed.

    grain unlinks a received batch's block on a thread pool of its own
    (`SharedMemoryArray.enable_async_del`), which such an exit would cut short, leaving the
    blocks to the resource tracker (which reports them as leaked). The pool is closed: no
    batch may be dropped afterwards.
    """
    # No public name reaches grain's deletion pool.
    deletions = getattr(grain.python.SharedMemoryArray, "_del_thread_pool", None)
    if deletions is not None:
        deletions.close()
        deletions.join()


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; mark them parsed outside `absl.app.run`
    (tests, notebooks, the benchmark) so that starting workers does not raise."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _per_process(batch_size: int, process_count: int, what: str) -> int:
    if process_count < 1 or batch_size % process_count or batch_size < process_count:
        raise ValueError(
            f"{what}={batch_size} must be a positive multiple of the process count "
            f"{process_count}, so every process gets an equal share."
        )
    return batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})."
        )


def check_shared_memory(num_workers: int, worker_bytes: int,
                        folder: str = SHARED_MEMORY_FOLDER) -> None:
    """Fails at once when the workers' batches in flight cannot fit in shared memory.

    A worker hands each batch over in a shared-memory block of its own, whose pages are
    only allocated when written: blocks the file system cannot hold would kill the worker
    with SIGBUS at the first batch past the limit (a container's /dev/shm is often 64 MB).

    Args:
      num_workers: grain worker processes.
      worker_bytes: what one worker holds at most (`worker_shared_memory_bytes`).
      folder: where POSIX shared memory lives; nothing is checked if it does not exist.

    Raises:
      ValueError: one sentence with the sizes and the fixes.
    """
    if not num_workers or not os.path.isdir(folder):
        return
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if num_workers * worker_bytes > free:
        raise ValueError(
            f"The {num_workers} data workers need about "
            f"{num_workers * worker_bytes / _MIB:,.0f} MiB of shared memory "
            f"({worker_bytes / _MIB:,.1f} MiB of batches in flight each), but {folder} has "
            f"{free / _MIB:,.0f} MiB free; lower config.data.num_workers, "
            "config.data.prefetch_buffer_size or the batch size, or give the machine more "
            "shared memory (a container's --shm-size).")


def _to_iter_dataset(ds: grain.MapDataset, data_config: Any) -> grain.IterDataset:
    """Batched MapDataset -> IterDataset with the configured worker processes (one thread
    of this process when config.data.num_workers is 0) and prefetching."""
    buffer = int(data_config.prefetch_buffer_size)
    num_workers = int(data_config.num_workers)
    processes = num_workers > 0
    # Each thread produces whole batches; one per process: grain's default (16 threads,
    # 500 elements) would hold hundreds of batches of images in memory per worker. A
    # worker process decodes in its main thread: its hand-off queue
    # (per_worker_buffer_size) is its buffer, and a thread's buffer in it would only hold
    # more batches in memory.
    num_threads = 0 if processes else max(1, num_workers)
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=0 if processes else buffer)
    it = ds.to_iter_dataset(read_options)
    if processes:
        # grain copies every array of a worker's element into a shared-memory block of its
        # own by default; the small entries (labels, masks, shifts, notes) are cheaper
        # pickled than faulted in afresh, and only the images travel in a block.
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES))
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
            # Recorded here: the workers' parent is this process, which iterates the
            # pipeline (a worker that looked itself could find its parent already gone).
            worker_init_fn=functools.partial(_init_worker, parent_pid=os.getpid()),
        )
    return it


def _init_worker(worker_index: int, worker_count: int, *, parent_pid: int) -> None:
    _ignore_stop_signals(worker_index, worker_count)
    # A worker ignores stop signals, so a trainer killed with SIGKILL would strand it.
    orphan_watchdog.exit_with_parent(parent_pid)


class WarnUndecodableOnce(grain.transforms.Map):
    """Logs one warning per undecodable training file and run, where batches are consumed.

    Workers decode ahead of training, once per epoch and per worker, so warning where a
    file is decoded repeats (and may report batches never used); here, in the process that
    consumes the batches, each file is named once, however many times it is skipped
    (`train/skipped_images` counts every skip). Removes the DECODE_ERROR_KEY entry.
    """

    def __init__(self):
        self._warned: set[bytes] = set()

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        notes = batch[transforms.DECODE_ERROR_KEY]
        for note in notes[notes != b""].tolist():
            if note not in self._warned:
                self._warned.add(note)
                logger.warning(
                    "Could not decode training image %s; it is skipped (zero image, "
                    "mask=False) every time it comes up. Warned once per file.",
                    note.decode("utf-8", "backslashreplace"),
                )
        return {k: v for k, v in batch.items() if k != transforms.DECODE_ERROR_KEY}


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and a preemption's SIGTERM
    # often every process of the job. The training loop takes either as a request to save
    # and stop, which needs no new batch, and then stops the workers itself; workers that
    # died of the signal instead would only print tracebacks and leak their shared memory.
    del worker_index, worker_count
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def worker_shared_memory_bytes(data_config: Any, per_process_batch: int) -> int:
    """The shared memory one training data worker process holds at most: the batches in
    flight from it, each in a block of its own (`check_shared_memory`).

    Args:
      data_config: config.data (crop size, prefetch_buffer_size).
      per_process_batch: examples per batch of this process.

    Returns:
      Bytes of /dev/shm per worker; config.data.num_workers times this must fit there.
    """
    size = int(data_config.image_size)
    batch_bytes = per_process_batch * size * size * _RGB_CHANNELS
    batches = _BUFFERS_IN_SHARED_MEMORY * int(data_config.prefetch_buffer_size) + (
        _BATCHES_BEYOND_BUFFERS)
    return batches * batch_bytes


def train_dataset(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source: Any = None,
    transform: transforms.TrainAugmentation | None = None,
) -> grain.IterDataset:
    """The endless, shuffled, augmented training stream of this process.

    Args:
      data_config: config.data.
      global_batch_size: the batch over all processes (config.train.batch_size).
      seed: the data seed; the stream is a function of it alone (not of the workers).
      process_index: this process (jax.process_index()).
      process_count: the number of processes (jax.process_count()).
      source: the training records (default: config.data's training split); localisation
        passes its images joined with their boxes.
      transform: the per-example augmentation (default: the paper's `TrainAugmentation`);
        localisation's also makes each crop's box target.

    Returns:
      An IterDataset of per-process batches of global_batch_size // process_count:
      {"image": uint8 [b, S, S, 3], "label": int32 [b], "rgb_shift": float32 [b, 3],
      "mask": bool [b]} and any entries `transform` adds, S = config.data.image_size. Its
      iterator is checkpointable.

    Raises:
      ValueError: bad process arguments, or workers whose batches in flight the
        shared-memory file system cannot hold (one sentence with the fixes).
    """
    _check_process(process_index, process_count)
    per_process = _per_process(global_batch_size, process_count, "global_batch_size")
    if source is None:
        source = sources_lib.make_source(data_config, str(data_config.train_split))
    shuffle_seed, augment_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(_NUM_DERIVED_SEEDS)
    )
    check_shared_memory(int(data_config.num_workers),
                        worker_shared_memory_bytes(data_config, per_process))
    # Endless; every epoch is a fresh permutation, and batches straddle epoch boundaries,
    # so no example is ever dropped.
    ds = train_stream.TrainBatches(
        source, transform or transforms.TrainAugmentation(data_config), batch_size=per_process,
        shuffle_seed=shuffle_seed, augment_seed=augment_seed, process_index=process_index,
        process_count=process_count)
    return _to_iter_dataset(ds, data_config).map(WarnUndecodableOnce())


def num_examples(data_config: Any, split: str) -> int:
    """The number of examples of a split (a directory listing or TFDS metadata; no decoding).

    Args:
      data_config: config.data.
      split: the split name, e.g. config.data.train_split.

    Returns:
      The example count.
    """
    return len(sources_lib.make_source(data_config, split))
