"""The benchmark's settings, passed explicitly to every part (the CLI builds them)."""

from __future__ import annotations

import dataclasses

PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# How the loop feeds the step: our device prefetch thread (vgg_jax.runtime.device_prefetch),
# grain's own (grain.experimental.device_put), or no prefetch (transfer in the loop).
FEEDERS = ("thread", "grain", "none")


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What the config is changed to before anything is built.

    Attributes:
      batch_size: global batch of all devices; 0 = the config's.
      image_size: crop side; 0 = the config's.
      precision: "auto" (the config's: bf16 on GPU/TPU, fp32 on CPU), "bf16" or "fp32".
    """

    batch_size: int = 0
    image_size: int = 0
    precision: str = "auto"


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How the step is timed.

    Attributes:
      steps: timed steps of each pass (one synced step at a time, then back to back).
      warmup: untimed steps after compilation.
      peak_tflops: dense peak per device for MFU; 0 = the table of known GPUs.
    """

    steps: int = 20
    warmup: int = 3
    peak_tflops: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How the whole loop is timed.

    Attributes:
      folder: an image folder with train/<class>/<image>; None = write photo-like JPEGs.
      num_images: JPEGs to write; 0 = max(2 x batch, 64).
      loop_steps: timed steps; 0 = max(steps, 5 x the batches grain's workers hold).
      jpeg_size: (height, width) of the written JPEGs.
      feeders: which ways of feeding the step to time, from FEEDERS, in order.
      depth: batches in flight to the device for the prefetching feeders.
    """

    folder: str | None = None
    num_images: int = 0
    loop_steps: int = 0
    jpeg_size: tuple[int, int] = (375, 500)
    feeders: tuple[str, ...] = ("thread",)
    depth: int = 2


@dataclasses.dataclass(frozen=True)
class MaxBatchSettings:
    """The largest-batch search: from an estimate (or `start`), growing or shrinking by
    `growth`, then bisection.

    Attributes:
      start: first batch per device tried when there is no estimate.
      granularity: the answer is a multiple of this.
      limit: largest batch per device tried.
      budget_s: seconds the search may take (no new size is tried after them; the answer
        is then the largest size seen fitting); 0 = no limit.
      growth: factor between successive sizes before the bisection.
      plan_sizes: two batches per device whose memory plans give the estimate.
      memory_bytes: the device memory the estimate plans for; 0 = the device's own limit
        (none on a CPU: no estimate there unless given).
    """

    start: int = 128
    granularity: int = 16
    limit: int = 4096
    budget_s: float = 0.0
    growth: float = 2.0
    plan_sizes: tuple[int, int] = (64, 128)
    memory_bytes: int = 0


def parse_size(text: str) -> tuple[int, int]:
    """"375x500" -> (375, 500); a ValueError naming the text otherwise."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not HxW, e.g. 375x500.") from None
    return height, width


def parse_sizes(text: str) -> tuple[int, int]:
    """"64,128" -> (64, 128); a ValueError unless two sizes above 0, smaller first."""
    try:
        small, large = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not two batch sizes, e.g. 64,128.") from None
    if not 0 < small < large:
        raise ValueError(f"{text!r}: two batch sizes above 0, smaller first, e.g. 64,128.")
    return small, large


def parse_feeders(text: str) -> tuple[str, ...]:
    """"thread,grain" -> ("thread", "grain"); a ValueError naming an unknown one."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FEEDERS]
    if unknown or not names:
        raise ValueError(f"feeders {text!r}: choose from {', '.join(FEEDERS)}.")
    return names


def apply_shape(config, shape: RunShape, folder: str | None) -> None:
    """Writes the run's shape into the (locked) config, in place.

    Also raises the scales to at least the crop and points the data source at an image
    folder (`folder`, or a placeholder the loop replaces with the JPEGs it writes).

    Args:
      config: the run config.
      shape: batch, crop and precision.
      folder: the image folder the loop reads, or None.
    """
    if shape.batch_size:
        config.train.batch_size = shape.batch_size
    if shape.image_size:
        config.data.image_size = shape.image_size
    if shape.precision != "auto":
        config.model.compute_dtype = PRECISION_DTYPES[shape.precision]
    # The training scale must be at least the crop; raise it for crops above 256.
    size = config.data.image_size
    config.data.train_scale_min = max(config.data.train_scale_min, size)
    config.data.train_scale_max = max(config.data.train_scale_max, size)
    # The step reads no data set and the loop reads an image folder, whatever the
    # config names.
    config.data.source = "folder"
    config.data.data_dir = folder or "<written by the benchmark>"
