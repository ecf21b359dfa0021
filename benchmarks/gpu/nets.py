"""The train step of several nets in one process, one JSON written after each net.

  python -m benchmarks.gpu.nets --out=nets.json --nets=E:bf16,A:bf16,D:fp32 \
      --batch_size=256 --image_size=224 --steps=10

One process for all nets saves the accelerator's start-up per net; the JSON is rewritten
after every net, so a part stopped by its time budget keeps the nets already timed. The
bf16 nets come first: their convolutions have the shapes of D's, whose autotuning results
XLA keeps in the compilation cache the GPU run's parts share (so their compiles may be
shorter; not measured yet); D in fp32 needs autotuning of its own and comes last.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags

from benchmarks.speed import compiles, json_out, settings, step
from vgg_jax.runtime import parallel

_OUT = flags.DEFINE_string("out", None, "The JSON file written.", required=True)
_NETS = flags.DEFINE_list(
    "nets", "E:bf16,A:bf16,B:bf16,C:bf16,D:fp32",
    "VERSION:PRECISION pairs, timed in this order (configs/vgg_<version>.py).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Crop side.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_WIDTH = flags.DEFINE_integer("width_divisor", 1, "Narrow every net (tiny runs).")
_FC = flags.DEFINE_integer("fc_features", 0, "FC6/FC7 width; 0 = the config's.")


def net_config(version: str, precision: str, shape_batch: int, image_size: int,
               width_divisor: int, fc_features: int):
    """The config of net `version` at the run's shape.

    Args:
      version: "A", "B", "C", "D" or "E".
      precision: "bf16" or "fp32".
      shape_batch: global batch.
      image_size: crop side.
      width_divisor: channel divisor (1 = the paper's net).
      fc_features: FC width; 0 = the paper's.

    Returns:
      The config, shaped by `settings.apply_shape`.
    """
    config = importlib.import_module(f"configs.vgg_{version.lower()}").get_config()
    config.model.width_divisor = width_divisor
    if fc_features:
        config.model.fc_features = fc_features
    settings.apply_shape(config, settings.RunShape(shape_batch, image_size, precision), None)
    return config


def main(argv: list[str]) -> None:
    """Times each net of --nets and rewrites --out after each."""
    del argv
    import jax


    mesh = parallel.create_mesh()
    record = compiles.CompileRecord()
    out = json_out.JsonOut(
        _OUT.value, {"jax_version": jax.__version__, "device_kind": jax.devices()[0].device_kind,
                     "date": time.strftime("%Y-%m-%d"), "nets": {}},
        extra=lambda: {"compiles": record.summary()})
    step_settings = settings.StepSettings(_STEPS.value, _WARMUP.value)
    for item in _NETS.value:
        version, precision = item.split(":")
        config = net_config(version, precision, _BATCH.value, _IMAGE.value, _WIDTH.value,
                            _FC.value)
        print(f"VGG-{version} {precision} batch {_BATCH.value} at {_IMAGE.value} ...",
              flush=True)
        figures, built = step.measure_step(config, mesh, _BATCH.value, step_settings)
        del built
        out.figures["nets"][f"{version}_{precision}"] = figures
        mfu = figures["mfu"]
        print(f"VGG-{version} {precision}: {figures['images_per_s']:,.1f} images/s, "
              f"{figures['tflops_per_device']:.4g} TFLOP/s per device, MFU "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, compile "
              f"{figures['compile_s']:.1f} s", flush=True)
        out.write(f"VGG-{version} {precision}")


if __name__ == "__main__":
    app.run(main)
