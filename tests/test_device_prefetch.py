"""The device prefetch thread: same stream, exact resume from consumed batches, timings."""

import json
import threading
import time

import grain
import jax
import numpy as np
import pytest
from etils import epath

from vgg_jax.runtime import device_prefetch, parallel
from vgg_jax.runtime.device_prefetch import DevicePrefetcher


def _host_iterator(length=40):
    # Small grain pipeline with a real checkpointable state.
    return iter(grain.MapDataset.range(length).shuffle(seed=3).batch(4).to_iter_dataset())


def _put(host):
    return jax.device_put(np.asarray(host))


def _values(batches):
    return [np.asarray(b).tolist() for b in batches]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_stream_is_grains_own(depth):
    expected = _values(_host_iterator())
    prefetcher = DevicePrefetcher(_host_iterator(), _put, depth)
    assert _values(prefetcher) == expected
    assert prefetcher.stats.batches == len(expected)
    prefetcher.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_state_is_that_of_consumed_batches(depth):
    prefetcher = DevicePrefetcher(_host_iterator(), _put, depth)
    taken = [next(prefetcher) for _ in range(3)]
    time.sleep(0.2)  # let the thread run ahead as far as it can
    state = prefetcher.get_state()
    rest = _values(prefetcher)
    prefetcher.close()
    # A fresh plain grain iterator moved to the saved state continues with batch 4:
    plain = _host_iterator()
    plain.set_state(json.loads(state))
    assert _values(plain) == rest
    # ... and so does a fresh prefetcher.
    resumed = DevicePrefetcher(_host_iterator(), _put, depth)
    resumed.set_state(state)
    assert _values(resumed) == rest
    assert len(taken) == 3 and len(rest) == 7


def test_saved_with_grains_checkpoint_handler_like_the_plain_iterator(tmp_path):
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "plain").mkdir()
    (tmp_path / "ahead").mkdir()
    plain = _host_iterator()
    for _ in range(2):
        next(plain)
    handler.save(epath.Path(tmp_path / "plain"), args=grain.checkpoint.CheckpointSave(plain))
    prefetcher = DevicePrefetcher(_host_iterator(), _put, 2)
    for _ in range(2):
        next(prefetcher)
    handler.save(epath.Path(tmp_path / "ahead"), args=grain.checkpoint.CheckpointSave(prefetcher))
    prefetcher.close()
    name = "process_0-of-1.json"
    assert (tmp_path / "ahead" / name).read_text() == (tmp_path / "plain" / name).read_text()
    # A checkpoint of a plain run restores into a prefetching one, and vice versa.
    restored = handler.restore(epath.Path(tmp_path / "plain"),
                               args=grain.checkpoint.CheckpointRestore(
                                   DevicePrefetcher(_host_iterator(), _put, 2)))
    assert _values(restored) == _values(plain)
    restored.close()


def test_sharded_batches_arrive_on_the_mesh():
    mesh = parallel.create_mesh()
    batches = iter(grain.MapDataset.range(16).map(
        lambda i: {"image": np.full((2, 2, 3), i, np.uint8)}).batch(4).to_iter_dataset())
    prefetcher = DevicePrefetcher(batches, lambda b: parallel.shard_batch(b, mesh), 2)
    first = next(prefetcher)
    assert isinstance(first["image"], jax.Array) and first["image"].sharding.mesh == mesh
    prefetcher.close()


class _Failing:
    def __init__(self):
        self.calls = 0

    def get_state(self):
        return {"calls": self.calls}

    def __next__(self):
        self.calls += 1
        if self.calls == 3:
            raise OSError("disk gone")
        return np.zeros(2)


def test_an_error_on_the_thread_is_raised_in_the_loop():
    prefetcher = DevicePrefetcher(_Failing(), _put, 2)
    next(prefetcher), next(prefetcher)
    with pytest.raises(OSError, match="disk gone"):
        next(prefetcher)
    prefetcher.close()


class _Slow:
    """An endless host iterator taking `delay` seconds per batch."""

    def __init__(self, delay):
        self.delay = delay

    def get_state(self):
        return {}

    def __next__(self):
        time.sleep(self.delay)
        return np.zeros(2)


def _slow_put(delay):
    def put(host):
        time.sleep(delay)
        return jax.device_put(host)
    return put


def test_blocked_time_is_split_between_data_and_transfer():
    # Slow data, fast transfer: the loop waits on the data.
    data_bound = DevicePrefetcher(_Slow(0.05), _put, 2)
    for _ in range(6):
        next(data_bound)
    data_bound.close()
    s = data_bound.stats
    assert s.blocked_data_s > 5 * s.blocked_transfer_s and s.blocked_s > 0.15
    # Fast data, slow transfer: the loop waits on the transfer.
    transfer_bound = DevicePrefetcher(_Slow(0.0), _slow_put(0.05), 2)
    for _ in range(6):
        next(transfer_bound)
    transfer_bound.close()
    s = transfer_bound.stats
    assert s.blocked_transfer_s > 5 * s.blocked_data_s and s.transfer_s > 0.25


def test_a_thread_ahead_hides_the_batch_time_behind_the_step():
    batch_s, step_s, steps = 0.03, 0.1, 5
    prefetcher = DevicePrefetcher(_Slow(batch_s), _put, 2)
    next(prefetcher)
    for _ in range(steps):
        time.sleep(step_s)  # a "step" three times as long as making a batch
        next(prefetcher)
    prefetcher.close()
    # Only the first batch was waited for in full. Without the thread every batch would be
    # (at least 0.03 + 5 x 0.03 s); the bound allows each later one half of that, a margin
    # for a loaded machine, while the thread has 70 ms of every step to make the next.
    assert prefetcher.stats.blocked_s < batch_s + steps * batch_s / 2, prefetcher.stats


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="depth=-1"):
        DevicePrefetcher(_host_iterator(), _put, -1)


class _StuckOnce:
    """A host iterator whose next batch hangs until released (a worker that stalls)."""

    def __init__(self):
        self._inner = _host_iterator()
        self.release = threading.Event()
        self.stuck = threading.Event()
        self.hang = True

    def __next__(self):
        if self.hang:
            self.hang = False
            self.stuck.set()
            self.release.wait()
        return next(self._inner)

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)


def test_a_thread_that_outlives_its_join_stops_the_restore_and_stays_stopped(monkeypatch):
    monkeypatch.setattr(device_prefetch, "_JOIN_TIMEOUT_S", 0.2)
    host = _StuckOnce()
    start_state = json.dumps(host.get_state()).encode()
    prefetcher = DevicePrefetcher(host, _put, depth=2)
    prefetcher.start_prefetch()
    assert host.stuck.wait(5)
    with pytest.raises(RuntimeError, match="did not stop"):
        prefetcher.set_state(start_state)
    # A new thread starts; the stuck one, once released, must not feed its batch too.
    prefetcher.start_prefetch()
    host.release.set()
    time.sleep(0.3)
    got = _values(prefetcher)
    prefetcher.close()
    # The stuck thread took one batch out of the stream and dropped it: 9 of the 10 arrive,
    # each once (with a revived stale thread all 10 would).
    expected = _values(_host_iterator())
    assert len(got) == 9 and all(batch in expected for batch in got)
