"""Checks a run config before any work, so a mistake costs seconds, not a crashed job.

Every failure is one sentence that names the field and how to fix it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from vgg_jax import optim, writers
from vgg_jax.data.sources import SOURCES
from vgg_jax.models import TOTAL_STRIDE, VERSIONS, canonical_version

INITIALIZERS = ("glorot_uniform", "normal")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Fields a resumed run must share with the run that saved the checkpoint: they fix the
# shapes of the saved state, what a step means, and the data iterator's saved position.
RESUME_FIELDS = (
    "model.version", "model.num_classes", "model.width_divisor", "model.fc_features",
    "model.batch_norm",
    "data.image_size", "data.source", "data.name", "data.train_split", "data.num_workers",
    "train.batch_size", "train.grad_accum_steps", "seed",
)


_MISSING = object()


class ConfigError(ValueError):
    """A config field has a value the run cannot use."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int | None = None,
    process_count: int = 1, check_data: bool = True,
) -> None:
    """Raises ConfigError for the first field that cannot work.

    Args:
      config: the full run config.
      device_count: devices over all processes (the batch is split over them); None
        leaves `check_batch_split` for later (main.py runs it once jax.distributed has
        joined the processes, which it need not wait for to find other mistakes).
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
    _require(d.prefetch_buffer_size >= 1,
             f"config.data.prefetch_buffer_size={d.prefetch_buffer_size} must be at least 1.")
    _require(d.device_prefetch >= 0,
             f"config.data.device_prefetch={d.device_prefetch} must be 0 (no prefetch) or "
             "more.")
    _require(d.colour_shift_std >= 0,
             f"config.data.colour_shift_std={d.colour_shift_std} must be >= 0 (0 turns the "
             "colour shift off; the paper: 0.1).")
    if d.source == "digits":
        _require(0 < d.val_fraction < 1,
                 f"config.data.val_fraction={d.val_fraction} must be in (0, 1): the share of "
                 "the digits held out for validation.")
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
    _require(t.eval_batch_size >= 1,
             f"config.train.eval_batch_size={t.eval_batch_size} must be positive.")
    if device_count is not None:
        check_batch_split(config, device_count, process_count)
    _require(t.num_epochs >= 1, f"config.train.num_epochs={t.num_epochs} must be at least 1.")
    _require(t.profile_num_steps >= 1,
             f"config.train.profile_num_steps={t.profile_num_steps} must be at least 1 "
             "(profiling is off while config.train.profile_first_step is -1).")
    try:
        optim.check_train_config(t)  # learning rate, momentum, decay, clipping, plateau_*
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for field in ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps"):
        _require(t[field] >= 1, f"config.train.{field}={t[field]} must be at least 1.")
    _require(config.checkpoint.max_to_keep >= 1,
             f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be at least 1 "
             "(the newest checkpoint is what a resume needs).")
    _require(config.checkpoint.keep_best >= 0,
             f"config.checkpoint.keep_best={config.checkpoint.keep_best} must be 0 or more.")
    _require(config.wandb.mode in writers.WANDB_MODES,
             f"config.wandb.mode={config.wandb.mode!r} is unknown; use one of "
             f"{writers.WANDB_MODES}.")

    from vgg_jax.evaluation.protocols import PROTOCOLS

    ev = config.eval
    _require(ev.protocol in PROTOCOLS,
             f"config.eval.protocol={ev.protocol!r} is unknown; use one of {PROTOCOLS}.")
    for q in ev.scales:
        _require(isinstance(q, int) or str(q).strip().isdigit(),
                 f"config.eval.scales holds {q!r}, not a whole number of pixels; pass e.g. "
                 "--config.eval.scales=256,384,512.")
        _require(int(q) >= d.image_size,
                 f"config.eval.scales holds {q}, smaller than the crop config.data.image_size="
                 f"{d.image_size}; use test scales of at least the crop.")
    _require(ev.multi_crop_grid >= 1,
             f"config.eval.multi_crop_grid={ev.multi_crop_grid} must be at least 1 (the paper: 5).")
    _require(ev.batch_size >= 1, f"config.eval.batch_size={ev.batch_size} must be positive.")
    _require(ev.dense_size_step >= 1,
             f"config.eval.dense_size_step={ev.dense_size_step} must be at least 1 pixel "
             "(32, the net's stride, keeps compilations few).")

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


def check_batch_split(config: ml_collections.ConfigDict, device_count: int,
                      process_count: int = 1) -> None:
    """Checks that the training and validation batches split evenly over the devices.

    Args:
      config: the full run config (batch fields already checked by `validate_config`).
      device_count: devices over all processes.
      process_count: number of processes.

    Raises:
      ConfigError: naming the batch field and a size that divides.
    """
    t = config.train
    micro_batch = t.batch_size // t.grad_accum_steps
    _require(micro_batch % device_count == 0 and micro_batch % process_count == 0,
             f"config.train.batch_size={t.batch_size} (per accumulation step {micro_batch}) is "
             f"not divisible by the {device_count} devices; use a multiple of {device_count}.")
    _require(t.eval_batch_size % device_count == 0,
             f"config.train.eval_batch_size={t.eval_batch_size} is not divisible by the "
             f"{device_count} devices; use a multiple of {device_count}.")


def check_resumable(saved_config: Mapping[str, Any], config: ml_collections.ConfigDict,
                    workdir: str) -> None:
    """Checks that a run can resume from a checkpoint saved under `saved_config`.

    Args:
      saved_config: the config stored with the checkpoint (JSON: tuples are lists).
      config: this run's config.
      workdir: the run's directory, for the message.

    Raises:
      ConfigError: naming every field of RESUME_FIELDS whose value differs.
    """
    differences, current_config = [], config.to_dict()
    for path in RESUME_FIELDS:
        saved, current = saved_config, current_config
        for key in path.split("."):
            saved = saved.get(key, _MISSING) if isinstance(saved, Mapping) else _MISSING
            current = current.get(key, _MISSING) if isinstance(current, Mapping) else _MISSING
        if saved is _MISSING or current is _MISSING:
            continue  # a field older checkpoints did not record
        if path == "model.version":
            saved, current = canonical_version(saved), canonical_version(current)
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(current)):
            differences.append(f"config.{path}={current!r} (saved: {saved!r})")
    _require(not differences,
             f"{workdir} holds a run saved with other settings, {'; '.join(differences)}; "
             "rerun with the saved values to resume it, or pass a new --workdir.")
