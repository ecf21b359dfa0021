"""Checks a run config before any work, so a mistake costs seconds, not a crashed job.

Every failure is one sentence that names the field and how to fix it.
"""

from __future__ import annotations

import ml_collections

from vgg_jax.models import TOTAL_STRIDE, VERSIONS, canonical_version

SOURCES = ("tfds", "folder", "digits")
INITIALIZERS = ("glorot_uniform", "normal")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(ValueError):
    """A config field has a value the run cannot use."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1,
    check_data: bool = True,
) -> None:
    """Raises ConfigError for the first field that cannot work.

    Args:
      config: the full run config.
      device_count: devices over all processes (the batch is split over them).
      process_count: number of processes (each reads its share of every batch).
      check_data: also check that the data set exists (cheap; no image is decoded).

    Raises:
      ConfigError: with one sentence naming the field and the fix.
    """
    m, d, t = config.model, config.data, config.train
    try:
        canonical_version(m.version)
    except ValueError:
        raise ConfigError(
            f"config.model.version={m.version!r} is not a VGG configuration; use one of "
            f"{', '.join(VERSIONS)} (e.g. --config.model.version=D)."
        ) from None
    _require(m.num_classes >= 1, f"config.model.num_classes={m.num_classes} must be at least 1.")
    _require(m.width_divisor >= 1,
             f"config.model.width_divisor={m.width_divisor} must be 1 (the paper) or more.")
    _require(m.fc_features >= 1, f"config.model.fc_features={m.fc_features} must be positive.")
    _require(0.0 <= m.dropout_rate < 1.0,
             f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1) (the paper: 0.5).")
    _require(m.initializer in INITIALIZERS,
             f"config.model.initializer={m.initializer!r} is unknown; use one of {INITIALIZERS}.")
    _require(m.compute_dtype in COMPUTE_DTYPES,
             f"config.model.compute_dtype={m.compute_dtype!r} is unknown; "
             f"use one of {COMPUTE_DTYPES}.")

    _require(d.source in SOURCES,
             f"config.data.source={d.source!r} is unknown; use one of {SOURCES}.")
    _require(d.image_size > 0 and d.image_size % TOTAL_STRIDE == 0,
             f"config.data.image_size={d.image_size} must be a positive multiple of "
             f"{TOTAL_STRIDE} (five 2x2 max-pools), e.g. 224.")
    _require(d.train_scale_min <= d.train_scale_max,
             f"config.data.train_scale_min={d.train_scale_min} exceeds train_scale_max="
             f"{d.train_scale_max}; set min <= max (equal for single-scale training).")
    _require(d.train_scale_min >= d.image_size,
             f"config.data.train_scale_min={d.train_scale_min} is smaller than the crop "
             f"config.data.image_size={d.image_size}; a crop cannot be larger than the "
             "rescaled image, so raise the scale or lower the crop.")
    _require(d.eval_scale >= d.image_size,
             f"config.data.eval_scale={d.eval_scale} is smaller than the crop "
             f"config.data.image_size={d.image_size}; use a test scale of at least the crop.")
    _require(len(d.mean_rgb) == 3 and len(d.std_rgb) == 3 and min(d.std_rgb) > 0,
             "config.data.mean_rgb and config.data.std_rgb must hold three values, std_rgb "
             "positive.")
    _require(d.num_workers >= 0, f"config.data.num_workers={d.num_workers} must be 0 or more.")
    if d.source in ("tfds", "folder"):
        expected = ("tensorflow_datasets" if d.source == "tfds"
                    else "imagenet (with train/ and val/)")
        _require(bool(d.data_dir),
                 f"config.data.data_dir is not set for source {d.source!r}; pass "
                 f"--config.data.data_dir=/path/to/{expected}, or use "
                 "--config=configs/quickstart.py for the offline demo.")

    _require(t.batch_size >= 1, f"config.train.batch_size={t.batch_size} must be positive.")
    _require(t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
             f"config.train.batch_size={t.batch_size} is not divisible by "
             f"config.train.grad_accum_steps={t.grad_accum_steps}; pick an accumulation count "
             "that divides the batch.")
    micro_batch = t.batch_size // t.grad_accum_steps
    _require(micro_batch % device_count == 0 and micro_batch % process_count == 0,
             f"config.train.batch_size={t.batch_size} (per accumulation step {micro_batch}) is "
             f"not divisible by the {device_count} devices; use a multiple of {device_count}.")
    _require(t.eval_batch_size % device_count == 0,
             f"config.train.eval_batch_size={t.eval_batch_size} is not divisible by the "
             f"{device_count} devices; use a multiple of {device_count}.")
    _require(t.num_epochs >= 1, f"config.train.num_epochs={t.num_epochs} must be at least 1.")
    _require(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate} must be positive.")
    _require(0.0 <= t.momentum < 1.0, f"config.train.momentum={t.momentum} must be in [0, 1).")
    _require(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay} must be >= 0.")
    _require(t.grad_clip_norm >= 0,
             f"config.train.grad_clip_norm={t.grad_clip_norm} must be >= 0 (0 disables clipping).")
    for field in ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps"):
        _require(t[field] >= 1, f"config.train.{field}={t[field]} must be at least 1.")
    _require(config.checkpoint.max_to_keep >= 1,
             f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be at least 1 "
             "(the newest checkpoint is what a resume needs).")
    _require(config.wandb.mode in WANDB_MODES,
             f"config.wandb.mode={config.wandb.mode!r} is unknown; use one of {WANDB_MODES}.")

    from vgg_jax.evaluate import PROTOCOLS

    ev = config.eval
    _require(ev.protocol in PROTOCOLS,
             f"config.eval.protocol={ev.protocol!r} is unknown; use one of {PROTOCOLS}.")
    for q in ev.scales:
        _require(int(q) >= d.image_size,
                 f"config.eval.scales holds {q}, smaller than the crop config.data.image_size="
                 f"{d.image_size}; use test scales of at least the crop.")
    _require(ev.multi_crop_grid >= 1,
             f"config.eval.multi_crop_grid={ev.multi_crop_grid} must be at least 1 (the paper: 5).")
    _require(ev.batch_size >= 1, f"config.eval.batch_size={ev.batch_size} must be positive.")

    if check_data:
        from vgg_jax.data import sources

        try:
            sources.validate_source(d)
            data_classes = sources.num_classes(d)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        _require(data_classes == m.num_classes,
                 f"config.model.num_classes={m.num_classes} but the data set has {data_classes} "
                 f"classes; pass --config.model.num_classes={data_classes}.")
