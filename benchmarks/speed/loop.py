"""The whole training loop over the real input pipeline, and where its time goes.

The step is fed exactly as training feeds it (`device_prefetch.on_devices`: grain's
batches sharded onto the mesh, `depth` of them in flight on a background thread), or by
grain's own device prefetch (`grain.experimental.device_put`), or with no prefetch; each
way is timed over the same compiled step. The loop's wall time splits into the time it
was blocked waiting for data, blocked waiting for a transfer, and on the step (dispatch,
which waits when the device is busy, plus the final sync).

Each feeder reads a pipeline of its own, dropped before the next one starts: a pipeline's
workers and their shared memory live as long as it does, so one pipeline reused by three
feeders would hold three sets of workers' shared memory at once. What the process has
mapped from /dev/shm before, during and after each feeder is recorded.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.speed import photos, shared_memory
from benchmarks.speed.settings import LoopSettings
from vgg_jax.data import pipeline
from vgg_jax.runtime import device_prefetch, parallel

# The loop reaches the synthetic rate "enough" above this fraction: the step bounds it.
STEP_BOUND_FRACTION = 0.9
# Written JPEGs per step's batch (at least): twice, so an epoch boundary is crossed.
_IMAGES_PER_BATCH = 2
_MIN_IMAGES = 64
# Timed loop steps per batch grain's workers can hold ready, so that batches made
# during warm-up cannot inflate the rate.
_STEPS_PER_PREFETCHED = 5


def loop_steps(settings: LoopSettings, steps: int, num_workers: int,
               prefetch_buffer_size: int) -> int:
    """Timed loop steps: the setting, else max(steps, 5 x the batches workers hold).

    Args:
      settings: the loop settings (`loop_steps` 0 = automatic).
      steps: the step benchmark's timed steps.
      num_workers: grain worker processes.
      prefetch_buffer_size: batches each worker holds ready.

    Returns:
      How many steps to time.
    """
    if settings.loop_steps:
        return settings.loop_steps
    prefetched = max(1, num_workers) * max(1, prefetch_buffer_size)
    return max(steps, _STEPS_PER_PREFETCHED * prefetched)


def bound_by(fraction: float, blocked_data_s: float | None, blocked_transfer_s: float | None,
             blocked_input_s: float, step_s: float) -> str:
    """What limits the loop: "step", "data", "transfer" or "input" (data or transfer).

    Args:
      fraction: the loop's rate over the synthetic-data rate.
      blocked_data_s: time the loop waited for batches being made (None: not split).
      blocked_transfer_s: time the loop waited for transfers (None: not split).
      blocked_input_s: time the loop waited for its next batch in all.
      step_s: time the loop spent dispatching steps and in the final sync.

    Returns:
      "step" when the loop reaches STEP_BOUND_FRACTION of the synthetic rate or waits on
      the step most; else the input side it waited on most.
    """
    if fraction >= STEP_BOUND_FRACTION or step_s >= blocked_input_s:
        return "step"
    if blocked_data_s is None or blocked_transfer_s is None:
        return "input"
    return "data" if blocked_data_s >= blocked_transfer_s else "transfer"


@dataclasses.dataclass
class _Timing:
    blocked: float = 0.0
    dispatch: float = 0.0
    final_sync: float = 0.0
    wall: float = 0.0


def _feeder(name: str, dataset, mesh, depth: int):

    if name == "grain":
        import grain

        # Single process: one sharding for every key equals shard_batch's global batch.
        return iter(grain.experimental.device_put(
            dataset, parallel.batch_sharded(mesh), device_buffer_size=depth))
    return device_prefetch.on_devices(iter(dataset), mesh, depth if name == "thread" else 0)


def _run(feeder, compiled, state, warmup: int, steps: int):
    """Warm-up, then `steps` timed steps; returns (state, start-up s, timing, stats before)."""
    import jax

    start = time.perf_counter()
    for _ in range(max(warmup, 1)):  # worker start-up and first batches
        state, metrics = compiled(state, next(feeder))
    jax.block_until_ready((state, metrics))
    startup = time.perf_counter() - start
    before = dataclasses.replace(feeder.stats) if hasattr(feeder, "stats") else None
    timing = _Timing()
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(feeder)
        t1 = time.perf_counter()
        state, metrics = compiled(state, batch)
        timing.blocked += t1 - t0
        timing.dispatch += time.perf_counter() - t1
    t3 = time.perf_counter()
    jax.block_until_ready((state, metrics))
    end = time.perf_counter()
    timing.final_sync, timing.wall = end - t3, end - start
    return state, startup, timing, before


def measure_feeder(name: str, dataset, mesh, compiled, state, batch_per_call: int,
                   synthetic_rate: float, warmup: int, steps: int, depth: int):
    """Times the loop with one way of feeding the step.

    Args:
      name: "thread", "grain" or "none" (settings.FEEDERS).
      dataset: the grain IterDataset of host batches.
      mesh: the data mesh.
      compiled: the compiled step.
      state: the train state (consumed; use the returned one).
      batch_per_call: global batch of one step call.
      synthetic_rate: images/s of the step on synthetic data, the 100% mark.
      warmup: untimed steps first (at least 1).
      steps: timed steps.
      depth: batches in flight for the prefetching feeders.

    Returns:
      (the figures of this feeder, the train state); the figures hold what the process
      had mapped from /dev/shm at the end of the timed steps ("dev_shm_during").
    """
    feeder = _feeder(name, dataset, mesh, depth)
    try:
        state, startup, t, before = _run(feeder, compiled, state, warmup, steps)
        stats = feeder.stats if before is not None else None
        during = shared_memory.mapped()
    finally:
        if hasattr(feeder, "close"):
            feeder.close()
        del feeder
        gc.collect()
    rate = steps * batch_per_call / t.wall
    split = {}
    if stats is not None:
        split = {"blocked_on_data_s": stats.blocked_data_s - before.blocked_data_s,
                 "blocked_on_transfer_s": stats.blocked_transfer_s - before.blocked_transfer_s,
                 "data_s": stats.data_s - before.data_s,
                 "transfer_s": stats.transfer_s - before.transfer_s}
    step_s = t.dispatch + t.final_sync
    figures = {
        "feeder": name, "depth": depth if name != "none" else 0, "steps": steps,
        "startup_s": startup, "wall_s": t.wall, "images_per_s": rate,
        "fraction_of_synthetic": rate / synthetic_rate,
        # What the same steps take on synthetic data: the step's share of the wall time.
        "step_time_at_synthetic_rate_s": steps * batch_per_call / synthetic_rate,
        "blocked_on_input_s": t.blocked,
        "blocked_on_data_s": split.get("blocked_on_data_s"),
        "blocked_on_transfer_s": split.get("blocked_on_transfer_s"),
        "on_step_s": step_s, "dispatch_s": t.dispatch, "final_sync_s": t.final_sync,
        "data_s": split.get("data_s"), "transfer_s": split.get("transfer_s"),
        "blocked_fraction": t.blocked / t.wall,
        "dev_shm_during": during,
    }
    figures["bound_by"] = bound_by(figures["fraction_of_synthetic"],
                                   figures["blocked_on_data_s"],
                                   figures["blocked_on_transfer_s"], t.blocked, step_s)
    return figures, state


def _image_count(settings: LoopSettings, batch_per_call: int) -> int:
    return settings.num_images or max(_IMAGES_PER_BATCH * batch_per_call, _MIN_IMAGES)


def measure_loop(config, mesh, compiled, state, batch_per_call: int, synthetic_rate: float,
                 settings: LoopSettings, steps: int, warmup: int,
                 on_feeder: Callable[[dict[str, Any]], None] | None = None):
    """Runs the training loop's feed and step over the real pipeline, for each feeder.

    Each feeder reads a pipeline of its own, built when it starts and dropped (workers
    stopped, their shared memory let go) before the next one starts.

    Args:
      config: the run config (after `settings.apply_shape`); its data section is pointed
        at the folder read.
      mesh: the data mesh.
      compiled: the compiled step from `step.measure_step`.
      state: the train state (consumed; use the returned one).
      batch_per_call: global batch of one step call.
      synthetic_rate: images/s of the step on synthetic data, the 100% mark.
      settings: folder, images, steps, feeders, depth.
      steps: the step benchmark's timed steps (a floor for the loop's).
      warmup: untimed steps of each feeder.
      on_feeder: called with the results so far after each feeder (to write them at once).

    Returns:
      ({"folder", "num_workers", "dev_shm_before" (what the process had mapped from
      /dev/shm before the first pipeline), "feeders": {name: figures, each with
      "dev_shm_after", what was mapped once its pipeline was dropped}, and the first
      feeder's figures at the top level}, the final train state).
    """
    import jax


    data = config.data
    timed = loop_steps(settings, steps, int(data.num_workers), int(data.prefetch_buffer_size))
    results: dict[str, Any] = {"folder": settings.folder or "<temp photo-crop JPEGs>",
                               "num_workers": int(data.num_workers),
                               "dev_shm_before": shared_memory.mapped(), "feeders": {}}
    with tempfile.TemporaryDirectory(prefix="vgg_bench_") as tmp:
        folder = settings.folder
        if not folder:
            folder = tmp
            count = _image_count(settings, batch_per_call)
            start = time.perf_counter()
            photos.write_photo_folder(folder, {"train": count}, size=settings.jpeg_size)
            print(f"wrote {count} {settings.jpeg_size[0]}x{settings.jpeg_size[1]} photo-crop "
                  f"JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        data.data_dir = folder
        data.eval_split = data.train_split  # only the training split is read
        for name in settings.feeders:
            dataset = pipeline.train_dataset(
                data, global_batch_size=batch_per_call, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
            figures, state = measure_feeder(
                name, dataset, mesh, compiled, state, batch_per_call, synthetic_rate,
                warmup, timed, settings.depth)
            del dataset  # its workers' shared memory goes with it
            gc.collect()
            figures["dev_shm_after"] = shared_memory.mapped()
            results["feeders"][name] = figures
            if len(results["feeders"]) == 1:
                results.update(figures)
            if on_feeder is not None:
                on_feeder(results)
    return results, state
