"""Speed of the real training step (and of the whole training loop) of a VGG config.

  # One H100/H200, VGG-16 (D) at 224x224, bf16, batch 256, against torchvision's vgg16:
  python benchmarks/train_step.py --config=configs/vgg_d.py --batch_size=256 \
      --precision=bf16 --compare_torch --json=bench_d.json
  # The whole loop: JPEG decode + augmentation (grain workers) + transfer + step, fed by
  # our device prefetch thread, by grain's own device prefetch and with none:
  python benchmarks/train_step.py --config=configs/vgg_d.py --batch_size=256 --mode=loop \
      --config.data.num_workers=14 --feeders=thread,grain,none
  # Largest batch per device that fits (GPU only), from XLA's memory plan's estimate:
  python benchmarks/train_step.py --config=configs/vgg_d.py --mode=none --max_batch \
      --max_batch_granularity=32 --max_batch_growth=1.15
  # CPU smoke run, seconds:
  python benchmarks/train_step.py --config=configs/vgg_d.py --config.model.width_divisor=16 \
      --config.model.fc_features=64 --image_size=32 --batch_size=8 --steps=3

This file is the command line only: it turns flags into the settings of
benchmarks/speed/settings.py and calls the parts in benchmarks/speed/ (step, loop,
max_batch, torch_compare), which read no flags. docs/benchmarks.md explains every figure.
With --json, the file is rewritten as each figure is measured (benchmarks/speed/json_out.py).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from benchmarks.speed import (
    compiles,
    json_out,
    loop,
    max_batch,
    report,
    settings,
    step,
    torch_compare,
)
from vgg_jax import config_checks
from vgg_jax.runtime import parallel

# The largest-batch budget counts from here (the process's start, imports done).
_STARTED = time.monotonic()
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's net: FC6/FC7 width and ImageNet's class count; other values are named in the
# model name printed and written to --json.
PAPER_FC_FEATURES = 4096
PAPER_NUM_CLASSES = 1000

config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "vgg_d.py"),
    "Run config (configs/vgg_a.py ... vgg_e.py); any field can be overridden, e.g. "
    "--config.model.width_divisor=8.",
    lock_config=True,
)
_MODE = flags.DEFINE_enum(
    "mode", "step", ["step", "loop", "none"],
    "step: the train step on synthetic device data; loop: also the whole training loop "
    "with the real input pipeline; none: neither (with --max_batch: the search alone).")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (all devices); 0 = config.train.batch_size.")
_IMAGE = flags.DEFINE_integer("image_size", 0, "Crop side; 0 = config.data.image_size.")
_PRECISION = flags.DEFINE_enum(
    "precision", "auto", ["auto", *settings.PRECISION_DTYPES],
    "Compute dtype (config.model.compute_dtype); auto = bf16 on GPU/TPU, fp32 on CPU. "
    "Parameters and optimiser state stay fp32.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (each timing pass).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0,
    "Dense peak TFLOP/s of one device for MFU; 0 = the table of known GPUs (n/a on CPU).")
_COMPARE_TORCH = flags.DEFINE_bool(
    "compare_torch", False, "Also time torchvision's VGG of the same configuration.")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", True, "Use torch.compile in --compare_torch (falls back to eager).")
_TORCH_REQUIRE_CUDA = flags.DEFINE_bool(
    "torch_require_cuda", False,
    "--compare_torch: skip the comparison at once if torch sees no CUDA device, rather "
    "than time torch on the CPU (the GPU run sets it).")
_FOLDER = flags.DEFINE_string(
    "folder", None, "--mode=loop: an image folder with train/<class>/<image> (default: "
    "write photo-crop JPEGs to a temp dir).")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 0, "--mode=loop: JPEGs to write; 0 = max(2 x batch, 64).")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 0, "--mode=loop: timed loop steps; 0 = max(--steps, 5 x the batches the "
    "workers can hold prefetched), so batches prefetched during warm-up cannot inflate it.")
_JPEG_SIZE = flags.DEFINE_string(
    "jpeg_size", "375x500", "--mode=loop: HxW of the written JPEGs (ImageNet's typical photo).")
_FEEDERS = flags.DEFINE_string(
    "feeders", "thread",
    "--mode=loop: comma-separated ways to feed the step, each timed: thread (the training "
    "loop's device prefetch thread), grain (grain.experimental.device_put), none.")
_DEPTH = flags.DEFINE_integer(
    "depth", -1, "--mode=loop: batches in flight to the device; -1 = "
    "config.data.device_prefetch.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Search the largest batch per device that compiles and runs "
                        "(GPU/TPU; skipped on CPU).")
_MAX_BATCH_LIMIT = flags.DEFINE_integer(
    "max_batch_limit", 4096, "--max_batch: largest batch per device tried.")
_MAX_BATCH_START = flags.DEFINE_integer(
    "max_batch_start", 128, "--max_batch: first batch per device tried when the device "
                            "gives no memory limit to estimate from.")
_MAX_BATCH_STEP = flags.DEFINE_integer(
    "max_batch_granularity", 16, "--max_batch: the answer is a multiple of this.")
_MAX_BATCH_GROWTH = flags.DEFINE_float(
    "max_batch_growth", 2.0, "--max_batch: factor between sizes tried before the bisection.")
_MAX_BATCH_PLAN = flags.DEFINE_string(
    "max_batch_plan_sizes", "64,128",
    "--max_batch: two batches per device whose XLA memory plans give the estimate the "
    "search starts from.")
_MAX_BATCH_MEMORY = flags.DEFINE_integer(
    "max_batch_memory_bytes", 0,
    "--max_batch: device memory to estimate for; 0 = the device's limit (a CPU has none: "
    "no estimate there unless given).")
_MAX_BATCH_BUDGET = flags.DEFINE_float(
    "max_batch_budget_s", 0.0, "--max_batch: no new size is tried this many seconds after "
                               "the process started; 0 = no limit.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")


def model_name(config) -> str:
    """"VGG-D (width/8, fc 64)": the net and how it differs from the paper's."""
    m = config.model
    extras = []
    if m.width_divisor != 1:
        extras.append(f"width/{m.width_divisor}")
    if m.fc_features != PAPER_FC_FEATURES:
        extras.append(f"fc {m.fc_features}")
    if m.num_classes != PAPER_NUM_CLASSES:
        extras.append(f"{m.num_classes} classes")
    return f"VGG-{m.version}" + (f" ({', '.join(extras)})" if extras else "")


def _settings(config):
    """The flags as explicit settings; a bad value exits with one sentence."""
    try:
        loop_settings = settings.LoopSettings(
            folder=_FOLDER.value, num_images=_NUM_IMAGES.value, loop_steps=_LOOP_STEPS.value,
            jpeg_size=settings.parse_size(_JPEG_SIZE.value),
            feeders=settings.parse_feeders(_FEEDERS.value),
            depth=_DEPTH.value if _DEPTH.value >= 0 else int(config.data.device_prefetch))
        plan_sizes = settings.parse_sizes(_MAX_BATCH_PLAN.value)
    except ValueError as error:
        sys.exit(f"Flag error: {error}")
    if _STEPS.value < 1:
        sys.exit("--steps must be at least 1.")
    if _MAX_BATCH_GROWTH.value <= 1:
        sys.exit(f"--max_batch_growth={_MAX_BATCH_GROWTH.value} must be above 1.")
    return (settings.RunShape(_BATCH.value, _IMAGE.value, _PRECISION.value),
            settings.StepSettings(_STEPS.value, _WARMUP.value, _PEAK.value), loop_settings,
            settings.MaxBatchSettings(_MAX_BATCH_START.value, _MAX_BATCH_STEP.value,
                                      _MAX_BATCH_LIMIT.value, _MAX_BATCH_BUDGET.value,
                                      _MAX_BATCH_GROWTH.value, plan_sizes,
                                      _MAX_BATCH_MEMORY.value))


def _print(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


def _find_max_batch(config, mesh, max_settings: settings.MaxBatchSettings,
                    out: json_out.JsonOut) -> None:
    """The estimate from XLA's memory plan, then the search from it (not on a CPU)."""
    import jax

    memory = max_settings.memory_bytes or step.device_memory()[1]
    estimate = None
    if memory:
        print(f"max batch estimate: XLA's memory plan at {max_settings.plan_sizes[0]} and "
              f"{max_settings.plan_sizes[1]} per device ...", flush=True)
        estimate = max_batch.estimate_max_batch(max_batch.step_plan(config, mesh),
                                                max_settings.plan_sizes, memory)
        _print(report.estimate_lines(estimate))
        out.add("max_batch_estimate", estimate, "max-batch estimate")
    found = None
    if jax.default_backend() != "cpu":
        budget = max_settings.budget_s
        if budget:  # counted from the process's start, the estimate's compiles included
            budget = max(1.0, budget - (time.monotonic() - _STARTED))
        search = dataclasses.replace(max_settings, budget_s=budget,
                                     start=max_batch.search_start(estimate, max_settings))
        found = max_batch.find_max_batch(
            search, lambda n: max_batch.step_fits(config, mesh, n),
            log=lambda line: print(line, flush=True),
            on_try=lambda so_far: out.add("max_batch", so_far, "max-batch try"))
    _print(report.max_batch_lines(found))
    out.add("max_batch", found, "max batch")


def main(argv: list[str]) -> None:
    """Runs the benchmarks the flags ask for, prints them and writes --json."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = flags.FLAGS.config
    shape, step_settings, loop_settings, max_settings = _settings(config)
    settings.apply_shape(config, shape, loop_settings.folder)
    out = json_out.JsonOut(_JSON.value, {
        "command": " ".join([os.path.relpath(sys.argv[0], _REPO)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d")})

    # PyTorch first, before JAX touches (and preallocates) the accelerator's memory.
    torch_results = None
    if _COMPARE_TORCH.value:
        print("timing PyTorch (child process) ...", flush=True)
        torch_results = torch_compare.run_torch(
            config, step_settings.steps, step_settings.warmup, _TORCH_COMPILE.value,
            _TORCH_REQUIRE_CUDA.value)
        out.add("torch", torch_results, "torch")

    import jax


    record = compiles.CompileRecord()
    out.extra = lambda: {"compiles": record.summary()}
    try:
        config_checks.validate_config(config, device_count=jax.device_count(),
                                      process_count=jax.process_count(), check_data=False)
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")
    mesh = parallel.create_mesh()
    batch_per_call = config.train.batch_size // config.train.grad_accum_steps
    device = jax.devices()[0]
    print(f"{model_name(config)} {config.data.image_size}x{config.data.image_size}, global "
          f"batch {batch_per_call} on {jax.device_count()} x {device.device_kind} "
          f"({device.platform}), jax {jax.__version__}", flush=True)
    out.figures.update({
        "model": model_name(config), "version": config.model.version,
        "image_size": config.data.image_size, "device_kind": device.device_kind,
        "platform": device.platform, "device_count": jax.device_count(),
        "jax_version": jax.__version__})
    if _MODE.value != "none":
        step_results, built = step.measure_step(config, mesh, batch_per_call, step_settings)
        _print(report.step_lines(step_results, device.platform == "cpu"))
        out.add("step", step_results, "step")
    if _MODE.value == "loop":
        loop_results, built.state = loop.measure_loop(
            config, mesh, built.compiled, built.state, batch_per_call,
            step_results["images_per_s"], loop_settings, step_settings.steps,
            step_settings.warmup,
            on_feeder=lambda so_far: out.add(
                "loop", so_far, f"loop, feeder {list(so_far['feeders'])[-1]}"))
        _print(report.loop_lines(loop_results))
    if _MODE.value != "none":
        del built
    gc.collect()

    if torch_results is not None:
        jax_rate = out.figures["step"]["images_per_s"] if "step" in out.figures else None
        _print(report.torch_lines(torch_results, jax_rate))
        out.add("torch", report.with_ratio(torch_results, jax_rate), "torch and the ratio")
    if _MAX_BATCH.value:
        _find_max_batch(config, mesh, max_settings, out)
    out.write("done")


if __name__ == "__main__":
    app.run(main)
