"""The workers' shared-memory rings: slots reused, freed when taken or dropped, no stale reads."""

import faulthandler
import itertools
import os
import pickle

import numpy as np
import pytest
import small_data

from vgg_jax.data import batch_ring, pipeline, testing, train_stream

# A hang (a slot nobody frees: the worker waits, the consumer waits for its batch) ends
# the test process after this long, with every thread's traceback, instead of stalling CI.
_HANG_SECONDS = 120


@pytest.fixture
def no_hang():
    faulthandler.dump_traceback_later(_HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _handed_over(slot: batch_ring.RingSlot) -> batch_ring.RingSlot:
    return pickle.loads(pickle.dumps(slot))  # As grain's queue delivers it.


def test_slots_are_freed_when_taken_or_dropped_and_then_reused(no_hang):
    registry = batch_ring.RingRegistry()
    ring = batch_ring.WorkerRing((2, 4, 4, 3), np.uint8, slots=3, registry=registry.id)
    handed = []
    for value in range(3):
        images, slot = ring.acquire()
        images[...] = value
        handed.append(_handed_over(slot))
    name = handed[0].ring_name
    assert not os.path.exists(f"/dev/shm/{name}"), "the consumer unlinks the name on first open"
    np.testing.assert_array_equal(handed[0].take(), np.zeros((2, 4, 4, 3)))
    with pytest.raises(RuntimeError, match="taken already"):
        handed[0].take()
    images, _ = ring.acquire()  # Slot 0 again, freed by take().
    images[...] = 7
    np.testing.assert_array_equal(handed[1].take(), np.ones((2, 4, 4, 3)))
    del handed[2]  # Dropped unread (a stale batch after set_state): its slot is free too.
    ring.acquire()
    _, failed = ring.acquire()
    ring.abandon(failed)  # A batch that failed in the worker gives its slot back.
    ring.acquire()
    ring.abandon(failed)
    del handed, registry  # The pipeline is gone: its rings are unmapped, a late slot is inert.
    _, late = ring.acquire()
    with pytest.raises(RuntimeError, match="pipeline is gone"):
        _handed_over(late).take()


def test_neighbouring_examples_draw_unrelated_numbers():
    draws = [train_stream.example_rng(7, g).integers(0, 2**32, 16) for g in range(100)]
    for a, b in itertools.pairwise(draws):
        assert not set(a.tolist()) & set(b.tolist())


def test_workers_reuse_their_slots_and_a_midstream_restore_continues_the_stream(
        tmp_path, no_hang):
    testing.write_folder(str(tmp_path), {"train": 5}, grey_ids=True)
    config = small_data.data_config(source="folder", data_dir=str(tmp_path),
                                    train_scale_min=32, train_scale_max=48)
    assert config.prefetch_buffer_size == 1  # 4 slots per worker: 12 batches reuse them.
    reference = [next(it) for it in [iter(pipeline.train_dataset(
        config, global_batch_size=3, seed=0))] for _ in range(12)]
    config.num_workers = 2
    iterator = iter(pipeline.train_dataset(config, global_batch_size=3, seed=0))
    batches = [next(iterator) for _ in range(4)]
    state = iterator.get_state()
    batches += [next(iterator) for _ in range(8)]
    for got, want in zip(batches, reference):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The workers have built ahead; a restore discards those batches, whose slots must free.
    iterator.set_state(state)
    for want in reference[4:12]:
        np.testing.assert_array_equal(next(iterator)["image"], want["image"])


def test_rings_the_shared_memory_cannot_hold_fail_before_any_worker_starts(tmp_path):
    testing.write_folder(str(tmp_path), {"train": 2})
    config = small_data.data_config(source="folder", data_dir=str(tmp_path), num_workers=2)
    stats = os.statvfs(batch_ring.SHARED_MEMORY_FOLDER)
    image_bytes = config.image_size ** 2 * 3
    # Twice what the file system has free, over the two workers' rings.
    batch = 2 * stats.f_bavail * stats.f_frsize // (
        image_bytes * batch_ring.slots_for_buffer(config.prefetch_buffer_size) * 2) + 1
    with pytest.raises(ValueError, match=r"shared memory .* lower config.data.num_workers"):
        pipeline.train_dataset(config, global_batch_size=batch, seed=0)
