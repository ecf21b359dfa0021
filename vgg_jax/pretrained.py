"""Pretrained VGG in one line: a net, its variables, its preprocessing and class names.

  from vgg_jax import pretrained
  net = pretrained.load("vgg16")                    # torchvision's ImageNet weights (hub)
  logits = net.model.apply(net.variables, net.preprocess(images))   # uint8 [N, H, W, 3]
  net.class_names[int(logits[0].argmax())]

  trunk = pretrained.load("vgg19", include_head=False)        # perceptual / style losses
  feats = trunk.model.apply(trunk.variables, trunk.preprocess(images),
                            outputs=("conv1_2", "conv2_2", "conv3_4", "conv4_4"))

`load` takes any spec of `vgg_jax.weights.specs` (vgg11 ... vgg19_bn, hf-hub:ORG/NAME
[@REVISION], .safetensors, .npz, .pth, .caffemodel, a run's DIR[@STEP]); what it returns
carries the preprocessing and scales the weights were trained with, so `preprocess` is
right for them: torchvision's and timm's 0-1 inputs normalised by ImageNet's mean and
std, the authors' Caffe nets' mean pixel, a run's own config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from vgg_jax.data import transforms
from vgg_jax.data.class_names import class_names_for
from vgg_jax.models import HEAD_LAYERS, VGG, create_model_from_config
from vgg_jax.models.vgg import POOLINGS
from vgg_jax.preprocess import normalize_images
from vgg_jax.weights import specs


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded net and everything needed to feed it.

    Attributes:
      model: the flax module (`vgg_jax.models.create_model`'s), in evaluation mode by
        default: `model.apply(variables, x)` gives logits (or, without the head, pool5).
      variables: {"params"[, "batch_stats"]} as host numpy arrays.
      class_names: the name of class i at position i (ImageNet's for a 1000-class net);
        empty without the head.
      mean_rgb, std_rgb: the input normalisation, 0-255 scale (see `preprocess`).
      image_size: the crop side the head was trained on (224 for torchvision's nets).
      train_scales: (S_min, S_max), the training scale (equal for a fixed S).
      test_scale: Q, the single test scale: the shorter side images are rescaled to
        before the centre crop (256 for torchvision's nets, 384 for S in [256, 512]).
      config: the run config the weights came with (vgg_jax.weights.net_config for
        foreign weights).
      spec: what was loaded.
      step: the checkpoint step (0 for weights not from a run).
    """

    model: VGG
    variables: Mapping[str, Any]
    class_names: tuple[str, ...]
    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float]
    image_size: int
    train_scales: tuple[int, int]
    test_scale: int
    config: ml_collections.ConfigDict
    spec: str
    step: int

    def preprocess(self, images: Any) -> jax.Array:
        """Pixels -> the input these weights were trained on (any image size).

        Args:
          images: uint8 RGB, [N, H, W, 3] (or one [H, W, 3] image), on the 0-255 scale.

        Returns:
          float32 [N, H, W, 3]: (images - mean_rgb) / std_rgb.
        """
        x = jax.numpy.asarray(images)
        if x.ndim == 3:
            x = x[None]
        return normalize_images(x, self.mean_rgb, self.std_rgb)

    def centre_crop(self, image: str | bytes) -> np.ndarray:
        """An image file as the net's single-crop test view: rescaled to shorter side
        `test_scale`, its centre `image_size` square (torchvision's resize-256 and
        centre-crop-224 for its weights); the view evaluation and prediction make.

        Args:
          image: a path or the encoded bytes (JPEG, PNG, ...).

        Returns:
          uint8 [image_size, image_size, 3], for `preprocess`.
        """
        if isinstance(image, str):
            with open(image, "rb") as f:
                image = f.read()
        return transforms.centre_view(image, self.test_scale, self.image_size)


def load(spec: str, *, include_head: bool = True, pooling: str | None = None,
         step: int | str | None = None) -> Pretrained:
    """Loads a pretrained VGG from any spec.

    Args:
      spec: vgg11 ... vgg19, vgg11_bn ... vgg19_bn (torchvision's ImageNet weights from
        the hub), hf-hub:ORG/NAME[@REVISION], a .safetensors, .npz, .pth or .caffemodel
        file, or a run's DIR[@STEP] (see vgg_jax.weights.specs).
      include_head: False: the convolutional trunk alone (for features of any input
        size), without fc6-fc8's variables.
      pooling: without the head, "avg" or "max" pools pool5 over space ([N, channels]).
      step: a run's checkpoint step (number, "best", "latest"); None: the best.

    Returns:
      A Pretrained.

    Raises:
      ValueError: one sentence for a spec that cannot be loaded (a missing file, a repo
        not cached while offline with the command that fetches it, keys of no VGG, ...).
    """
    loaded = specs.load(spec, step)
    config = loaded.config
    model = create_model_from_config(config)
    variables = dict(loaded.variables)
    if pooling is not None and (include_head or pooling not in POOLINGS):
        raise ValueError(f"pooling={pooling!r}: global pooling is one of {POOLINGS} and "
                         "replaces the head: pass include_head=False with it.")
    if not include_head:
        model = model.clone(include_head=False, pooling=pooling)
        variables["params"] = {name: value for name, value in variables["params"].items()
                               if name not in HEAD_LAYERS}
    d = config.data
    train_scales = (int(d.train_scale_min), int(d.train_scale_max))
    names = tuple(class_names_for(config, model.num_classes)) if include_head else ()
    return Pretrained(
        model=model, variables=variables, class_names=names,
        mean_rgb=tuple(float(v) for v in d.mean_rgb),
        std_rgb=tuple(float(v) for v in d.get("std_rgb", (1.0, 1.0, 1.0))),
        image_size=int(d.image_size), train_scales=train_scales,
        test_scale=transforms.single_test_scale(*train_scales), config=config,
        spec=str(spec), step=int(loaded.step))
