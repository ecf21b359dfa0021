"""The workdir lock (vgg_jax/runtime/workdir_lock.py) in-process; two-process jobs are in
test_multihost, runs through main.py in test_main."""

import os

import pytest

from vgg_jax.runtime import workdir_lock


def test_a_lock_file_that_cannot_be_written_fails_in_one_sentence(tmp_path):
    # A lock file that opens and locks but takes no writes (/dev/full refuses them). In a
    # multi-process job this sentence is what the others are told instead of waiting.
    os.symlink("/dev/full", workdir_lock.lock_path(str(tmp_path)))
    with pytest.raises(workdir_lock.WorkdirError, match=(
            r"^Cannot write to the lock file .*run\.0\.lock \(.+\); check the space and quota "
            r"there or pass another --workdir\.$")):
        workdir_lock.acquire(str(tmp_path))
