"""The run config of weights that no run of ours wrote: the net and its preprocessing.

Evaluation, prediction, fine-tuning and export read a net's shape, its input normalisation
and the scales it was trained at from its run's config. Weights from other frameworks get
a config of those fields alone (the training recipe is not theirs to say), in our units:
data.mean_rgb and data.std_rgb on the 0-255 scale, data.image_size the crop, and
data.train_scale_min/max the training scale S, whose single test scale Q (= S, or 384 for S
in [256, 512]) is the rescale before the centre crop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from vgg_jax.data import imagenet

# torchvision's evaluation resize (shorter side) before the 224 centre crop: its
# published accuracies, and timm's crop_pct 0.875 at 224 (224 / 0.875 = 256).
TORCHVISION_RESIZE = 256


class Preprocessing(NamedTuple):
    """How a net's inputs were made, in our config's units.

    Attributes:
      mean_rgb: subtracted per channel, 0-255 scale.
      std_rgb: divided by per channel after the subtraction, 0-255 scale.
      train_scales: (S_min, S_max), the training scale S (or its jitter range).
      origin: where this preprocessing comes from, for messages.
    """

    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float]
    train_scales: tuple[int, int]
    origin: str


def _on_255_scale(values: Sequence[float]) -> tuple[float, float, float]:
    return tuple(255.0 * float(v) for v in values)  # type: ignore[return-value]


# torchvision's ImageNet weights: 0-1 inputs normalised by ImageNet's mean and std, resize
# to 256 and a centre crop of 224 for evaluation.
TORCHVISION = Preprocessing(
    _on_255_scale(imagenet.TORCHVISION_MEAN), _on_255_scale(imagenet.TORCHVISION_STD),
    (TORCHVISION_RESIZE, TORCHVISION_RESIZE), "torchvision's ImageNet normalisation")


def from_timm_config(config: Mapping[str, Any] | None) -> Preprocessing:
    """The preprocessing a timm `config.json` gives (its `pretrained_cfg`).

    Args:
      config: the parsed config.json of a timm model repo, or None.

    Returns:
      Its mean and std (0-1 there, 0-255 here) and S = Q = input size / crop_pct;
      torchvision's preprocessing for a missing config or missing fields.
    """
    if not config:
        return TORCHVISION
    cfg = config.get("pretrained_cfg") or config
    mean = cfg.get("mean", imagenet.TORCHVISION_MEAN)
    std = cfg.get("std", imagenet.TORCHVISION_STD)
    scale = TORCHVISION_RESIZE
    if cfg.get("input_size") and cfg.get("crop_pct"):
        scale = round(int(cfg["input_size"][-1]) / float(cfg["crop_pct"]))
    return Preprocessing(_on_255_scale(mean), _on_255_scale(std), (scale, scale),
                         "timm's pretrained_cfg")


def describe(version: str, options: Mapping[str, Any],
             preprocessing: Preprocessing) -> ml_collections.ConfigDict:
    """The run config of foreign weights: the net's shape and its preprocessing.

    Args:
      version: our version key ("A" ... "E").
      options: `torchvision_format.infer_model_options` of the state dict.
      preprocessing: the inputs the weights were trained on.

    Returns:
      A ConfigDict with model.{version, num_classes, width_divisor, fc_features,
      batch_norm} and data.{image_size, mean_rgb, std_rgb, train_scale_min,
      train_scale_max}.
    """
    return ml_collections.ConfigDict({
        "model": {
            "version": version,
            "num_classes": int(options["num_classes"]),
            "width_divisor": int(options["width_divisor"]),
            "fc_features": int(options["fc_features"]),
            "batch_norm": bool(options["batch_norm"]),
        },
        "data": {
            "image_size": int(options["image_size"]),
            "mean_rgb": tuple(float(v) for v in preprocessing.mean_rgb),
            "std_rgb": tuple(float(v) for v in preprocessing.std_rgb),
            "train_scale_min": int(preprocessing.train_scales[0]),
            "train_scale_max": int(preprocessing.train_scales[1]),
        },
    })
