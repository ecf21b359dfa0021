"""Resuming past damaged checkpoints: the filter for the reads a failed restore leaves in
flight is in place while restores are attempted, and stays once one has failed."""

import logging
import os
import sys
import types

import numpy as np
import pytest

from vgg_jax.training import checkpoint, checkpoint_recovery
from vgg_jax.weights import run_checkpoint


def _unraisable(error):
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                 err_msg=None, object=None)


def _asyncio_record(message, error):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 0, message, None,
                             (type(error), error, None))


def test_the_late_read_filter_stays_once_a_restore_failed(tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", [])
    original = sys.unraisablehook
    late_read, other = _unraisable(RuntimeError("Event loop is closed")), _unraisable(KeyError())
    manager = checkpoint.create_manager(str(tmp_path))
    assert checkpoint_recovery.newest_that_restores(manager, None) is None  # nothing to try
    for step in (1, 2):
        checkpoint.save(manager, step, params={"w": np.zeros(2, np.float32)},
                        meta={"config": {}, "metrics": {}})
    manager.wait_until_finished()

    def restore(step, damaged=(2,)):
        # What an abandoned read reports while restores run: dropped; anything else is not.
        sys.unraisablehook(late_read)
        sys.unraisablehook(other)
        if step in damaged:
            raise OSError(f"step {step} is truncated")
        return run_checkpoint.read_meta(manager, step)

    # A healthy resume leaves the hooks as they were.
    step, meta = checkpoint_recovery.newest_that_restores(manager, lambda s: restore(s, ()))
    assert (step, meta["metrics"]) == (2, {})
    assert sys.unraisablehook is original and not asyncio_logger.filters
    assert reported == [other]

    # A failed one: tensorstore completes the abandoned reads whenever it gets to them,
    # after the walk too, so the filters stay; every other report still goes through.
    reported.clear()
    step, meta = checkpoint_recovery.newest_that_restores(manager, restore)
    assert (step, meta["metrics"]) == (1, {})
    assert reported == [other, other]
    assert os.listdir(tmp_path / checkpoint_recovery.DAMAGED_SUBDIR) == ["2"]
    sys.unraisablehook(late_read)
    sys.unraisablehook(other)
    assert reported == [other, other, other]
    read_error = ValueError('OUT_OF_RANGE: Error reading "w/0.0.0" in OCDBT database')
    assert not asyncio_logger.filter(
        _asyncio_record("Task exception was never retrieved\nfuture: <Task>", read_error))
    assert not asyncio_logger.filter(
        _asyncio_record("Future exception was never retrieved", read_error))
    wrapped = Exception("Encountered error while reading array index: (slice(0, 3, 1),)")
    assert not asyncio_logger.filter(
        _asyncio_record("Task exception was never retrieved\nfuture: <Task>", wrapped))
    assert asyncio_logger.filter(
        _asyncio_record("Task exception was never retrieved", KeyError("x")))
    assert asyncio_logger.filter(_asyncio_record("Unclosed event loop", read_error))

    with pytest.raises(ValueError, match="No checkpoint in .* restores"):
        checkpoint_recovery.newest_that_restores(manager, lambda s: restore(s, damaged=(1,)))
    assert len(asyncio_logger.filters) == 1  # one filter, however many failures
    manager.close()
