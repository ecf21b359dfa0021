"""timm's VGG layout <-> torchvision's, as state dicts of arrays (no torch, no timm).

timm publishes torchvision's ImageNet weights (`timm/vgg16.tv_in1k` on the Hugging Face
hub) with the same `features.N.*` keys, but with the FC layers written as convolutions:

  torchvision                         timm
  classifier.0.weight (F, C * w * w)  pre_logits.fc1.weight (F, C, w, w)   fc6, a w x w conv
  classifier.3.weight (F, F)          pre_logits.fc2.weight (F, F, 1, 1)   fc7, a 1x1 conv
  classifier.6.weight (K, F)          head.fc.weight (K, F)                fc8, linear
  (biases alike: classifier.0.bias <-> pre_logits.fc1.bias, ...)

torchvision flattens the NCHW map channel-major (index c * w * w + y * w + x), which is the
order of a (F, C, w, w) kernel's trailing axes, so both directions are plain reshapes. The
values may be numpy arrays or jax.ShapeDtypeStructs (a file's header, read for its shapes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# torchvision's key -> timm's, for the three FC layers.
_FC_KEYS = {
    "classifier.0": "pre_logits.fc1",
    "classifier.3": "pre_logits.fc2",
    "classifier.6": "head.fc",
}
# The key whose presence tells timm's layout apart from torchvision's.
TIMM_MARKER = "pre_logits.fc1.weight"


def is_timm_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a VGG state dict is in timm's layout (FC layers as pre_logits convs).

    Args:
      state_dict: key -> array (or anything with a shape).

    Returns:
      True when it has timm's `pre_logits.fc1.weight`.
    """
    return TIMM_MARKER in state_dict


def _reshape(value: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, value.dtype)
    return np.reshape(value, shape)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm's VGG state dict -> torchvision's layout (the FC convs flattened back).

    Args:
      state_dict: timm keys (`features.N.*`, `pre_logits.fc1/fc2.*`, `head.fc.*`).

    Returns:
      The same values under torchvision's keys, fc6 and fc7 reshaped to matrices.

    Raises:
      ValueError: if an FC key is missing or not of the shape timm writes.
    """
    by_timm = {timm: tv for tv, timm in _FC_KEYS.items()}
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in by_timm:
            key = f"{by_timm[prefix]}.{leaf}"
            if leaf == "weight" and prefix.startswith("pre_logits"):
                shape = _shape(value)
                if len(shape) != 4:
                    raise ValueError(f"{prefix}.weight has shape {shape}; timm writes it as a "
                                     "4-D convolution kernel (out, in, h, w).")
                value = _reshape(value, (shape[0], shape[1] * shape[2] * shape[3]))
        out[key] = value
    missing = [f"{timm}.{leaf}" for tv, timm in _FC_KEYS.items() for leaf in ("weight", "bias")
               if f"{tv}.{leaf}" not in out]
    if missing:
        raise ValueError(f"Keys {missing} missing from a timm VGG state dict.")
    return out


def to_timm(state_dict: Mapping[str, Any], last_channels: int) -> dict[str, Any]:
    """torchvision's VGG state dict -> timm's layout (what timm's own VGG loads).

    Args:
      state_dict: torchvision keys, e.g. from `torchvision_format.to_torchvision`.
      last_channels: the channels of the last conv (512 at full width), which fix fc6's
        kernel shape.

    Returns:
      The same values under timm's keys, fc6 as a (F, C, w, w) and fc7 as a (F, F, 1, 1)
      kernel; `features.N.*` (batch norm included) unchanged.

    Raises:
      ValueError: if fc6's inputs are not `last_channels` times a square window.
    """
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in _FC_KEYS:
            if leaf == "weight" and prefix == "classifier.0":
                features, inputs = _shape(value)
                window = math.isqrt(inputs // last_channels)
                if window * window * last_channels != inputs:
                    raise ValueError(f"classifier.0.weight has {inputs} inputs, not "
                                     f"{last_channels} channels times a square window.")
                value = _reshape(value, (features, last_channels, window, window))
            elif leaf == "weight" and prefix == "classifier.3":
                value = _reshape(value, (*_shape(value), 1, 1))
            key = f"{_FC_KEYS[prefix]}.{leaf}"
        out[key] = value
    return out
