"""The prepared GPU run: every figure the GPU table of docs/benchmarks.md needs, one command.

  bash benchmarks/gpu/run_all.sh OUT_DIR          # on the GPU machine (installs the wheels)
  python3 benchmarks/gpu/run_all.py --out=OUT_DIR --tiny   # CPU, tiny shapes (the tests)

Each part runs in its own process with its own time budget (a part that overruns is
killed and the next one starts; seconds a part leaves unused pass to the next), all of it
within TOTAL_BUDGET_S. Files written flat into OUT_DIR (docs/benchmarks.md explains
every field):

  env.json        versions, devices, nvidia-smi, and each part's status and wall time
  d_bf16.json     VGG-16 (D) bf16 batch 256 at 224 + torchvision's vgg16 (timed in a
                  part of its own) and the ratio
  nets.json       A, B, C, E in bf16 and D in fp32, same batch and crop
  loop.json       the whole loop (14 grain workers, photo-like JPEGs): prefetch thread,
                  grain's device_put and none, against the synthetic rate
  max_batch.json  the largest batch per device for D in bf16
  train_run.json  main.py on a JPEG folder: validation, checkpoint, SIGTERM, resume
  run_all.log     everything the parts printed

No module of the package is imported here: the parts' processes must find the
accelerator's memory untouched.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags

from benchmarks.gpu import train_run

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OUT = flags.DEFINE_string("out", None, "Folder the JSON files are written into.",
                           required=True)
_TINY = flags.DEFINE_bool("tiny", False, "CPU, tiny shapes: proves every part runs.")
_PARTS = flags.DEFINE_list(
    "parts", "d_bf16,torch,loop,train_run,nets,max_batch",
    "The parts to run, in their fixed order (a rerun of the ones that failed).")

# The device run's command may take 10 minutes; the parts get 8 of them.
TOTAL_BUDGET_S = 480.0
# The versions reported (distribution names).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "grain", "array-record", "ml-collections", "simplejpeg",
            "numpy", "opencv-python-headless", "pillow", "torch", "torchvision", "triton",
            "protobuf", "absl-py", "etils")
# The net, crop and batch of the headline figures.
HEADLINE = ["--config=configs/vgg_d.py", "--batch_size=256", "--image_size=224"]
# Tiny shapes: a width/16 net with a small head at 32x32, batch 8.
TINY_NET = ["--config.model.width_divisor=16", "--config.model.fc_features=64"]
TINY = [*TINY_NET, "--image_size=32", "--batch_size=8", "--steps=2", "--warmup=1"]
# The photo-like JPEG folder the loop and the training run read: (train, val, classes, HxW).
FOLDER_GPU = (2560, 256, 16, (375, 500))
FOLDER_TINY = (64, 16, 4, (48, 64))
# The GPU host's decoding processes (16 cores: 14 decode, 2 run the loop and the rest).
WORKERS_GPU = 14
# Autotuning off for the largest-batch search: each size is a new compilation, and the
# full autotuner would let only two or three fit in the part's budget.
MAX_BATCH_XLA_FLAGS = "--xla_gpu_autotune_level=0"
# Tiny runs prove that every part runs, not how fast: XLA's CPU backend compiles about 3x
# faster with its expensive optimisations off.
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@dataclasses.dataclass(frozen=True)
class Part:
    """One part: a name, its budget (GPU and tiny, seconds) and its command or function."""

    name: str
    budget_s: float
    tiny_budget_s: float


# In order of importance: seconds a part leaves unused pass to the next ones, and a part
# whose budget is spent before it starts is not run.
PARTS = (
    Part("d_bf16", 80, 150),
    Part("torch", 85, 100),
    Part("loop", 65, 150),
    Part("train_run", 120, 200),
    Part("nets", 80, 200),
    Part("max_batch", 50, 100),
)
# The largest-batch search stops trying new sizes this long before its part's budget ends:
# the process's start and one try still under way must fit in it.
MAX_BATCH_RESERVE_S = 30.0
# The torch part's own file, merged into d_bf16.json (the run returns at most 8 files).
TORCH_JSON = "torch.json"


class Log:
    """Prints each line and appends it to OUT/run_all.log."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (None: not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _run(cmd: list[str], budget: float, log: Log, env: dict[str, str] | None = None):
    """Runs `cmd` in the repository, copying its output to `log`; kills it after `budget`.

    Returns:
      (exit code or None if killed, wall seconds).
    """
    start = time.monotonic()
    child = train_run.Child(cmd, log, env={**os.environ, **(env or {})})
    return child.finish(start + budget, log), time.monotonic() - start


def devices(log: Log) -> dict[str, Any]:
    """What jax sees, from a child that does not take the accelerator's memory."""
    probe = ("import jax, json; d = jax.devices(); print(json.dumps({'backend': "
             "jax.default_backend(), 'count': len(d), 'kind': d[0].device_kind}))")
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=120, env=env, cwd=_REPO)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as error:  # what failed goes into env.json
        log(f"jax devices: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s output, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout


def commands(out: str, folder: str, tiny: bool) -> dict[str, list[str]]:
    """The command line of each process part (train_run is run by `train_run.run`)."""
    py, bench = sys.executable, os.path.join("benchmarks", "train_step.py")
    shape = [*TINY, "--notorch_compile"] if tiny else [*HEADLINE, "--steps=30"]
    workers = 1 if tiny else WORKERS_GPU
    nets = ["--width_divisor=16", "--fc_features=64", "--image_size=32", "--batch_size=8",
            "--steps=1", "--warmup=0"] if tiny else ["--steps=10"]
    return {
        "d_bf16": [py, bench, *shape, "--precision=bf16", f"--json={out}/d_bf16.json"],
        # Its own process and budget: torch.compile's first step can take a minute.
        "torch": [py, bench, *shape, "--precision=bf16", "--mode=none", "--compare_torch",
                  f"--json={out}/{TORCH_JSON}"],
        "nets": [py, "-m", "benchmarks.gpu.nets", f"--out={out}/nets.json", *nets],
        "loop": [py, bench, *(TINY if tiny else [*HEADLINE, "--steps=20"]), "--precision=bf16",
                 "--mode=loop", f"--config.data.num_workers={workers}", f"--folder={folder}",
                 "--feeders=thread,grain,none", *(["--loop_steps=4"] if tiny else []),
                 f"--json={out}/loop.json"],
        "max_batch": [py, bench, *(TINY if tiny else HEADLINE), "--precision=bf16",
                      "--mode=none", "--max_batch", "--max_batch_start=512",
                      "--max_batch_granularity=64", f"--json={out}/max_batch.json"],
    }


def train_settings(tiny: bool) -> train_run.TrainRunSettings:
    """The training run's shape: 200 steps of batch 256 (tiny: 32 of 8)."""
    train, _, classes, _ = FOLDER_TINY if tiny else FOLDER_GPU
    if tiny:
        return train_run.TrainRunSettings(
            batch_size=8, train_images=train, num_classes=classes, epochs=4,
            eval_every_epochs=2, log_every_steps=2, stop_at=12, num_workers=1,
            overrides=(*TINY_NET, "--config.data.image_size=32", "--config.data.train_scale_min=32",
                       "--config.data.train_scale_max=32"))
    return train_run.TrainRunSettings(
        batch_size=256, train_images=train, num_classes=classes, epochs=20,
        eval_every_epochs=10, log_every_steps=10, stop_at=100, num_workers=WORKERS_GPU)


def write_folder(root: str, tiny: bool) -> None:
    """Writes the photo-like JPEG folder (train/ and val/); runs in a child process."""
    from benchmarks.speed import photos

    train, val, classes, size = FOLDER_TINY if tiny else FOLDER_GPU
    photos.write_photo_folder(root, {"train": train, "val": val}, num_classes=classes,
                              size=size)


def _write(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def merge_torch(out: str) -> None:
    """Moves the torch part's figures into d_bf16.json as "torch", with the speed ratio.

    Args:
      out: the output folder; its torch.json is removed.
    """
    from benchmarks.speed import report

    torch_path, d_path = os.path.join(out, TORCH_JSON), os.path.join(out, "d_bf16.json")
    if not os.path.exists(torch_path):
        return
    with open(torch_path) as f:
        torch_results = json.load(f).get("torch", {"skipped": "the torch part wrote nothing"})
    d = {}
    if os.path.exists(d_path):
        with open(d_path) as f:
            d = json.load(f)
    jax_rate = d.get("step", {}).get("images_per_s")
    d["torch"] = report.with_ratio(torch_results, jax_rate)
    _write(d_path, d)
    os.remove(torch_path)


def run_parts(out: str, tmp: str, tiny: bool, log: Log, env_info: dict[str, Any]) -> None:
    """Runs every part within its budget, recording each one's status in env.json."""
    folder = os.path.join(tmp, "photos")
    writer = multiprocessing.get_context("spawn").Process(target=write_folder,
                                                          args=(folder, tiny))
    writer.start()  # on spare cores while the first parts time the step
    cmds = commands(out, folder, tiny)
    deadline = time.monotonic() + TOTAL_BUDGET_S * (2 if tiny else 1)
    # Every part's process (main.py's too) shares one persistent compilation cache.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
    spare = 0.0
    for part in PARTS:
        if part.name not in _PARTS.value:
            continue
        budget = min((part.tiny_budget_s if tiny else part.budget_s) + spare,
                     deadline - time.monotonic())
        if budget <= 0:
            env_info["parts"][part.name] = {"status": "not run: the total budget is spent"}
            continue
        log(f"=== {part.name} (budget {budget:.0f} s)")
        if part.name in ("loop", "train_run"):
            writer.join()
        if part.name == "train_run":
            start = time.monotonic()
            result = train_run.run(folder, os.path.join(tmp, "train_run"), train_settings(tiny),
                                   start + budget, log)
            _write(os.path.join(out, "train_run.json"), result)
            code, wall = (0 if result["ok"] else 1), time.monotonic() - start
        else:
            cmd, part_env = cmds[part.name], {}
            if part.name == "max_batch":
                search = max(1.0, budget - MAX_BATCH_RESERVE_S)
                cmd = [*cmd, f"--max_batch_budget_s={search:.0f}"]
                if not tiny:
                    part_env["XLA_FLAGS"] = MAX_BATCH_XLA_FLAGS
            code, wall = _run(cmd, budget, log, part_env)
            if part.name == "torch":
                merge_torch(out)
        spare = max(0.0, budget - wall)
        status = "ok" if code == 0 else ("timed out" if code is None else f"failed ({code})")
        env_info["parts"][part.name] = {"status": status, "wall_s": wall, "budget_s": budget}
        log(f"=== {part.name}: {status} in {wall:.0f} s")
        _write(os.path.join(out, "env.json"), env_info)


def main(argv: list[str]) -> None:
    """Runs the parts and writes OUT/*.json."""
    del argv
    unknown = sorted(set(_PARTS.value) - {p.name for p in PARTS})
    if unknown:
        sys.exit(f"--parts: unknown {', '.join(unknown)}; choose from "
                 f"{', '.join(p.name for p in PARTS)}.")
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    if _TINY.value:  # inherited by every part's process
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
    log = Log(os.path.join(out, "run_all.log"))
    start = time.monotonic()
    smi = nvidia_smi()
    log(smi or "nvidia-smi: not found")
    env_info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": _TINY.value,
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "versions": versions(), "devices": devices(log), "nvidia_smi": smi, "parts": {},
    }
    log(json.dumps({k: env_info[k] for k in ("python", "versions", "devices")}, indent=1))
    _write(os.path.join(out, "env.json"), env_info)
    with tempfile.TemporaryDirectory(prefix="vgg_gpu_run_") as tmp:
        run_parts(out, tmp, _TINY.value, log, env_info)
    env_info["wall_s"] = time.monotonic() - start
    _write(os.path.join(out, "env.json"), env_info)
    failed = [n for n, p in env_info["parts"].items() if p["status"] != "ok"]
    log(f"run_all: {len(env_info['parts']) - len(failed)} of {len(env_info['parts'])} parts ok in "
        f"{env_info['wall_s']:.0f} s" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    log.close()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
