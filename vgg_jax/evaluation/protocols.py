"""What each of the paper's test protocols (section 3.2) computes.

Protocols, each at one or several test scales Q (the image's shorter side after isotropic
rescaling):

  single_crop       the centre image_size x image_size crop (training's validation).
  dense             the net run fully-convolutionally over the whole rescaled image (the
                    model's head already is convolutional); its class score map is averaged
                    spatially, turned into a softmax, and averaged with that of the
                    horizontally flipped image.
  multi_crop        a regular grid x grid of image_size crops (5 x 5 in the paper) and their
                    flips: the softmax averaged over the 2 * grid^2 crops.
  dense+multi_crop  the average of the dense and the multi-crop softmax.

Several scales average the softmax over scales; several nets (an ensemble) average the
softmax over nets. Every level averages with equal weights, as the paper does.

The views themselves are made on the host by vgg_jax.data.transforms; this module says
which views and flips a protocol needs, which test scales the paper uses, and holds the
device function that turns one image's views into class probabilities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vgg_jax.config_values import require
from vgg_jax.data.transforms import DENSE, MULTI_CROP, SINGLE_CROP, single_test_scale
from vgg_jax.preprocess import normalize_images

DENSE_MULTI_CROP = "dense+multi_crop"
PROTOCOLS = (SINGLE_CROP, DENSE, MULTI_CROP, DENSE_MULTI_CROP)
# Paper 3.2: multi-scale testing of a fixed-S net uses Q in {S - 32, S, S + 32}.
_MULTI_SCALE_OFFSET = 32

__all__ = [
    "DENSE",
    "DENSE_MULTI_CROP",
    "MULTI_CROP",
    "PROTOCOLS",
    "SINGLE_CROP",
    "Protocol",
    "class_probabilities",
    "components",
    "log_probabilities",
    "scales_for",
]


def components(protocol: str) -> tuple[str, ...]:
    """The passes a protocol needs: ("dense", "multi_crop") for the combined protocol.

    Args:
      protocol: one of PROTOCOLS.

    Returns:
      The component names, in the order they are run and reported.

    Raises:
      ValueError: for an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"Unknown config.eval.protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
        )
    return (DENSE, MULTI_CROP) if protocol == DENSE_MULTI_CROP else (protocol,)


def check_config(eval_config: Any, image_size: int) -> None:
    """The rules of config.eval, beside the protocols that interpret it.

    Args:
      eval_config: config.eval.
      image_size: config.data.image_size (the crop every test scale must reach).

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    ev = eval_config
    require(ev.protocol in PROTOCOLS,
            f"config.eval.protocol={ev.protocol!r} is unknown; use one of {PROTOCOLS}.")
    for q in ev.scales:
        require(isinstance(q, int) or str(q).strip().isdigit(),
                f"config.eval.scales holds {q!r}, not a whole number of pixels; pass e.g. "
                "--config.eval.scales=256,384,512.")
        require(int(q) >= image_size,
                f"config.eval.scales holds {q}, smaller than the crop config.data.image_size="
                f"{image_size}; use test scales of at least the crop.")
    require(ev.multi_crop_grid >= 1,
            f"config.eval.multi_crop_grid={ev.multi_crop_grid} must be at least 1 (the paper: 5).")
    require(ev.batch_size >= 1, f"config.eval.batch_size={ev.batch_size} must be positive.")
    require(ev.dense_size_step >= 1,
            f"config.eval.dense_size_step={ev.dense_size_step} must be at least 1 pixel "
            "(32, the net's stride, keeps compilations few).")


def scales_for(
    train_scale: tuple[int, int], multi_scale: bool = False, explicit: Sequence[int] = ()
) -> tuple[int, ...]:
    """The test scales Q the paper uses for a net trained at scale S (3.2, 4.1, 4.2).

    Args:
      train_scale: (S_min, S_max) the net was trained with (equal for fixed S).
      multi_scale: the paper's multi-scale set: {S-32, S, S+32} for fixed S,
        {S_min, (S_min+S_max)/2, S_max} ({256, 384, 512}) for jittered S. Otherwise the
        single-scale protocol: Q = S for fixed S, (S_min+S_max)/2 (384) for jittered S.
      explicit: scales given by the user (config.eval.scales); used as given when any.

    Returns:
      A tuple of test scales.
    """
    if len(explicit):
        return tuple(int(q) for q in explicit)
    lo, hi = int(train_scale[0]), int(train_scale[1])
    mid = single_test_scale(lo, hi)
    if not multi_scale:
        return (mid,)
    if lo == hi:
        return (lo - _MULTI_SCALE_OFFSET, lo, lo + _MULTI_SCALE_OFFSET)
    return (lo, mid, hi)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One protocol at its test scales, with the settings its views need.

    Attributes:
      name: one of PROTOCOLS.
      scales: the test scales Q (softmax averaged over them).
      grid: crops per side of the multi-crop grid (paper: 5).
      flip: average with horizontal flips in dense and multi-crop evaluation (paper: yes).
      dense_size_step: dense views are cropped to multiples of this (bounds compilations).
    """

    name: str
    scales: tuple[int, ...]
    grid: int = 5
    flip: bool = True
    dense_size_step: int = 32

    def __post_init__(self):
        components(self.name)  # raises for an unknown protocol
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        if not self.scales:
            raise ValueError("No test scale given.")

    @classmethod
    def from_config(cls, eval_config: Any, scales: Sequence[int]) -> Protocol:
        """The protocol of a config.eval section at the given scales.

        Args:
          eval_config: config.eval (protocol, multi_crop_grid, flip, dense_size_step; a
            checkpoint's saved section may lack newer fields, which take the defaults).
          scales: the test scales.

        Returns:
          The Protocol.
        """
        get = eval_config.get
        return cls(str(get("protocol", DENSE)), tuple(scales), int(get("multi_crop_grid", 5)),
                   bool(get("flip", True)), int(get("dense_size_step", 32)))

    @property
    def components(self) -> tuple[str, ...]:
        return components(self.name)

    def host_views(self, component: str) -> int:
        """Views per image the host makes for a component (multi-crop flips included)."""
        if component == MULTI_CROP:
            return (2 if self.flip else 1) * self.grid**2
        return 1

    def device_flip(self, component: str) -> bool:
        """Whether the device adds each view's flip (dense only; multi-crop flips are views)."""
        return self.flip and component == DENSE

    def cost(self, component: str, shape: tuple[int, int], image_size: int) -> int:
        """Net inputs of image_size^2 one image of view `shape` costs (views, flips, area).

        Args:
          component: a component of this protocol.
          shape: the (height, width) of the image's views.
          image_size: the crop side.

        Returns:
          A positive integer: the unit of config.eval.batch_size.
        """
        flips = 2 if self.device_flip(component) else 1
        area = math.ceil(shape[0] * shape[1] / image_size**2)
        return self.host_views(component) * flips * area


def log_probabilities(
    model, mean_rgb, std_rgb, flip: bool, variables, views: jax.Array
) -> jax.Array:
    """Log of the softmax averaged over an image's views (and flips): every protocol's core.

    Args:
      model: the VGG module.
      mean_rgb, std_rgb: input normalisation.
      flip: also run every view flipped horizontally and average the two softmax outputs.
      variables: the net's {"params"[, "batch_stats"]} (batch norm uses the running
        averages).
      views: uint8 [B, V, H, W, 3]; V crops of one image (V = 1 for single crop and dense),
        each at least image_size on both sides.

    Returns:
      float32 [B, classes]. A view larger than image_size gives a class score map, which is
      averaged spatially before the softmax (dense evaluation, paper 3.2). Computed in log
      space, so that one view's result is exactly its log-softmax (training's loss).
    """
    b, v = views.shape[:2]
    x = views.reshape((b * v,) + views.shape[2:])
    x = normalize_images(x, mean_rgb, std_rgb, None, model.dtype)
    if flip:
        # Stacked next to each original so that a device's rows stay on that device.
        x = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape((-1,) + x.shape[1:])
    scores = model.apply(variables, x, train=False, dense=True)
    scores = scores.astype(jnp.float32).mean(axis=(1, 2))
    log_probs = jax.nn.log_softmax(scores, axis=-1).reshape(b, -1, scores.shape[-1])
    n = log_probs.shape[1]
    if n == 1:
        return log_probs[:, 0]
    return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(float(n))


def class_probabilities(
    model, mean_rgb, std_rgb, flip: bool, variables, views: jax.Array
) -> jax.Array:
    """The softmax averaged over an image's views (and flips), [B, classes].

    Args and shapes: as `log_probabilities`, whose exponential this is.
    """
    return jnp.exp(log_probabilities(model, mean_rgb, std_rgb, flip, variables, views))
