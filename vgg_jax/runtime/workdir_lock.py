"""One training run per workdir: a kernel file lock held for the run's whole life.

Two runs writing into one workdir would delete each other's checkpoints and interleave
their metrics. Each training process takes an exclusive `flock` on
`<workdir>/run.<process index>.lock` before any work, and writes its host and PID into the
file so that a second run can name the holder. The kernel drops the lock when the holding
process ends, however it ends (`kill -9` included), so a lock never outlives its run and
there is nothing to clean up by hand; the file itself stays (deleting a lock file races
with the next run opening it).

Several hosts: every process of a multi-host job locks its own file in the shared workdir,
so the processes of one job never contend. A second job finds some of its processes' files
held (at least process 0's, but not those of processes the first job lacked), so the
processes agree on the outcome through jax.distributed's key-value store: each publishes
whether it got its lock, and every process fails with the first failure's sentence (in
process order), or all go on. Without this, a process that got its lock would start
training and wait in its first collective for peers that had already exited. This needs a
shared file system whose `flock` works across hosts (NFS does; Lustre needs the `flock`
mount option); where `flock` is not supported the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time

from absl import logging

from vgg_jax.runtime import parallel


class WorkdirError(RuntimeError):
    """The workdir cannot take this run: not writable, or another run holds it."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    """The lock file of one process of a run in `workdir`."""
    return os.path.join(workdir, f"run.{process_index}.lock")


def check_writable(workdir: str) -> None:
    """Creates `workdir` if needed and proves it, and the directories already in it (a
    resumed run's checkpoints/, wandb/), writable by writing and removing a file:
    permission bits alone miss immutable directories, read-only mounts and root's
    exemption from the bits.

    Args:
      workdir: the run's directory.

    Raises:
      WorkdirError: one sentence naming the directory and the reason.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        directories = [workdir] + [entry.path for entry in os.scandir(workdir)
                                   if entry.is_dir(follow_symlinks=False)]
        for directory in directories:
            with tempfile.TemporaryFile(dir=directory):
                pass
    except OSError as error:
        path = error.filename or workdir
        raise WorkdirError(
            f"Cannot write to the workdir {workdir} ({path}: {error.strerror}); make it "
            "writable or pass another --workdir.") from None


class WorkdirLock:
    """An acquired lock; `release` (or the process's end) frees it."""

    def __init__(self, path: str, file):
        self.path = path
        self._file = file

    def release(self) -> None:
        """Frees the lock (closing the file releases the flock)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._file = None


def _holder(file) -> str:
    file.seek(0)
    try:
        holder = json.loads(file.read() or "{}")
    except json.JSONDecodeError:
        holder = {}
    if not holder:
        return "holder unknown"
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')}")


def acquire(workdir: str, process_index: int = 0, process_count: int = 1) -> WorkdirLock:
    """Checks that `workdir` is writable and takes this process's lock on it; with several
    processes, all of them agree: every one raises the same error, or none does.

    Args:
      workdir: the run's directory (created if needed).
      process_index: this process (jax.process_index()); each locks its own file.
      process_count: processes in the job (jax.process_count()); above 1 the outcome is
        agreed through jax.distributed (`parallel.first_failure`).

    Returns:
      The held WorkdirLock.

    Raises:
      WorkdirError: the workdir is not writable, or another live run holds it (on any
        process of the job: every process raises the first failure's sentence).
    """
    lock, error = None, ""
    try:
        lock = _acquire_own(workdir, process_index)
    except WorkdirError as own_error:
        error = str(own_error)
    if process_count > 1:
        error = parallel.first_failure("workdir_lock", error)
    if error:
        if lock is not None:
            lock.release()
        raise WorkdirError(error)
    return lock


def _acquire_own(workdir: str, process_index: int) -> WorkdirLock:
    """This process's lock (see `acquire`), without agreeing with the other processes."""
    check_writable(workdir)
    path = lock_path(workdir, process_index)
    try:
        file = open(path, "a+")  # noqa: SIM115 (held open for the run's life)
    except OSError as error:  # e.g. a lock file left by another user's run
        raise WorkdirError(f"Cannot open the lock file {path} ({error.strerror}); make it "
                           "writable or pass another --workdir.") from None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            logging.warning("Cannot lock %s (%s): this file system does not support flock, "
                            "so nothing stops a second run from using this workdir.",
                            path, error.strerror)
            return WorkdirLock(path, file)
        holder = _holder(file)
        file.close()
        raise WorkdirError(
            f"The workdir {workdir} is in use by another training run ({holder}); wait for "
            "it to end, stop it, or pass another --workdir.") from None
    try:
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        file.flush()
    except OSError as error:  # e.g. a full disk or quota, which the check's empty file passed
        file.close()
        raise WorkdirError(f"Cannot write to the lock file {path} ({error.strerror}); check "
                           "the space and quota there or pass another --workdir.") from None
    return WorkdirLock(path, file)
