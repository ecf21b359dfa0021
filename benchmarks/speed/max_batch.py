"""The largest batch per device whose train step compiles and runs.

The search starts from an estimate of what fits: XLA's memory plan of the step (the
compiled program's argument, output and temporary bytes per device) at two batch sizes
gives a fixed part and a cost per example, and the device's memory limit over those gives
the batch the plan says fits. Sizes around it are then tried for real (compiled and run
once), growing or shrinking by a factor until one fits and one does not, and bisected.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks.speed import step
from benchmarks.speed.settings import MaxBatchSettings
from vgg_jax import models
from vgg_jax.runtime import parallel
from vgg_jax.training import optim
from vgg_jax.training.state import create_train_state
from vgg_jax.training.step import jit_train_step

# What JAX takes of a GPU's memory when XLA_PYTHON_CLIENT_MEM_FRACTION is unset.
_DEFAULT_MEM_FRACTION = "unset (0.75)"


def _grown(size: int, growth: float, granularity: int) -> int:
    return max(size + granularity, int(size * growth) // granularity * granularity)


def _shrunk(size: int, growth: float, granularity: int) -> int:
    return min(size - granularity, int(size / growth) // granularity * granularity)


def search_max_batch(fits: Callable[[int], bool], start: int, granularity: int,
                     limit: int, growth: float = 2.0) -> tuple[int, int | None]:
    """Largest multiple of `granularity` for which `fits` holds, assuming monotonicity.

    Tries `start`, then grows by `growth` while sizes fit (or shrinks by it while they do
    not) until one size fits and a larger one does not, then bisects between the two.

    Args:
      fits: size -> whether it fits.
      start: the first size tried (rounded down to a multiple of `granularity`, at most
        `limit`).
      granularity: every size tried is a multiple of this.
      limit: no size above this is tried.
      growth: the factor between successive sizes before the bisection (> 1).

    Returns:
      (largest size that fits or 0, smallest size seen failing or None if none failed).
    """
    size = min(max(granularity, start // granularity * granularity),
               limit // granularity * granularity)
    if size < granularity:
        return 0, None
    good, bad = 0, None
    if fits(size):
        good = size
        while bad is None:
            larger = _grown(good, growth, granularity)
            if larger > limit:
                return good, None
            if fits(larger):
                good = larger
            else:
                bad = larger
    else:
        bad = size
        while not good:
            smaller = _shrunk(bad, growth, granularity)
            if smaller < granularity:
                return 0, bad
            if fits(smaller):
                good = smaller
            else:
                bad = smaller
    while bad - good > granularity:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def planned_peak_bytes(plan: dict[str, int]) -> int:
    """The bytes per device a compiled step holds at once by XLA's plan (`step.memory_plan`):
    its arguments, its outputs that do not reuse a donated argument, and its temporaries."""
    return (plan["argument_bytes"] + plan["output_bytes"] - plan["alias_bytes"]
            + plan["temp_bytes"])


def step_plan(config, mesh) -> Callable[[int], int]:
    """A function of the batch per device to the step's planned peak bytes per device.

    Compiles the step on abstract arguments (shapes and shardings only): nothing is
    allocated on the device, so sizes that would not fit can be planned.

    Args:
      config: the run config.
      mesh: the data mesh.

    Returns:
      per_device -> `planned_peak_bytes` of the step compiled for that batch.
    """
    import jax


    model = models.create_model_from_config(config)
    tx = optim.create_optimizer(config.train)
    replicated = parallel.replicated(mesh)
    state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        jax.eval_shape(lambda: create_train_state(model, tx, config.seed, mesh)))
    train_step = jit_train_step(model, config.data)

    def plan(per_device: int) -> int:
        batch = step.abstract_batch(config, mesh, per_device * jax.device_count())
        memory = step.memory_plan(train_step.lower(state, batch).compile())
        if memory is None:
            raise RuntimeError("XLA gives no memory analysis on this backend.")
        return planned_peak_bytes(memory)

    return plan


def estimate_max_batch(plan: Callable[[int], int], sizes: tuple[int, int],
                       memory_bytes: int) -> dict[str, Any]:
    """The batch per device that XLA's plan says fits in `memory_bytes`.

    Args:
      plan: batch per device -> planned peak bytes per device (`step_plan`).
      sizes: two batches per device to plan, smaller first; their bytes fix a line.
      memory_bytes: the memory one device gives the program (its allocator's limit).

    Returns:
      {"planned_bytes" (size -> bytes), "fixed_bytes" and "bytes_per_example" (the line),
      "memory_bytes", "estimate_per_device" (the largest batch on the line within the
      memory; 0 when not even the fixed part fits)}.
    """
    small, large = sizes
    if not 0 < small < large:
        raise ValueError(f"plan sizes {sizes}: two batch sizes, smaller first, above 0.")
    at_small, at_large = plan(small), plan(large)
    per_example = (at_large - at_small) / (large - small)
    fixed = at_small - per_example * small
    estimate = int((memory_bytes - fixed) // per_example) if per_example > 0 else 0
    return {"planned_bytes": {str(small): at_small, str(large): at_large},
            "fixed_bytes": fixed, "bytes_per_example": per_example,
            "memory_bytes": memory_bytes, "estimate_per_device": max(0, estimate)}


def search_start(estimate: dict[str, Any] | None, settings: MaxBatchSettings) -> int:
    """The first size the search tries: the estimate on the granularity (at least one
    step of it), or `settings.start` without an estimate."""
    if estimate is None:
        return settings.start
    granularity = max(1, settings.granularity)
    return max(granularity, estimate["estimate_per_device"] // granularity * granularity)


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
                   clock: Callable[[], float] = time.monotonic,
                   on_try: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Searches the largest batch per device with `fits`, logging every try.

    Args:
      settings: start, granularity, growth, limit and time budget of the search.
      fits: batch per device -> whether it fits (`step_fits` bound to a config and mesh).
      log: where each try's line goes.
      clock: seconds, for the budget.
      on_try: called after every try with the report so far (marked incomplete), so that
        it can be written at once.

    Returns:
      {"max_batch_per_device", "first_failing", "limit_reached", "complete" (False when
      the budget ended the search: the answer is then a lower bound), "tried",
      "start", "granularity", "growth", "mem_fraction"}.
    """
    tried: dict[int, bool] = {}
    deadline = clock() + settings.budget_s if settings.budget_s else None
    granularity = max(1, settings.granularity)

    def report(complete: bool, good: int, bad: int | None) -> dict[str, Any]:
        return {"max_batch_per_device": good, "first_failing": bad, "complete": complete,
                "limit_reached": complete and bad is None, "start": settings.start,
                "granularity": granularity, "growth": settings.growth,
                "tried": {str(k): v for k, v in tried.items()},
                "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                               _DEFAULT_MEM_FRACTION)}

    def so_far() -> tuple[int, int | None]:
        return (max((n for n, ok in tried.items() if ok), default=0),
                min((n for n, ok in tried.items() if not ok), default=None))

    def logged(per_device: int) -> bool:
        if deadline is not None and clock() > deadline:
            raise _OutOfTime
        ok = fits(per_device)
        tried[per_device] = ok
        log(f"  batch/device {per_device:>5}: {'fits' if ok else 'RESOURCE_EXHAUSTED'}")
        if on_try is not None:
            on_try(report(False, *so_far()))
        return ok

    try:
        good, bad = search_max_batch(logged, settings.start, granularity, settings.limit,
                                     settings.growth)
    except _OutOfTime:
        log(f"  time budget of {settings.budget_s:g} s spent: search stopped")
        return report(False, *so_far())
    return report(True, good, bad)
