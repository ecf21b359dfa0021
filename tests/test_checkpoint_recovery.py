"""Resuming past damaged checkpoints: the filter for the reads a failed restore leaves in
flight is in place only while restores are attempted."""

import os
import sys
import types

import numpy as np
import pytest

from vgg_jax.training import checkpoint, checkpoint_recovery


def _unraisable(error):
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                 err_msg=None, object=None)


def test_the_late_read_filter_is_on_only_while_restores_are_attempted(tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
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
        return checkpoint.read_meta(manager, step)

    step, meta = checkpoint_recovery.newest_that_restores(manager, restore)
    assert (step, meta["metrics"]) == (1, {})
    assert sys.unraisablehook is original
    assert reported == [other, other]
    assert os.listdir(tmp_path / checkpoint_recovery.DAMAGED_SUBDIR) == ["2"]
    with pytest.raises(ValueError, match="No checkpoint in .* restores"):
        checkpoint_recovery.newest_that_restores(manager, lambda s: restore(s, damaged=(1,)))
    assert sys.unraisablehook is original
    manager.close()
