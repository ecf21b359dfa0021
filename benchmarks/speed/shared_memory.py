"""The POSIX shared memory (/dev/shm) a benchmark needs, has, and has mapped.

grain's worker processes hand batches over in shared memory, which lives in /dev/shm, a
RAM file system whose size a container often caps far below the host's memory. A block
that does not fit is not refused when created: the worker dies of SIGBUS when it first
writes past the limit. So the GPU run checks the free space before its data workers start,
and the loop benchmark records what its process has mapped before, during and after each
way of feeding the step, which shows whether a finished pipeline let its blocks go.
"""

from __future__ import annotations

import os

# Where Linux keeps POSIX shared memory (multiprocessing.shared_memory's and grain's blocks).
SHARED_MEMORY_FOLDER = "/dev/shm"
# Of the free space, what the data workers may plan on: the rest is left for grain's own
# small blocks, the queues' semaphores and other processes of the machine.
USABLE_FRACTION = 0.9


def mapped(maps_path: str = "/proc/self/maps") -> dict[str, int]:
    """What this process has mapped from /dev/shm (a block unlinked already counts too).

    Args:
      maps_path: the process's memory map listing (Linux).

    Returns:
      {"blocks": distinct files mapped, "bytes": the size of their mappings}; zeros
      where the listing does not exist.
    """
    if not os.path.exists(maps_path):
        return {"blocks": 0, "bytes": 0}
    files, size = set(), 0
    with open(maps_path) as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith(SHARED_MEMORY_FOLDER + "/"):
                continue
            start, end = (int(v, 16) for v in fields[0].split("-"))
            files.add(fields[5].strip())
            size += end - start
    return {"blocks": len(files), "bytes": size}


def space(folder: str = SHARED_MEMORY_FOLDER) -> dict[str, int] | None:
    """Free and total bytes of the shared-memory file system, or None where it is missing."""
    if not os.path.isdir(folder):
        return None
    stats = os.statvfs(folder)
    return {"free_bytes": stats.f_bavail * stats.f_frsize,
            "total_bytes": stats.f_blocks * stats.f_frsize}


def workers_that_fit(wanted: int, bytes_per_worker: int, free_bytes: int | None) -> int:
    """The most data workers, up to `wanted`, whose shared memory fits in the free space.

    Args:
      wanted: the workers the run would use.
      bytes_per_worker: the shared memory one worker holds at most.
      free_bytes: free bytes of /dev/shm (None: no such file system to check).

    Returns:
      `wanted` when they fit in USABLE_FRACTION of the free space, else fewer (0: the
      batches are made by a thread of the consuming process, with no shared memory).
    """
    if free_bytes is None or bytes_per_worker <= 0:
        return wanted
    return max(0, min(wanted, int(free_bytes * USABLE_FRACTION) // bytes_per_worker))
