"""On-device image normalisation: the float part of preprocessing.

The input pipeline ships uint8 pixels (4x less host-to-device traffic than float32, and no
float work on the CPU); the device subtracts the mean RGB (the paper's only preprocessing,
3.1), adds the per-image PCA colour shift drawn by the pipeline, and divides by the
per-channel scale (1 for the paper's recipe; imported torchvision weights use ImageNet's
standard deviation).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vgg_jax.config_values import require


def check_config(data_config) -> None:
    """The rules of config.data.mean_rgb and std_rgb, which `normalize_images` applies.

    Args:
      data_config: config.data.

    Raises:
      ConfigError: naming the fields.
    """
    require(len(data_config.mean_rgb) == 3 and len(data_config.std_rgb) == 3
            and min(data_config.std_rgb) > 0,
            "config.data.mean_rgb and config.data.std_rgb must hold three values, std_rgb "
            "positive.")


def normalize_images(
    images: jax.Array,
    mean_rgb: Sequence[float],
    std_rgb: Sequence[float],
    rgb_shift: jax.Array | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """Turns uint8 NHWC pixels into the network's float input.

    Args:
      images: uint8 (or float) pixels on a 0-255 scale, [N, H, W, 3].
      mean_rgb: per-channel mean to subtract, 0-255 scale.
      std_rgb: per-channel divisor applied after the subtraction.
      rgb_shift: optional per-image colour offset [N, 3], 0-255 scale.
      dtype: the compute dtype of the result.

    Returns:
      (images - mean_rgb + rgb_shift) / std_rgb in `dtype`.
    """
    x = images.astype(jnp.float32) - jnp.asarray(mean_rgb, jnp.float32)
    if rgb_shift is not None:
        x = x + rgb_shift.astype(jnp.float32)[:, None, None, :]
    x = x / jnp.asarray(std_rgb, jnp.float32)
    return x.astype(dtype)
