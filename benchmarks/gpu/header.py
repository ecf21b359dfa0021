"""What the GPU run checks and prints before any part: versions, devices, /dev/shm.

The devices are listed by a child process, so that the run's own process never starts a
jax backend (the parts' processes must find the accelerator's memory untouched). A GPU
run stops here, in seconds, when jax sees no GPU, rather than let every part spend its
budget on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from benchmarks.speed import report, shared_memory
from configs import vgg_d
from vgg_jax.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The versions reported (distribution names).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "grain", "array-record", "ml-collections", "simplejpeg",
            "numpy", "opencv-python-headless", "pillow", "torch", "torchvision", "triton",
            "protobuf", "absl-py", "etils")
# How long listing the devices may take: jax's import and the GPU's start (seconds).
DEVICE_PROBE_TIMEOUT_S = 60
# Lists what jax sees by default, and why it has no CUDA backend if it has none.
_PROBE = """
import json, jax
found = {"jax": jax.__version__, "backend": jax.default_backend()}
devices = jax.devices()
found.update(count=len(devices), kind=devices[0].device_kind)
try:
    jax.devices("cuda")
except Exception as error:
    found["cuda_error"] = " ".join(str(error).split())[:300]
print(json.dumps(found))
"""


def versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (None: not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s output, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout


def devices() -> dict[str, Any]:
    """What jax sees, from a child process that takes none of the accelerator's memory.

    Returns:
      {"jax", "backend", "count", "kind", and "cuda_error" (why jax has no CUDA backend)
      where it has none}, or {"error": why the devices could not be listed}.
    """
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             timeout=DEVICE_PROBE_TIMEOUT_S, env=env, cwd=_REPO)
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"the device listing exited with {out.returncode}: {last}"}
        return json.loads(lines[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def no_gpu(found: dict[str, Any]) -> str | None:
    """The line that stops a GPU run when jax sees no GPU; None when it sees one.

    Args:
      found: what `devices` returned.

    Returns:
      One sentence naming what jax sees instead, or None.
    """
    if "error" in found:
        return f"run_all: jax could not list its devices ({found['error']}); no part was run."
    if found.get("backend") == "gpu":
        return None
    why = f"; cuda: {found['cuda_error']}" if found.get("cuda_error") else ""
    return (f"run_all: jax {found['jax']} sees no GPU, only {found['count']} x "
            f"{found['kind']} (backend {found['backend']}{why}); no part was run "
            "(on a CPU, --tiny runs every part at tiny shapes).")


def data_workers(wanted: int, batch_size: int, image_size: int) -> dict[str, Any]:
    """How many data workers the loop and the training run can give shared memory to.

    Args:
      wanted: the workers they would use.
      batch_size: their batch (one process).
      image_size: their crop side.

    Returns:
      {"free_bytes", "total_bytes" (of /dev/shm; None where there is none),
      "bytes_per_worker", "wanted", "workers" (at most `wanted`, as many as fit), "line"
      (for the header)}.
    """
    data = vgg_d.get_config().data
    data.image_size = image_size
    per_worker = pipeline.worker_shared_memory_bytes(data, batch_size)
    space = shared_memory.space()
    free = space["free_bytes"] if space else None
    workers = shared_memory.workers_that_fit(wanted, per_worker, free)
    need = (f"{wanted} data worker{'s' if wanted != 1 else ''} "
            f"need{'' if wanted != 1 else 's'} {report.fmt_bytes(wanted * per_worker)} "
            f"({report.fmt_bytes(per_worker)} each)")
    if space is None:
        line = f"/dev/shm: not found; {need}"
    elif workers == wanted:
        line = (f"/dev/shm: {report.fmt_bytes(free)} free of "
                f"{report.fmt_bytes(space['total_bytes'])}; {need}: they fit")
    else:
        line = (f"run_all: /dev/shm has {report.fmt_bytes(free)} free and {need}, so the "
                f"loop and the training run use {workers} workers")
    return {"free_bytes": free, "total_bytes": space and space["total_bytes"],
            "bytes_per_worker": per_worker, "wanted": wanted, "workers": workers,
            "line": line}
