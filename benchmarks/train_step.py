"""Speed of the real training step (and of the whole training loop) of a VGG config.

  # One H100, VGG-16 (D) at 224x224, bf16, batch 256, against torchvision's vgg16:
  python benchmarks/train_step.py --config=configs/vgg_d.py --batch-size=256 \
      --precision=bf16 --compare-torch --json=bench_d.json
  # The whole loop: JPEG decode + augmentation (grain workers) + transfer + step:
  python benchmarks/train_step.py --config=configs/vgg_d.py --batch-size=256 --mode=loop \
      --config.data.num_workers=14
  # Largest batch per device that fits (GPU only):
  python benchmarks/train_step.py --config=configs/vgg_d.py --max-batch --steps=5
  # CPU smoke run, seconds:
  python benchmarks/train_step.py --config=configs/vgg_d.py --config.model.width_divisor=16 \
      --config.model.fc_features=64 --image-size=32 --batch-size=8 --steps=3

What is timed is exactly what `train.train_and_evaluate` runs: `train.make_train_step`
jitted with the train state donated, the state from `train.create_train_state` and
`optim.create_optimizer`, the batch assembled by `parallel.shard_batch` (uint8 images,
normalised on the device). The step is compiled ahead of time (so compile time is
measured on its own), warmed up, then timed step by step with `block_until_ready`
(median reported) and once more back to back, the way the training loop dispatches it.

FLOPs are analytic (`vgg_jax.flops`: 6 x forward MACs per image, counted from the model's
layer shapes); MFU divides the achieved rate by the device's dense peak (a small table
of known GPUs for the chosen precision, or --peak-tflops). On CPU MFU is n/a unless
--peak-tflops is given.

--compare-torch times torchvision's VGG of the same configuration (A, B, D, E =
vgg11/13/16/19; narrowed nets use torchvision's VGG class with scaled channels and a
matching head) with bf16 autocast, channels_last, torch.compile, cudnn.benchmark and a
fused/foreach SGD step with momentum and weight decay (benchmarks/torch_reference.py). It
runs first, in a child process, so that neither framework's memory pool squeezes the other.

--mode=loop adds the whole input pipeline (`pipeline.train_dataset` over a folder of
JPEGs, written to a temp dir unless --folder is given) and reports the fraction of the
synthetic-data rate it reaches, and whether waiting for data or the step bounds it.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from benchmarks import torch_reference

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "vgg_d.py"),
    "Run config (configs/vgg_a.py ... vgg_e.py); any field can be overridden, e.g. "
    "--config.model.width_divisor=8.",
    lock_config=True,
)
_MODE = flags.DEFINE_enum(
    "mode", "step", ["step", "loop"],
    "step: the train step on synthetic device data; loop: also the whole training loop "
    "with the real input pipeline.")
_BATCH = flags.DEFINE_integer(
    "batch-size", 0, "Global batch (all devices); 0 = config.train.batch_size.")
_IMAGE = flags.DEFINE_integer("image-size", 0, "Crop side; 0 = config.data.image_size.")
_PRECISION = flags.DEFINE_enum(
    "precision", "auto", ["auto", "bf16", "fp32"],
    "Compute dtype (config.model.compute_dtype); auto = bf16 on GPU/TPU, fp32 on CPU. "
    "Parameters and optimiser state stay fp32.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (each timing pass).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float(
    "peak-tflops", 0.0,
    "Dense peak TFLOP/s of one device for MFU; 0 = the table of known GPUs (n/a on CPU).")
_COMPARE_TORCH = flags.DEFINE_bool(
    "compare-torch", False, "Also time torchvision's VGG of the same configuration.")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch-compile", True, "Use torch.compile in --compare-torch (falls back to eager).")
_FOLDER = flags.DEFINE_string(
    "folder", None, "--mode=loop: an image folder with train/<class>/<image> (default: "
    "write JPEGs to a temp dir).")
_NUM_IMAGES = flags.DEFINE_integer(
    "num-images", 0, "--mode=loop: JPEGs to write; 0 = max(2 x batch, 64).")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop-steps", 0, "--mode=loop: timed loop steps; 0 = max(--steps, 5 x the batches the "
    "workers can hold prefetched), so batches prefetched during warm-up cannot inflate it.")
_JPEG_SIZE = flags.DEFINE_string(
    "jpeg-size", "375x500", "--mode=loop: HxW of the written JPEGs (ImageNet's typical photo).")
_MAX_BATCH = flags.DEFINE_bool(
    "max-batch", False, "Search the largest batch per device that compiles and runs "
                        "(GPU/TPU; skipped on CPU).")
_MAX_BATCH_LIMIT = flags.DEFINE_integer(
    "max-batch-limit", 4096, "--max-batch: largest batch per device tried.")
_MAX_BATCH_START = flags.DEFINE_integer(
    "max-batch-start", 128, "--max-batch: first batch per device tried (then doubled or bisected).")
_MAX_BATCH_STEP = flags.DEFINE_integer(
    "max-batch-granularity", 16, "--max-batch: the answer is a multiple of this.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")

# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's data sheets, (bf16, tf32).
# fp32 convolutions and matmuls run as TF32 on these GPUs under JAX's default precision.
# Matched by substring of device.device_kind, first match wins (specific names first).
KNOWN_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.4, 494.7),  # SXM; the issue measured ~790 for a large bf16 matmul
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
)
_PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# The paper's net: FC6/FC7 width and ImageNet's class count; other values are named in the
# model name printed and written to --json.
PAPER_FC_FEATURES = 4096
PAPER_NUM_CLASSES = 1000
# Standard deviation (0-255 units) of the synthetic batch's per-image colour offset, about
# the size of the recipe's PCA colour shift (std 0.1 x eigenvalue 0.2175 x 255 = 5.5 along
# its first component). The value does not change the timing; it keeps the input realistic.
SYNTHETIC_RGB_SHIFT_STD = 5.0
_GIB = 1024**3


# --------------------------------------------------------------------------------------
# Helpers (no jax backend needed)
# --------------------------------------------------------------------------------------


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / _GIB:.2f} GiB" if n >= 0.1 * _GIB else f"{n / 1024**2:.1f} MiB"


def _fmt_rate(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def known_peak_tflops(device_kind: str, dtype_name: str) -> float | None:
    """Dense peak TFLOP/s of one device for `dtype_name` from the table, or None.

    Args:
      device_kind: jax's device.device_kind, e.g. "NVIDIA H100 80GB HBM3".
      dtype_name: the compute dtype; bfloat16/float16 read the bf16 column, anything
        else the TF32 one.

    Returns:
      The first KNOWN_PEAK_TFLOPS entry whose name is in `device_kind`, or None.
    """
    for name, bf16, tf32 in KNOWN_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype_name in ("bfloat16", "float16") else tf32
    return None


def apply_flags(config) -> None:
    """Writes --batch-size, --image-size and --precision into the (locked) config.

    Also raises the scales to at least the crop and points the data source at an image
    folder (--folder, or the one --mode=loop writes), whatever the config names.

    Args:
      config: the run config from --config, changed in place.
    """
    if _BATCH.value:
        config.train.batch_size = _BATCH.value
    if _IMAGE.value:
        config.data.image_size = _IMAGE.value
    if _PRECISION.value != "auto":
        config.model.compute_dtype = _PRECISION_DTYPES[_PRECISION.value]
    # The training scale must be at least the crop; raise it for crops above 256.
    size = config.data.image_size
    config.data.train_scale_min = max(config.data.train_scale_min, size)
    config.data.train_scale_max = max(config.data.train_scale_max, size)
    config.data.eval_scale = max(config.data.eval_scale, size)
    # The step reads no data set and the loop reads an image folder (written later when
    # --folder is not given), whatever data source the config names.
    config.data.source = "folder"
    config.data.data_dir = _FOLDER.value or "<written by the benchmark>"


def _model_name(config) -> str:
    m = config.model
    name = f"VGG-{m.version}"
    extras = []
    if m.width_divisor != 1:
        extras.append(f"width/{m.width_divisor}")
    if m.fc_features != PAPER_FC_FEATURES:
        extras.append(f"fc {m.fc_features}")
    if m.num_classes != PAPER_NUM_CLASSES:
        extras.append(f"{m.num_classes} classes")
    return name + (f" ({', '.join(extras)})" if extras else "")


# --------------------------------------------------------------------------------------
# The JAX train step
# --------------------------------------------------------------------------------------


def _synthetic_batch(config, per_process: int, seed: int = 0) -> dict[str, Any]:
    """A host batch with the pipeline's keys, dtypes and shapes (random pixels)."""
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


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def build_step(config, mesh, batch_per_call: int):
    """The train state, a sharded synthetic batch and the AOT-compiled step.

    Args:
      config: the run config (after `apply_flags`).
      mesh: the data mesh.
      batch_per_call: global batch of one step call (batch_size / grad_accum_steps).

    Returns:
      (state, batch, compiled step, {"trace_s", "compile_s"}, the model).
    """
    import jax

    from vgg_jax import models, optim, parallel, train

    model = models.create_model_from_config(config)
    tx = optim.create_optimizer(config.train)
    state = train.create_train_state(model, tx, config.seed, mesh)
    # As train_and_evaluate does: the learning rate is pushed into the optimiser state.
    state = state.replace(opt_state=optim.set_learning_rate(
        state.opt_state, config.train.learning_rate))
    host = _synthetic_batch(config, batch_per_call // jax.process_count())
    batch = parallel.shard_batch(host, mesh)
    step = train.jit_train_step(model, config.data)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return state, batch, compiled, {"trace_s": traced - start, "compile_s": done - traced}, model


def _device_memory() -> tuple[int | None, int | None]:
    """(peak bytes in use, bytes limit) over the local devices, None where unknown."""
    import jax

    peaks, limits = [], []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
            if "bytes_limit" in stats:
                limits.append(stats["bytes_limit"])
    return (max(peaks) if peaks else None), (min(limits) if limits else None)


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        value = float(cost.get("flops", 0.0))
        return value if value > 0 else None
    except Exception:  # Not every backend implements cost analysis.
        return None


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
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
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
    pipelined = (time.perf_counter() - start) / steps
    return state, times, pipelined


def measure_step(config, mesh, batch_per_call: int) -> tuple[dict[str, Any], Any, Any]:
    """Times the real train step on synthetic data.

    Args:
      config: the run config (after `apply_flags`).
      mesh: the data mesh.
      batch_per_call: global batch of one step call.

    Returns:
      (figures for the JSON and `print_step`, the compiled step, the train state), the
      last two for `measure_loop`.
    """
    import jax

    from vgg_jax import flops

    state, batch, compiled, compile_times, model = build_step(config, mesh, batch_per_call)
    state, times, pipelined = time_step(compiled, state, batch, _WARMUP.value, _STEPS.value)
    median = statistics.median(times)
    device = jax.devices()[0]
    n_devices = jax.device_count()
    macs = flops.forward_macs(model)
    flops_per_image = flops.train_flops_per_image(model)
    images_per_s = batch_per_call / median
    tflops = images_per_s * flops_per_image / 1e12
    dtype_name = jax.numpy.dtype(model.dtype).name
    peak = _PEAK.value or (
        known_peak_tflops(device.device_kind, dtype_name) if device.platform != "cpu" else None)
    mfu = tflops / n_devices / peak if peak else None
    xla_flops = _xla_flops(compiled)
    memory = _device_memory()
    memory_plan = None
    try:
        ma = compiled.memory_analysis()
        memory_plan = {
            "argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
            "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
        }
    except Exception:  # Not every backend implements memory analysis.
        pass
    results = {
        "batch": batch_per_call,
        "batch_per_device": batch_per_call // n_devices,
        "precision": dtype_name,
        "trace_s": compile_times["trace_s"],
        "compile_s": compile_times["compile_s"],
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_back_to_back": pipelined,
        "images_per_s": images_per_s,
        "images_per_s_back_to_back": batch_per_call / pipelined,
        "forward_macs_per_image": macs,
        "train_flops_per_image": flops_per_image,
        # XLA's own count, per device program: a cross-check of the analytic figure.
        "xla_flops_per_image": (xla_flops * n_devices / batch_per_call) if xla_flops else None,
        "tflops": tflops,
        "tflops_per_device": tflops / n_devices,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "peak_memory_bytes": memory[0],
        "memory_limit_bytes": memory[1],
        "xla_memory_plan": memory_plan,
    }
    return results, compiled, state


def print_step(r: dict[str, Any], on_cpu: bool) -> None:
    """Prints the figures of `measure_step`.

    Args:
      r: what `measure_step` returns first.
      on_cpu: whether the device is a CPU (explains a missing MFU).
    """
    print(f"compile           : {r['compile_s']:.2f} s (+ {r['trace_s']:.2f} s trace/lower)")
    print(f"step (median)     : {1e3 * r['step_s_median']:.2f} ms over {_STEPS.value} steps "
          f"(min {1e3 * r['step_s_min']:.2f}, max {1e3 * r['step_s_max']:.2f}); back to back "
          f"{1e3 * r['step_s_back_to_back']:.2f} ms/step")
    print(f"images/s          : {_fmt_rate(r['images_per_s'])} "
          f"(back to back {_fmt_rate(r['images_per_s_back_to_back'])})")
    xla = r["xla_flops_per_image"]
    print(f"FLOPs per image   : {r['train_flops_per_image'] / 1e9:.4g} GFLOP = 6 x "
          f"{r['forward_macs_per_image'] / 1e9:.4g} GMAC forward"
          + (f" (XLA cost analysis: {xla / 1e9:.4g} GFLOP)" if xla else ""))
    print(f"achieved          : {r['tflops']:.4g} TFLOP/s "
          f"({r['tflops_per_device']:.4g} per device)")
    if r["mfu"] is not None:
        print(f"MFU               : {100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g} "
              "TFLOP/s dense peak per device")
    else:
        why = "CPU" if on_cpu else "device not in the peak table"
        print(f"MFU               : n/a ({why}; pass --peak-tflops)")
    plan = r["xla_memory_plan"]
    plan_text = ""
    if plan:
        plan_text = (f"; XLA plan per device: arguments {_fmt_bytes(plan['argument_bytes'])}, "
                     f"temporaries {_fmt_bytes(plan['temp_bytes'])}")
    peak = r["peak_memory_bytes"]
    print(f"peak memory       : {_fmt_bytes(peak)}"
          + (" (no memory_stats on this device)" if peak is None else
             f" (device peak, of a {_fmt_bytes(r['memory_limit_bytes'])} limit)")
          + plan_text)


# --------------------------------------------------------------------------------------
# The whole loop with the real input pipeline
# --------------------------------------------------------------------------------------


def _write_jpegs(folder: str, count: int) -> None:
    from vgg_jax.data import testing

    height, width = (int(v) for v in _JPEG_SIZE.value.lower().split("x"))
    per_class = max(1, math.ceil(count / 2))
    testing.write_folder(folder, {"train": per_class}, classes=("class0", "class1"),
                         size=(height, width), seed=0)


def _loop_steps(config) -> int:
    if _LOOP_STEPS.value:
        return _LOOP_STEPS.value
    workers = max(1, int(config.data.num_workers))
    prefetched = workers * max(1, int(config.data.prefetch_buffer_size))
    return max(_STEPS.value, 5 * prefetched)


def measure_loop(config, mesh, compiled, state, batch_per_call: int, synthetic_rate: float):
    """Runs the training loop's inner body over the real pipeline.

    Args:
      config: the run config (after `apply_flags`); its data section is pointed at the
        folder read.
      mesh: the data mesh.
      compiled: the compiled step from `measure_step`.
      state: the train state from `measure_step` (consumed; use the returned one).
      batch_per_call: global batch of one step call.
      synthetic_rate: images/s of the step on synthetic data, the 100% mark.

    Returns:
      (figures for the JSON and `print_loop`, the final train state).
    """
    import jax

    from vgg_jax import parallel
    from vgg_jax.data import pipeline

    with tempfile.TemporaryDirectory(prefix="vgg_bench_") as tmp:
        folder = _FOLDER.value
        if not folder:
            folder = tmp
            count = _NUM_IMAGES.value or max(2 * batch_per_call, 64)
            start = time.perf_counter()
            _write_jpegs(folder, count)
            print(f"wrote {count} {_JPEG_SIZE.value} JPEGs in {time.perf_counter() - start:.1f} s")
        data = config.data
        data.data_dir = folder
        data.eval_split = data.train_split  # only the training split is read
        dataset = pipeline.train_dataset(
            data, global_batch_size=batch_per_call, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        iterator = iter(dataset)
        start = time.perf_counter()
        for _ in range(max(_WARMUP.value, 1)):  # worker start-up and first batches
            state, metrics = compiled(state, parallel.shard_batch(next(iterator), mesh))
        jax.block_until_ready((state, metrics))
        startup = time.perf_counter() - start

        wait = dispatch = 0.0
        steps = _loop_steps(config)
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            host = next(iterator)
            t1 = time.perf_counter()
            # Exactly the training loop's body: transfer, then an async step.
            state, metrics = compiled(state, parallel.shard_batch(host, mesh))
            t2 = time.perf_counter()
            wait += t1 - t0
            dispatch += t2 - t1
        t3 = time.perf_counter()
        jax.block_until_ready((state, metrics))
        end = time.perf_counter()
        # Stops grain's worker processes and frees their prefetched batches.
        if hasattr(iterator, "close"):
            iterator.close()
        del iterator, host, metrics
        gc.collect()
    wall = end - start
    rate = steps * batch_per_call / wall
    fraction = rate / synthetic_rate
    tail = end - t3
    if fraction >= 0.9:
        bound = "step (the input pipeline keeps up)"
    elif wait >= max(dispatch, tail):
        bound = "input pipeline (the loop waits for batches)"
    elif dispatch >= tail:
        bound = "host transfer/dispatch"
    else:
        bound = "step"
    results = {
        "folder": _FOLDER.value or "<temp JPEGs>",
        "num_workers": int(config.data.num_workers),
        "startup_s": startup,
        "steps": steps,
        "wall_s": wall,
        # What the same steps take on synthetic data: the step's share of the wall time.
        "step_time_at_synthetic_rate_s": steps * batch_per_call / synthetic_rate,
        "images_per_s": rate,
        "fraction_of_synthetic": fraction,
        "data_wait_s": wait,
        "transfer_dispatch_s": dispatch,
        "final_sync_s": tail,
        "data_wait_fraction": wait / wall,
        "bound_by": bound,
    }
    return results, state


def print_loop(r: dict[str, Any]) -> None:
    """Prints the figures of `measure_loop`.

    Args:
      r: what `measure_loop` returns first.
    """
    print(f"loop images/s     : {_fmt_rate(r['images_per_s'])} = "
          f"{100 * r['fraction_of_synthetic']:.1f}% of the synthetic-data rate "
          f"over {r['steps']} steps ({r['num_workers']} grain workers, start-up "
          f"{r['startup_s']:.1f} s)")
    print(f"loop time split   : waiting for data {r['data_wait_s']:.2f} s "
          f"({100 * r['data_wait_fraction']:.0f}%), transfer+dispatch "
          f"{r['transfer_dispatch_s']:.2f} s, final sync {r['final_sync_s']:.2f} s "
          f"of {r['wall_s']:.2f} s; the steps alone take "
          f"{r['step_time_at_synthetic_rate_s']:.2f} s on synthetic data")
    print(f"bound by          : {r['bound_by']}")


# --------------------------------------------------------------------------------------
# Largest batch that fits
# --------------------------------------------------------------------------------------


def search_max_batch(fits, start: int, granularity: int, limit: int) -> tuple[int, int | None]:
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


def find_max_batch(config, mesh) -> dict[str, Any] | None:
    """Largest batch per device whose step compiles and runs (doubling, then bisection).

    Args:
      config: the run config (after `apply_flags`).
      mesh: the data mesh.

    Returns:
      {"max_batch_per_device", "limit_reached", "tried", ...}, or None on CPU (skipped).
    """
    import jax

    if jax.default_backend() == "cpu":
        print("max batch         : skipped on CPU (host memory is not a device limit)")
        return None
    n = jax.device_count()
    granularity = max(1, _MAX_BATCH_STEP.value)
    tried: dict[int, bool] = {}

    def fits(per_device: int) -> bool:
        state = batch = compiled = None
        try:
            state, batch, compiled, _, _ = build_step(config, mesh, per_device * n)
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            ok = True
        except Exception as error:  # XlaRuntimeError; OOM at compile or at run time
            if not _is_out_of_memory(error):
                raise
            ok = False
        finally:
            del state, batch, compiled
            gc.collect()
        tried[per_device] = ok
        print(f"  batch/device {per_device:>5}: {'fits' if ok else 'RESOURCE_EXHAUSTED'}",
              flush=True)
        return ok

    good, bad = search_max_batch(fits, _MAX_BATCH_START.value, granularity, _MAX_BATCH_LIMIT.value)
    if bad is None:
        print(f"max batch         : >= {good} per device (limit {_MAX_BATCH_LIMIT.value})")
        return {"max_batch_per_device": good, "limit_reached": True, "tried": tried}
    print(f"max batch         : {good} per device (multiple of {granularity}; "
          f"{bad} does not fit)")
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    print(f"                    with XLA_PYTHON_CLIENT_MEM_FRACTION={fraction or 'unset (0.75)'}"
          " of device memory for JAX; training gets the same unless it sets it too")
    return {"max_batch_per_device": good, "limit_reached": False, "tried": tried,
            "mem_fraction": fraction}


# --------------------------------------------------------------------------------------
# PyTorch reference (timed in a child process by benchmarks/torch_reference.py)
# --------------------------------------------------------------------------------------


def _torch_spec(config) -> dict[str, Any]:
    from vgg_jax.convert import TORCHVISION_NAMES
    from vgg_jax.models import TOTAL_STRIDE, canonical_version

    m, d, t = config.model, config.data, config.train
    version = canonical_version(m.version)
    return {
        "version": version, "torchvision_name": TORCHVISION_NAMES[version],
        "width_divisor": int(m.width_divisor),
        "fc_features": int(m.fc_features), "num_classes": int(m.num_classes),
        "dropout": float(m.dropout_rate), "image_size": int(d.image_size),
        "head_window": int(d.image_size) // TOTAL_STRIDE,
        "compute_dtype": str(m.compute_dtype), "batch": int(t.batch_size // t.grad_accum_steps),
        "lr": float(t.learning_rate), "momentum": float(t.momentum),
        "weight_decay": float(t.weight_decay), "mean_rgb": tuple(d.mean_rgb),
        "std_rgb": tuple(d.std_rgb), "steps": int(_STEPS.value), "warmup": int(_WARMUP.value),
        "compile": bool(_TORCH_COMPILE.value),
    }


def run_torch(config) -> dict[str, Any] | None:
    """--compare-torch: checks support and imports, then times PyTorch in a child process.

    Args:
      config: the run config (after `apply_flags`).

    Returns:
      The figures of `torch_reference.torch_train_step_benchmark`, or None when
      torchvision has no such net (C, A-LRN) or torch cannot be imported.
    """
    from vgg_jax.convert import TORCHVISION_NAMES
    from vgg_jax.models import canonical_version

    version = canonical_version(config.model.version)
    if version not in TORCHVISION_NAMES:
        print(f"PyTorch comparison: unsupported for VGG-{version} (torchvision has A, B, D, E "
              "= vgg11/13/16/19; no C with 1x1 convolutions, no A-LRN); skipped.")
        return None
    # torch is imported only in the child: loading its CUDA libraries (cuDNN, cuBLAS) into
    # this process could clash with the versions JAX's CUDA plugin loads.
    print("timing PyTorch (child process) ...", flush=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        # Pickled by reference: the child imports benchmarks.torch_reference through the
        # sys.path it inherits (the repository root inserted above).
        result = pool.apply(torch_reference.torch_train_step_benchmark, (_torch_spec(config),))
        # A clean exit of the child (rather than the terminate() of leaving the block)
        # releases its semaphores, and frees its device memory before JAX starts.
        pool.close()
        pool.join()
    if "import_error" in result:
        print(f"PyTorch comparison: torch/torchvision not importable ({result['import_error']}); "
              "skipped. Install them in this environment (pip install torch torchvision) to "
              "compare.")
        return None
    return result


def print_torch(r: dict[str, Any], jax_rate: float) -> None:
    """Prints the PyTorch figures and the JAX / PyTorch speed ratio.

    Args:
      r: what `run_torch` returns.
      jax_rate: images/s of the JAX step.
    """
    print(f"PyTorch           : {r['model']} {r['torch_version']} on {r['device']}, "
          f"{r['precision']}, {r['mode']}, channels_last")
    print(f"PyTorch step      : {1e3 * r['step_s_median']:.2f} ms median, "
          f"{_fmt_rate(r['images_per_s'])} images/s, first step (compile) "
          f"{r['first_step_s']:.1f} s, peak memory {_fmt_bytes(r['peak_memory_bytes'])}")
    print(f"JAX / PyTorch     : {jax_rate / r['images_per_s']:.2f}x")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    """Runs the benchmarks the flags ask for, prints them and writes --json."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = flags.FLAGS.config
    apply_flags(config)

    # PyTorch first, before JAX touches (and preallocates) the accelerator's memory.
    torch_results = run_torch(config) if _COMPARE_TORCH.value else None

    import jax

    from vgg_jax import config_checks, parallel

    try:
        config_checks.validate_config(config, device_count=jax.device_count(),
                                      process_count=jax.process_count(), check_data=False)
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")
    if _STEPS.value < 1:
        sys.exit("--steps must be at least 1.")
    mesh = parallel.create_mesh()
    batch_per_call = config.train.batch_size // config.train.grad_accum_steps
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    print(f"{_model_name(config)} {config.data.image_size}x{config.data.image_size}, global "
          f"batch {batch_per_call} on {jax.device_count()} x {device.device_kind} "
          f"({device.platform}), jax {jax.__version__}", flush=True)

    step_results, compiled, state = measure_step(config, mesh, batch_per_call)
    print(f"precision         : {step_results['precision']} compute, float32 parameters")
    print_step(step_results, on_cpu)
    results: dict[str, Any] = {
        "model": _model_name(config), "version": config.model.version,
        "image_size": config.data.image_size, "device_kind": device.device_kind,
        "platform": device.platform, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.relpath(sys.argv[0], _REPO)] + sys.argv[1:]),
        "step": step_results,
    }

    if _MODE.value == "loop":
        loop_results, state = measure_loop(
            config, mesh, compiled, state, batch_per_call, step_results["images_per_s"])
        print_loop(loop_results)
        results["loop"] = loop_results
    del state, compiled
    gc.collect()

    if torch_results is not None:
        print_torch(torch_results, step_results["images_per_s"])
        ratio = step_results["images_per_s"] / torch_results["images_per_s"]
        results["torch"] = dict(torch_results, jax_over_torch=ratio)
    if _MAX_BATCH.value:
        results["max_batch"] = find_max_batch(config, mesh)

    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
