"""The prepared GPU run: every figure the GPU table of docs/benchmarks.md needs, one command.

  bash benchmarks/gpu/run_all.sh OUT_DIR          # on the GPU machine (installs the wheels)
  python3 benchmarks/gpu/run_all.py --out=OUT_DIR --tiny   # CPU, tiny shapes (the tests)

The whole command, the wheels' install and the header included, ends within
WALL_LIMIT_S (9 minutes; the device machine runs one command for 10 at most). First the
header: versions, nvidia-smi, what jax sees (a GPU run stops there, in seconds, if it sees
no GPU), the free /dev/shm and how many data workers fit in it. Then the parts, most
important first, each in its own process with its own time budget (a part that overruns is
killed with its grain workers; seconds a part leaves unused pass to the next). Every part
writes its JSON the moment a figure exists, so a part cut short keeps what it measured.
The parts share one persistent jax compilation cache: the loop part finds the headline's
compiled step there, and XLA's autotuning results are kept there too. Files written flat
into OUT_DIR (docs/benchmarks.md explains every field):

  env.json        versions, devices, nvidia-smi, /dev/shm, and each part's status, wall
                  time, compilations and the moments its JSON was written
  d_bf16.json     VGG-16 (D) bf16 batch 256 at 224 + torchvision's vgg16 (timed in a
                  part of its own) and the ratio
  loop.json       the whole loop (14 grain workers, photo-like JPEGs): prefetch thread,
                  grain's device_put and none, against the synthetic rate
  train_run.json  main.py on a JPEG folder: validation, checkpoint, SIGTERM, resume
  nets.json       E, A, B, C in bf16 and D in fp32, same batch and crop
  max_batch.json  the largest batch per device for D in bf16, from XLA's memory plan's
                  estimate
  run_all.log     everything the parts printed

The run's own process never starts a jax backend: the parts' processes must find the
accelerator's memory untouched.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags

from benchmarks.gpu import header, train_run
from benchmarks.speed import json_out, photos, report

_OUT = flags.DEFINE_string("out", None, "Folder the JSON files are written into.",
                           required=True)
_TINY = flags.DEFINE_bool("tiny", False, "CPU, tiny shapes: proves every part runs.")
_PARTS = flags.DEFINE_list(
    "parts", "d_bf16,torch,loop,train_run,nets,max_batch",
    "The parts to run, in their fixed order (a rerun of the ones that failed).")

# The device machine runs one command for this long at most.
DEVICE_COMMAND_LIMIT_S = 600.0
# The whole command on the GPU machine, install and header included: a minute inside it.
WALL_LIMIT_S = 540.0
# What the parts' budgets leave of it for the wheels' install and the header (device
# listing with the GPU's start, nvidia-smi, versions; seconds each, 60 s at most).
HEADER_ALLOWANCE_S = 35.0
# Tiny runs on a loaded 2-core CPU: generous, only the run's completing is tested.
TINY_WALL_LIMIT_S = 900.0
# Kept back at the end for the last env.json and the summary line.
FINISH_RESERVE_S = 5.0
# run_all.sh exports the time (epoch seconds) it started, so that its install counts.
STARTED_ENV = "VGG_GPU_RUN_STARTED"
# The net, crop and batch of the headline figures.
HEADLINE_BATCH, HEADLINE_IMAGE = 256, 224
HEADLINE = ["--config=configs/vgg_d.py", f"--batch_size={HEADLINE_BATCH}",
            f"--image_size={HEADLINE_IMAGE}"]
# Tiny shapes: a width/16 net with a small head at 32x32, batch 8.
TINY_NET = ["--config.model.width_divisor=16", "--config.model.fc_features=64"]
TINY_BATCH, TINY_IMAGE = 8, 32
TINY = [*TINY_NET, f"--image_size={TINY_IMAGE}", f"--batch_size={TINY_BATCH}", "--steps=2",
        "--warmup=1"]
# The photo-like JPEG folder the loop and the training run read: (train, val, classes, HxW).
FOLDER_GPU = (2560, 256, 16, (375, 500))
FOLDER_TINY = (64, 16, 4, (48, 64))
# The GPU host's decoding processes (16 cores: 14 decode, 2 run the loop and the rest).
WORKERS_GPU = 14
# The largest-batch search: autotuning off, since each size is a new compilation and the
# full autotuner would let only one or two fit; sizes a multiple of 32, 15% apart until
# one fits and one does not; the estimate from plans at 64 and 128 per device.
MAX_BATCH_XLA_FLAGS = "--xla_gpu_autotune_level=0"
MAX_BATCH_GPU = ["--max_batch_granularity=32", "--max_batch_growth=1.15",
                 "--max_batch_plan_sizes=64,128"]
# Tiny: the estimate for 64 MiB (a CPU has no device limit; the search is skipped there),
# planned at d_bf16's batch per device (its compilation is in the cache) and twice that.
TINY_PLAN_MEMORY_BYTES = 64 << 20
# The search tries no new size this long before its part's budget ends: one try under
# way (a state, a compilation without autotuning, one step) must still fit.
MAX_BATCH_RESERVE_S = 20.0
# Tiny runs prove that every part runs, not how fast: XLA's CPU backend compiles about 3x
# faster with its expensive optimisations off, and the tiny step 4x faster again with its
# older elemental emitters instead of the fusion emitters (8 s -> 2 s on the 2-core VM;
# both flags exist in jax 0.10.2 and 0.11.2).
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
# Every compiled program goes into the shared cache, however quick: main.py's second
# process (the resume) then compiles nothing.
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
# The torch part's own file, merged into d_bf16.json (the run returns at most 8 files).
TORCH_JSON = "torch.json"
# The JSON each part writes.
PART_FILES = {"d_bf16": "d_bf16.json", "torch": TORCH_JSON, "loop": "loop.json",
              "train_run": "train_run.json", "nets": "nets.json",
              "max_batch": "max_batch.json"}


@dataclasses.dataclass(frozen=True)
class Part:
    """One part: its name and its budget in seconds on the GPU and in a tiny run."""

    name: str
    budget_s: float
    tiny_budget_s: float


# In order of importance (docs/benchmarks.md, "The GPU run", justifies each budget): the
# GPU budgets (500 s) + HEADER_ALLOWANCE_S + FINISH_RESERVE_S make WALL_LIMIT_S.
PARTS = (
    Part("d_bf16", 90, 150),
    Part("torch", 80, 100),
    Part("loop", 70, 150),
    Part("train_run", 110, 200),
    Part("nets", 50, 200),
    Part("max_batch", 100, 100),
)


class Log:
    """Prints each line and appends it to OUT/run_all.log."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def commands(out: str, folder: str, tiny: bool, workers: int,
             device_count: int = 1) -> dict[str, list[str]]:
    """The command line of each process part (train_run is run by `train_run.run`)."""
    py, bench = sys.executable, os.path.join("benchmarks", "train_step.py")
    plan = max(1, TINY_BATCH // device_count)
    max_batch_tiny = [f"--max_batch_granularity={plan}", f"--max_batch_plan_sizes={plan},"
                      f"{2 * plan}", f"--max_batch_memory_bytes={TINY_PLAN_MEMORY_BYTES}"]
    shape = [*TINY, "--notorch_compile"] if tiny else [*HEADLINE, "--steps=30"]
    nets = ["--width_divisor=16", "--fc_features=64", f"--image_size={TINY_IMAGE}",
            f"--batch_size={TINY_BATCH}", "--steps=1", "--warmup=0"] if tiny else ["--steps=10"]
    return {
        "d_bf16": [py, bench, *shape, "--precision=bf16", f"--json={out}/d_bf16.json"],
        # Its own process and budget: torch.compile's first step can take a minute.
        "torch": [py, bench, *shape, "--precision=bf16", "--mode=none", "--compare_torch",
                  *([] if tiny else ["--torch_require_cuda"]), f"--json={out}/{TORCH_JSON}"],
        "nets": [py, "-m", "benchmarks.gpu.nets", f"--out={out}/nets.json", *nets],
        "loop": [py, bench, *(TINY if tiny else [*HEADLINE, "--steps=20"]), "--precision=bf16",
                 "--mode=loop", f"--config.data.num_workers={workers}", f"--folder={folder}",
                 "--feeders=thread,grain,none", *(["--loop_steps=4"] if tiny else []),
                 f"--json={out}/loop.json"],
        "max_batch": [py, bench, *(TINY if tiny else HEADLINE), "--precision=bf16",
                      "--mode=none", "--max_batch", *(max_batch_tiny if tiny else MAX_BATCH_GPU),
                      f"--json={out}/max_batch.json"],
    }


def train_settings(tiny: bool, workers: int) -> train_run.TrainRunSettings:
    """The training run's shape: 200 steps of batch 256 (tiny: 32 of 8)."""
    train, _, classes, _ = FOLDER_TINY if tiny else FOLDER_GPU
    if tiny:
        return train_run.TrainRunSettings(
            batch_size=TINY_BATCH, train_images=train, num_classes=classes, epochs=4,
            eval_every_epochs=2, log_every_steps=2, stop_at=12, num_workers=workers,
            overrides=(*TINY_NET, f"--config.data.image_size={TINY_IMAGE}",
                       f"--config.data.train_scale_min={TINY_IMAGE}",
                       f"--config.data.train_scale_max={TINY_IMAGE}"))
    return train_run.TrainRunSettings(
        batch_size=HEADLINE_BATCH, train_images=train, num_classes=classes, epochs=20,
        eval_every_epochs=10, log_every_steps=10, stop_at=100, num_workers=workers)


def write_folder(root: str, tiny: bool) -> None:
    """Writes the photo-like JPEG folder (train/ and val/); runs in a child process."""

    train, val, classes, size = FOLDER_TINY if tiny else FOLDER_GPU
    photos.write_photo_folder(root, {"train": train, "val": val}, num_classes=classes,
                              size=size)


def _write(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _read(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge_torch(out: str) -> None:
    """Moves the torch part's figures into d_bf16.json as "torch", with the speed ratio.

    Args:
      out: the output folder; its torch.json is removed.
    """

    torch_path, d_path = os.path.join(out, TORCH_JSON), os.path.join(out, "d_bf16.json")
    if not os.path.exists(torch_path):
        return
    torch_results = _read(torch_path).get("torch", {"skipped": "the torch part wrote nothing"})
    d = _read(d_path)
    d["torch"] = report.with_ratio(torch_results, d.get("step", {}).get("images_per_s"))
    _write(d_path, d)
    os.remove(torch_path)


def _children_cpu_s() -> float:
    """User + system CPU seconds of the processes this one has waited for, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _PartLog:
    """Passes a part's lines on, noting when (seconds into the part) its JSON was written."""

    def __init__(self, log: Log, start: float):
        self.log, self.start, self.writes = log, start, []

    def __call__(self, line: str) -> None:
        self.log(line)
        if line.startswith(json_out.WROTE_PREFIX) and line.endswith(")"):
            self.writes.append({"t_s": round(time.monotonic() - self.start, 2),
                                "what": line[line.rfind("(") + 1:-1]})


def run_part(part: Part, budget: float, ctx: dict[str, Any], log: Log) -> dict[str, Any]:
    """Runs one part within `budget` seconds.

    Args:
      part: the part.
      budget: its seconds.
      ctx: out, tmp, folder, tiny, workers and cmds of the run.
      log: the run's log.

    Returns:
      Its env.json entry: status, wall_s, budget_s, cpu_s, writes, compiles.
    """
    start, cpu_before = time.monotonic(), _children_cpu_s()
    part_log = _PartLog(log, start)
    out = ctx["out"]
    if part.name == "train_run":
        train_out = json_out.JsonOut(os.path.join(out, PART_FILES["train_run"]), say=part_log)

        def progress(figures: dict[str, Any]) -> None:
            train_out.figures = figures
            train_out.write("first process")

        result = train_run.run(ctx["folder"], os.path.join(ctx["tmp"], "train_run"),
                               train_settings(ctx["tiny"], ctx["workers"]), start + budget,
                               part_log, on_progress=progress)
        train_out.figures = result
        train_out.write("done")
        code = 0 if result["ok"] else 1
    else:
        cmd, env = ctx["cmds"][part.name], {}
        if part.name == "max_batch":
            cmd = [*cmd, f"--max_batch_budget_s={max(1.0, budget - MAX_BATCH_RESERVE_S):.0f}"]
            if not ctx["tiny"]:
                env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MAX_BATCH_XLA_FLAGS}"
        child = train_run.Child(cmd, part_log, env={**os.environ, **env})
        code = child.finish(start + budget, part_log)
    for partial in glob.glob(os.path.join(out, "*" + json_out.TEMP_SUFFIX)):
        os.remove(partial)  # a write the budget's kill cut short
    compiles = _read(os.path.join(out, PART_FILES[part.name])).get("compiles")
    if part.name == "torch":
        merge_torch(out)
    status = "ok" if code == 0 else ("timed out" if code is None else f"failed ({code})")
    return {"status": status, "wall_s": time.monotonic() - start, "budget_s": budget,
            "cpu_s": _children_cpu_s() - cpu_before, "writes": part_log.writes,
            "compiles": compiles}


def run_parts(ctx: dict[str, Any], deadline: float, log: Log, env_info: dict[str, Any]) -> None:
    """Runs every part asked for within its budget and the deadline, recording each one."""
    writer = multiprocessing.get_context("spawn").Process(
        target=write_folder, args=(ctx["folder"], ctx["tiny"]))
    writer.start()  # on spare cores while the first parts time the step
    spare = 0.0
    for part in PARTS:
        if part.name not in _PARTS.value:
            continue
        if part.name in ("loop", "train_run"):
            writer.join(max(0.0, deadline - time.monotonic()))
        budget = min((part.tiny_budget_s if ctx["tiny"] else part.budget_s) + spare,
                     deadline - time.monotonic())
        if budget <= 0:
            env_info["parts"][part.name] = {"status": "not run: the total budget is spent"}
            continue
        log(f"=== {part.name} (budget {budget:.0f} s)")
        entry = run_part(part, budget, ctx, log)
        spare = max(0.0, budget - entry["wall_s"])
        env_info["parts"][part.name] = entry
        log(f"=== {part.name}: {entry['status']} in {entry['wall_s']:.0f} s")
        _write(os.path.join(ctx["out"], "env.json"), env_info)
    if writer.is_alive():
        writer.terminate()
    writer.join()


def _started() -> float:
    """time.monotonic() of the command's start: run_all.sh's, else this process's."""
    started = os.environ.get(STARTED_ENV)
    if not started:
        return time.monotonic()
    return time.monotonic() - max(0.0, time.time() - float(started))


def _header(tiny: bool, log: Log) -> dict[str, Any]:
    """Prints and returns the run's header (env.json's first fields)."""
    smi = header.nvidia_smi()
    log(smi or "nvidia-smi: not found")
    batch, image = (TINY_BATCH, TINY_IMAGE) if tiny else (HEADLINE_BATCH, HEADLINE_IMAGE)
    shm = header.data_workers(1 if tiny else WORKERS_GPU, batch, image)
    env_info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": tiny,
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "versions": header.versions(), "devices": header.devices(), "nvidia_smi": smi,
        "dev_shm": shm, "parts": {},
    }
    log(json.dumps({k: env_info[k] for k in ("python", "versions", "devices")}, indent=1))
    log(shm["line"])
    return env_info


def main(argv: list[str]) -> None:
    """Checks the machine, runs the parts and writes OUT/*.json."""
    del argv
    start = _started()
    tiny = _TINY.value
    unknown = sorted(set(_PARTS.value) - {p.name for p in PARTS})
    if unknown:
        sys.exit(f"--parts: unknown {', '.join(unknown)}; choose from "
                 f"{', '.join(p.name for p in PARTS)}.")
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "run_all.log"))
    env_info = _header(tiny, log)
    env_path = os.path.join(out, "env.json")
    _write(env_path, env_info)
    stop = None if tiny else header.no_gpu(env_info["devices"])
    if stop:
        log(stop)
        log.close()
        sys.exit(1)
    # Inherited by every part's process (main.py's too).
    if tiny:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
    else:
        os.environ["JAX_PLATFORMS"] = "cuda"  # a part can never fall back to the CPU
    os.environ.update(CACHE_ENV)
    deadline = start + (TINY_WALL_LIMIT_S if tiny else WALL_LIMIT_S) - FINISH_RESERVE_S
    with tempfile.TemporaryDirectory(prefix="vgg_gpu_run_") as tmp:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
        workers = env_info["dev_shm"]["workers"]
        folder = os.path.join(tmp, "photos")
        ctx = {"out": out, "tmp": tmp, "folder": folder, "tiny": tiny, "workers": workers,
               "cmds": commands(out, folder, tiny, workers,
                                env_info["devices"].get("count", 1))}
        run_parts(ctx, deadline, log, env_info)
    env_info["wall_s"] = time.monotonic() - start
    _write(env_path, env_info)
    failed = [n for n, p in env_info["parts"].items() if p["status"] != "ok"]
    log(f"run_all: {len(env_info['parts']) - len(failed)} of {len(env_info['parts'])} parts ok in "
        f"{env_info['wall_s']:.0f} s" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    log.close()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
