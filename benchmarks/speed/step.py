"""The real train step on synthetic device batches: rate, FLOPs, MFU, memory.

What is timed is exactly what training runs: `jit_train_step` (state donated), the
state from `create_train_state` and `optim.create_optimizer`, a batch assembled by
`parallel.shard_batch` (uint8 images, normalised on the device). The step is compiled
ahead of time (compile time on its own), warmed up, then timed step by step with
`block_until_ready` (median reported) and once more back to back, the way the training
loop dispatches it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from benchmarks.speed import peaks
from benchmarks.speed.settings import StepSettings
from vgg_jax import models
from vgg_jax.models import flops
from vgg_jax.runtime import parallel
from vgg_jax.training import optim
from vgg_jax.training.state import create_train_state
from vgg_jax.training.step import jit_train_step

# Standard deviation (0-255 units) of the synthetic batch's per-image colour offset, about
# the size of the recipe's PCA colour shift (std 0.1 x eigenvalue 0.2175 x 255 = 5.5 along
# its first component). The value does not change the timing; it keeps the input realistic.
SYNTHETIC_RGB_SHIFT_STD = 5.0


@dataclasses.dataclass
class BuiltStep:
    """A compiled step with what it runs on.

    Attributes:
      state: the train state (donated by each call: use the one the call returns).
      batch: a sharded synthetic batch.
      compiled: the AOT-compiled step, (state, batch) -> (state, metrics).
      trace_s: seconds to trace and lower.
      compile_s: seconds XLA compiled.
      model: the flax model.
    """

    state: Any
    batch: Any
    compiled: Any
    trace_s: float
    compile_s: float
    model: Any


def synthetic_batch(config, per_process: int, seed: int = 0) -> dict[str, Any]:
    """A host batch with the pipeline's keys, dtypes and shapes (random pixels).

    Args:
      config: the run config (crop size, classes).
      per_process: examples of this process.
      seed: numpy seed.

    Returns:
      {"image": uint8 NHWC, "label": int32, "rgb_shift": float32 [n, 3], "mask": bool}.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    size = config.data.image_size
    return {
        "image": rng.integers(0, 256, (per_process, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, config.model.num_classes, (per_process,), dtype=np.int32),
        "rgb_shift": rng.normal(0.0, SYNTHETIC_RGB_SHIFT_STD, (per_process, 3)).astype(
            np.float32),
        "mask": np.ones((per_process,), dtype=bool),
    }


def abstract_batch(config, mesh, batch_per_call: int) -> dict[str, Any]:
    """The shapes, dtypes and shardings of a global batch, with no data (for planning).

    Args:
      config: the run config (crop size, classes).
      mesh: the data mesh.
      batch_per_call: global batch of one step call.

    Returns:
      {key: jax.ShapeDtypeStruct} with `synthetic_batch`'s keys and dtypes, sharded as
      `parallel.shard_batch` shards a batch.
    """
    import jax


    sharding = parallel.batch_sharded(mesh)
    one = synthetic_batch(config, 1)
    return {key: jax.ShapeDtypeStruct((batch_per_call, *value.shape[1:]), value.dtype,
                                      sharding=sharding)
            for key, value in one.items()}


def build_step(config, mesh, batch_per_call: int) -> BuiltStep:
    """The train state, a sharded synthetic batch and the AOT-compiled step.

    Args:
      config: the run config (after `settings.apply_shape`).
      mesh: the data mesh.
      batch_per_call: global batch of one step call (batch_size / grad_accum_steps).

    Returns:
      The compiled step with its state and batch.
    """
    import jax


    model = models.create_model_from_config(config)
    tx = optim.create_optimizer(config.train)
    state = create_train_state(model, tx, config.seed, mesh)
    # As training does: the learning rate is pushed into the optimiser state.
    state = state.replace(opt_state=optim.set_learning_rate(
        state.opt_state, config.train.learning_rate))
    batch = parallel.shard_batch(synthetic_batch(config, batch_per_call // jax.process_count()),
                                 mesh)
    step = jit_train_step(model, config.data)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return BuiltStep(state, batch, compiled, traced - start, done - traced, model)


def time_step(compiled, state, batch, warmup: int, steps: int):
    """Times the compiled step: per step with a sync (median), then back to back.

    Args:
      compiled: the compiled step, (state, batch) -> (state, metrics); donates the state.
      state: the train state (consumed; use the returned one).
      batch: the sharded batch, reused for every step.
      warmup: untimed steps first.
      steps: timed steps of each pass.

    Returns:
      (the final state, per-step seconds, mean seconds per step dispatched back to back).
    """
    import jax

    for _ in range(warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    # As the training loop runs: no host sync between steps, one at the end.
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return state, times, (time.perf_counter() - start) / steps


def device_memory() -> tuple[int | None, int | None]:
    """(peak bytes in use, bytes limit) over the local devices, None where unknown."""
    import jax

    found, limits = [], []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            found.append(stats["peak_bytes_in_use"])
            if "bytes_limit" in stats:
                limits.append(stats["bytes_limit"])
    return (max(found) if found else None), (min(limits) if limits else None)


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of one call of the compiled program, or None."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        value = float(cost.get("flops", 0.0))
        return value if value > 0 else None
    except Exception:  # Not every backend implements cost analysis.
        return None


def memory_plan(compiled) -> dict[str, int] | None:
    """XLA's planned argument/output/alias/temporary bytes per device, or None."""
    try:
        ma = compiled.memory_analysis()
        return {"argument_bytes": ma.argument_size_in_bytes,
                "output_bytes": ma.output_size_in_bytes,
                "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes}
    except Exception:  # Not every backend implements memory analysis.
        return None


def step_figures(built: BuiltStep, times: list[float], back_to_back: float,
                 batch_per_call: int, settings: StepSettings) -> dict[str, Any]:
    """The step's figures from its timings (see docs/benchmarks.md for each field).

    Args:
      built: the compiled step.
      times: per-step seconds (synced).
      back_to_back: mean seconds per step without syncs.
      batch_per_call: global batch of one call.
      settings: the peak to use, and the steps timed.

    Returns:
      The "step" section of the JSON.
    """
    import jax


    median = statistics.median(times)
    device = jax.devices()[0]
    n_devices = jax.device_count()
    flops_per_image = flops.train_flops_per_image(built.model)
    images_per_s = batch_per_call / median
    tflops = images_per_s * flops_per_image / 1e12
    dtype_name = jax.numpy.dtype(built.model.dtype).name
    peak = peaks.peak_for(device.platform, device.device_kind, dtype_name,
                          settings.peak_tflops)
    counted = xla_flops(built.compiled)
    peak_bytes, limit_bytes = device_memory()
    return {
        "batch": batch_per_call, "batch_per_device": batch_per_call // n_devices,
        "precision": dtype_name, "steps_timed": settings.steps,
        "trace_s": built.trace_s, "compile_s": built.compile_s,
        "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
        "step_s_back_to_back": back_to_back,
        "images_per_s": images_per_s, "images_per_s_back_to_back": batch_per_call / back_to_back,
        "forward_macs_per_image": flops.forward_macs(built.model),
        "train_flops_per_image": flops_per_image,
        # XLA's own count, per device program: a cross-check of the analytic figure.
        "xla_flops_per_image": (counted * n_devices / batch_per_call) if counted else None,
        "tflops": tflops, "tflops_per_device": tflops / n_devices,
        "peak_tflops_per_device": peak, "mfu": peaks.mfu(tflops / n_devices, peak),
        "peak_memory_bytes": peak_bytes, "memory_limit_bytes": limit_bytes,
        "xla_memory_plan": memory_plan(built.compiled),
    }


def measure_step(config, mesh, batch_per_call: int, settings: StepSettings):
    """Builds and times the real train step on synthetic data.

    Args:
      config: the run config (after `settings.apply_shape`).
      mesh: the data mesh.
      batch_per_call: global batch of one step call.
      settings: steps, warm-up and peak.

    Returns:
      (the "step" figures, the built step with its state advanced), the latter for the loop.
    """
    built = build_step(config, mesh, batch_per_call)
    state, times, back_to_back = time_step(
        built.compiled, built.state, built.batch, settings.warmup, settings.steps)
    built.state = state
    return step_figures(built, times, back_to_back, batch_per_call, settings), built
