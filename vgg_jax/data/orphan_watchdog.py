"""Ends a data worker process soon after the process that started it has died.

grain's worker processes wait on their hand-off queues for a consumer that a `kill -9`
(an out-of-memory kill, a scheduler's hard stop) has removed; they would live on,
re-parented, holding hundreds of megabytes each, and with them the multiprocessing
resource tracker, which frees the shared-memory blocks still in flight only once every
process holding its pipe has exited. Workers ignore SIGTERM and SIGINT (the training loop
stops them itself), so nothing else would end them.

A daemon thread in the worker notices the death by the worker's parent PID changing (the
kernel re-parents an orphan), and exits the process at once. The parent's PID is the one
the pipeline recorded when it was built, not the worker's own first look at it: a spawned
worker imports its modules for seconds before its init function runs, and a trainer
killed meanwhile has already left it re-parented, to a PID that would never change again.
Polling rather than `prctl(PR_SET_PDEATHSIG)`: the kernel sends that signal when the
*thread* that forked the worker ends, and grain may start workers from a short-lived
thread.
"""

from __future__ import annotations

import os
import threading
import time

# How often a worker checks on its parent: an orphan exits within about this long.
POLL_SECONDS = 0.5
# Exit status of a worker that ended because its parent died.
ORPHAN_EXIT_STATUS = 1


def _watch(parent_pid: int, poll_seconds: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    # os._exit, not sys.exit: the main thread may be blocked on a queue that nobody reads,
    # and interpreter shutdown would wait for it (and for the queue's feeder thread).
    os._exit(ORPHAN_EXIT_STATUS)


def exit_with_parent(parent_pid: int, poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    """Starts the watchdog thread in the calling (worker) process; a worker whose parent
    is gone already exits within `poll_seconds`.

    Args:
      parent_pid: the process that started this worker (recorded there: `os.getpid()` in
        the process that builds and iterates the pipeline).
      poll_seconds: the interval between checks of the parent PID.

    Returns:
      The started daemon thread.
    """
    thread = threading.Thread(
        target=_watch, args=(parent_pid, poll_seconds), name="orphan-watchdog", daemon=True)
    thread.start()
    return thread
