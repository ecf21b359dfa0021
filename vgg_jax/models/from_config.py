"""config.model's rules, the layers fine-tuning names, and the net a config describes.

The last layer (fc8) scores the classes, or, for the paper's localisation nets (Appendix A,
`config.model.box_regression`), regresses boxes: 4 numbers (centre x, centre y, width,
height) per class (per-class regression, PCR) or 4 shared by every class (single-class
regression, SCR).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vgg_jax.config_values import ConfigError, require, string_list
from vgg_jax.models.vgg import (
    ARCHITECTURES,
    COMPUTE_DTYPES,
    HEAD_LAYERS,
    INITIALIZERS,
    VERSIONS,
    VGG,
    canonical_version,
    check_image_size,
    create_model,
    layer_names,
)


def check_config(model_config: Any, image_size: int) -> None:
    """The rules of config.model, and the crop size the net can take.

    Args:
      model_config: config.model.
      image_size: config.data.image_size, the side of the net's input.

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    m = model_config
    try:
        canonical_version(m.version)
    except ValueError:
        raise ConfigError(
            f"config.model.version={m.version!r} is not a VGG configuration; use one of "
            f"{', '.join(VERSIONS)} (e.g. --config.model.version=D).") from None
    require(m.num_classes >= 1, f"config.model.num_classes={m.num_classes} must be at least 1.")
    require(m.width_divisor >= 1,
            f"config.model.width_divisor={m.width_divisor} must be 1 (the paper) or more.")
    require(m.fc_features >= 1, f"config.model.fc_features={m.fc_features} must be positive.")
    require(0.0 <= m.dropout_rate < 1.0,
            f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1) (the paper: 0.5).")
    require(m.initializer in INITIALIZERS,
            f"config.model.initializer={m.initializer!r} is unknown; use one of {INITIALIZERS}.")
    require(m.compute_dtype in COMPUTE_DTYPES,
            f"config.model.compute_dtype={m.compute_dtype!r} is unknown; use one of "
            f"{COMPUTE_DTYPES}.")
    check_image_size(image_size, "config.data.image_size")
    regression = m.get("box_regression", "")
    require(regression in ("", *BOX_REGRESSIONS),
            f"config.model.box_regression={regression!r} is unknown; use '' (a classifier), "
            f"'{PER_CLASS}' (the paper's PCR, 4 outputs per class) or '{SINGLE_CLASS}' (SCR, 4 "
            "outputs shared by every class).")


# config.model.box_regression: fc8 regresses a box per class (PCR) or one box for all (SCR).
PER_CLASS, SINGLE_CLASS = "per_class", "single_class"
BOX_REGRESSIONS = (PER_CLASS, SINGLE_CLASS)
# A box is (centre x, centre y, width, height).
BOX_COORDINATES = 4


def is_box_regressor(config: Any) -> bool:
    """Whether a run config describes a localisation net (fc8 regresses boxes).

    Args:
      config: a full run config (configs saved before localisation existed have no field).

    Returns:
      True when config.model.box_regression is set.
    """
    return bool(config.model.get("box_regression", ""))


def head_width(num_classes: int, box_regression: str = "") -> int:
    """fc8's width: the classes, or the box outputs of a localisation net.

    Args:
      num_classes: the data set's classes.
      box_regression: "" (a classifier), PER_CLASS or SINGLE_CLASS.

    Returns:
      num_classes, 4 * num_classes (PCR) or 4 (SCR).
    """
    if not box_regression:
        return num_classes
    return BOX_COORDINATES * (num_classes if box_regression == PER_CLASS else 1)


def parameter_layers(version: str) -> tuple[str, ...]:
    """The layers with parameters of a configuration: its convs, then fc6, fc7, fc8.

    Args:
      version: one of VERSIONS (any spelling `canonical_version` takes).

    Returns:
      Layer names in forward order (batch norms not listed: they follow their conv).
    """
    names = layer_names(ARCHITECTURES[canonical_version(version)])
    return tuple(name for name in names if name.startswith("conv")) + HEAD_LAYERS


def select_layers(patterns: Sequence[str], version: str) -> tuple[str, ...]:
    """The layers named by shell-style patterns ("conv*", "conv1_?", "fc6").

    Args:
      patterns: fnmatch patterns, matched against `parameter_layers(version)`.
      version: the net's configuration.

    Returns:
      The matching layers, in forward order.

    Raises:
      ValueError: if a pattern matches no layer (naming it and listing the layers).
    """
    layers = parameter_layers(version)
    for pattern in patterns:
        if not fnmatch.filter(layers, pattern):
            raise ValueError(
                f"{pattern!r} names no layer of net {canonical_version(version)}; its layers "
                f"are {', '.join(layers)} (patterns like 'conv*' or 'conv1_?' work too).")
    return tuple(name for name in layers if any(fnmatch.fnmatch(name, p) for p in patterns))


def check_frozen_layers(patterns: Sequence[str], version: str) -> None:
    """The rule of config.train.frozen_layers: known layers, and not all of them.

    Args:
      patterns: config.train.frozen_layers.
      version: config.model.version.

    Raises:
      ConfigError: one sentence naming the pattern or the fix.
    """
    patterns = string_list(patterns)
    try:
        frozen = select_layers(patterns, version)
    except ValueError as error:
        raise ConfigError(f"config.train.frozen_layers: {error}") from None
    require(len(frozen) < len(parameter_layers(version)),
            f"config.train.frozen_layers={tuple(patterns)} freezes every layer, so nothing "
            "would train; leave the new head (fc8) out of it.")


def compute_dtype(name: str) -> Any:
    """Resolves config.model.compute_dtype.

    Args:
      name: "auto" (bfloat16 on GPU/TPU, float32 on CPU) or a dtype name.

    Returns:
      The jnp dtype the net computes in (parameters stay float32).
    """
    if name == "auto":
        accelerated = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
        return jnp.bfloat16 if accelerated else jnp.float32
    return jnp.dtype(name)


# config.model's fields that only matter for training the net.
_TRAINING_FIELDS = ("dropout_rate", "initializer", "normal_init_stddev")


def create_model_from_config(config: Any) -> VGG:
    """Builds the net described by config.model at the crop size config.data.image_size.

    Args:
      config: a full run config.

    Returns:
      The flax module.
    """
    m = config.model
    # Weights from other frameworks come with the fields that describe the net alone
    # (vgg_jax.weights.net_config); their training settings take create_model's defaults.
    training = {field: m[field] for field in _TRAINING_FIELDS if field in m}
    return create_model(
        m.version,
        num_classes=head_width(m.num_classes, m.get("box_regression", "")),
        image_size=config.data.image_size,
        width_divisor=m.width_divisor,
        fc_features=m.fc_features,
        **training,
        # Configs saved before batch norm existed have no such field.
        batch_norm=bool(m.get("batch_norm", False)),
        # Fine-tuning: the layers config.train.frozen_layers keeps fixed.
        frozen=select_layers(string_list(
            config.train.get("frozen_layers", ()) if "train" in config else ()), m.version),
        dtype=compute_dtype(m.get("compute_dtype", "auto")),
    )


