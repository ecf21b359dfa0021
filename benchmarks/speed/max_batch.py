"""The largest batch per device whose train step compiles and runs."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks.speed.settings import MaxBatchSettings

# What JAX takes of a GPU's memory when XLA_PYTHON_CLIENT_MEM_FRACTION is unset.
_DEFAULT_MEM_FRACTION = "unset (0.75)"


def search_max_batch(fits: Callable[[int], bool], start: int, granularity: int,
                     limit: int) -> tuple[int, int | None]:
    """Largest multiple of `granularity` for which `fits` holds, assuming monotonicity.

    Doubles from `start` until a size fails (or passes `limit`), then bisects between the
    last size that fit and the first that failed.

    Args:
      fits: size -> whether it fits.
      start: the first size tried (rounded down to a multiple of `granularity`).
      granularity: every size tried is a multiple of this.
      limit: no size above this is tried.

    Returns:
      (largest size that fits or 0, smallest size seen failing or None if none failed).
    """
    good, bad = 0, None
    size = max(granularity, start // granularity * granularity)
    while size <= limit:
        if fits(size):
            good, size = size, size * 2
        else:
            bad = size
            break
    if bad is None:
        return good, None
    while bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an XLA error says the device ran out of memory (at compile or run time)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def step_fits(config, mesh, per_device: int) -> bool:
    """Whether the train step at `per_device` examples per device compiles and runs once.

    Args:
      config: the run config.
      mesh: the data mesh.
      per_device: batch per device.

    Returns:
      False on an out-of-memory error; other errors are raised.
    """
    import jax

    from benchmarks.speed import step

    built = None
    try:
        built = step.build_step(config, mesh, per_device * jax.device_count())
        jax.block_until_ready(built.compiled(built.state, built.batch))
        return True
    except Exception as error:  # XlaRuntimeError; OOM at compile or at run time
        if not is_out_of_memory(error):
            raise
        return False
    finally:
        del built
        gc.collect()


class _OutOfTime(Exception):
    """The search's time budget ran out before the next try."""


def find_max_batch(settings: MaxBatchSettings, fits: Callable[[int], bool],
                   log: Callable[[str], None] = print,
                   clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Searches the largest batch per device with `fits`, logging every try.

    Args:
      settings: start, granularity, limit and time budget of the search.
      fits: batch per device -> whether it fits (`step_fits` bound to a config and mesh).
      log: where each try's line goes.
      clock: seconds, for the budget.

    Returns:
      {"max_batch_per_device", "first_failing", "limit_reached", "complete" (False when
      the budget ended the search: the answer is then a lower bound), "tried",
      "granularity", "mem_fraction"}.
    """
    tried: dict[int, bool] = {}
    deadline = clock() + settings.budget_s if settings.budget_s else None

    def logged(per_device: int) -> bool:
        if deadline is not None and clock() > deadline:
            raise _OutOfTime
        ok = fits(per_device)
        tried[per_device] = ok
        log(f"  batch/device {per_device:>5}: {'fits' if ok else 'RESOURCE_EXHAUSTED'}")
        return ok

    granularity = max(1, settings.granularity)
    complete = True
    try:
        good, bad = search_max_batch(logged, settings.start, granularity, settings.limit)
    except _OutOfTime:
        complete = False
        good = max((n for n, ok in tried.items() if ok), default=0)
        bad = min((n for n, ok in tried.items() if not ok), default=None)
        log(f"  time budget of {settings.budget_s:g} s spent: search stopped")
    return {"max_batch_per_device": good, "first_failing": bad, "complete": complete,
            "limit_reached": complete and bad is None, "granularity": granularity,
            "tried": {str(k): v for k, v in tried.items()},
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                           _DEFAULT_MEM_FRACTION)}
