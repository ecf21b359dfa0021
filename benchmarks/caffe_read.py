"""Memory and time of reading a full-size Caffe VGG (`vgg_jax.weights.caffe_format`).

  python benchmarks/caffe_read.py                    # VGG-16 (D), as the authors released it
  python benchmarks/caffe_read.py --version=E --json=caffe_read.json

Writes a synthetic full-size `.caffemodel` (random weights, the authors' V1 layout, written
by `write_caffemodel`) into a temporary folder, then reads it in fresh processes, each
reporting its resident memory after its imports, its peak (VmHWM) and the seconds taken:
  read           `read_caffemodel(path)` alone;
  read+convert   then `torchvision_format.from_torchvision` into our variables, as a loader
                 does before building the net.
The read's own peak is the peak minus the memory after imports, set against the file size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vgg_jax.models import create_model
from vgg_jax.weights import caffe_format

_VERSION = flags.DEFINE_enum("version", "D", ["A", "B", "D", "E"], "The configuration.")
_DIR = flags.DEFINE_string("dir", None, "Where to write the file (default: a temporary "
                           "folder, removed afterwards).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")

_MIB = 1 << 20
# The child: imports, then memory now, the work, then peak memory; prints one JSON line.
_CHILD = """
import json, sys, time
from vgg_jax.weights import caffe_format, torchvision_format

def status(field):
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith(field))

after_imports, start = status("VmRSS:"), time.perf_counter()
weights = caffe_format.read_caffemodel(sys.argv[1])
if sys.argv[2] == "read+convert":
    variables = torchvision_format.from_torchvision(weights.state_dict, weights.version)
print(json.dumps({"after_imports": after_imports, "peak": status("VmHWM:"),
                  "seconds": time.perf_counter() - start}))
"""


def write_file(path: str, version: str) -> float:
    """Writes a full-size VGG with random weights; returns the seconds it took."""
    model = create_model(version)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    start = time.perf_counter()
    caffe_format.write_caffemodel(path, variables, version)
    return time.perf_counter() - start


def measure(path: str, case: str) -> dict[str, float]:
    """Runs one case in a fresh process; returns its figures in MiB and seconds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run([sys.executable, "-c", _CHILD, path, case], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    return {"after_imports_mib": figures["after_imports"] / _MIB,
            "peak_mib": figures["peak"] / _MIB,
            "own_peak_mib": (figures["peak"] - figures["after_imports"]) / _MIB,
            "seconds": figures["seconds"]}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(dir=_DIR.value) as folder:
        path = os.path.join(folder, f"vgg_{_VERSION.value}.caffemodel")
        write_seconds = write_file(path, _VERSION.value)
        size = os.path.getsize(path) / _MIB
        results = {"version": _VERSION.value, "file_mib": size, "write_seconds": write_seconds}
        print(f"VGG-{_VERSION.value}: {size:.1f} MiB file, written in {write_seconds:.1f} s")
        for case in ("read", "read+convert"):
            figures = measure(path, case)
            results[case] = figures
            print(f"{case:13s} peak RSS {figures['peak_mib']:7.1f} MiB = "
                  f"{figures['after_imports_mib']:.1f} after imports + "
                  f"{figures['own_peak_mib']:.1f} ({figures['own_peak_mib'] / size:.2f}x the "
                  f"file), {figures['seconds']:.2f} s")
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    app.run(main)
