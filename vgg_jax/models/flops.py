"""Analytic compute cost of a VGG net, counted from the model itself.

The count comes from the model's own layer shapes, not from a table: `jax.eval_shape`
traces one forward pass (nothing is allocated or computed) and captures, for every
convolution (FC6-FC8 are convolutions too, see models/vgg.py), its kernel shape
[kh, kw, in, out] and its output shape [1, h, w, out]. One output value of a layer costs
kh * kw * in multiply-accumulates (MACs), so the layer costs h * w * kh * kw * in * out.
Bias adds, ReLUs, max-pools, dropout and the loss are not counted: they are a fraction of
a percent of the total and the paper's figures (A 7.61G ... E 19.63G MACs at 224x224)
count only the conv and FC multiply-accumulates as well.

Training cost convention: a training step costs 3 forward passes' worth of matmul work
(the forward pass, the gradient with respect to the activations, and the gradient with
respect to the weights, each the same number of MACs), and a MAC is 2 FLOPs, so one
training image costs 6 x forward MACs FLOPs (VGG-16 at 224: ~92.8 GFLOP). The first
convolution needs no activation gradient, so the exact figure is about 1% lower; the 3x
convention is the usual one for model-FLOPs utilisation (MFU) and is kept as is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_jax.models.vgg import TOTAL_STRIDE, VGG

# FLOPs per multiply-accumulate.
FLOPS_PER_MAC = 2
# Forward + activation gradient + weight gradient, each one forward's worth of MACs.
TRAIN_PASSES = 3
TRAIN_FLOPS_PER_MAC = FLOPS_PER_MAC * TRAIN_PASSES


def layer_macs(model: VGG, image_size: int | None = None) -> dict[str, int]:
    """Forward multiply-accumulates of each weight layer for one image.

    Args:
      model: the net (any width, head size or compute dtype).
      image_size: side of the square input; default (None) the model's training size
        model.image_size, the classification pass. A larger size counts the paper's
        dense evaluation (the fully-convolutional net over the whole image, FC6 sliding
        over the final feature map), which is what the model computes there.

    Returns:
      {layer name: MACs}, in the order of the forward pass (conv1_1, ..., fc8).

    Raises:
      ValueError: if image_size is smaller than the model's training size or not a
        multiple of 32.
    """
    size = model.image_size if image_size is None else int(image_size)
    if size < model.image_size or size % TOTAL_STRIDE:
        raise ValueError(
            f"image_size={size} must be a multiple of {TOTAL_STRIDE} and at least the model's "
            f"training size {model.image_size} (FC6 covers a {model.head_window}x"
            f"{model.head_window} window of the final feature map)."
        )
    dense = size != model.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def trace(x):
        variables = model.init(jax.random.key(0), x, train=False, dense=dense)
        _, state = model.apply(
            variables, x, train=False, dense=dense,
            capture_intermediates=lambda module, _: isinstance(module, (nn.Conv, nn.Dense)),
            mutable=["intermediates"],
        )
        return variables["params"], state["intermediates"]

    params, outputs = jax.eval_shape(trace, images)
    macs = {}
    for name, layer_outputs in outputs.items():
        (out,) = layer_outputs["__call__"]
        kernel = params[name]["kernel"].shape
        # [1, h, w, out] or [1, out] (a Dense layer): every output value costs the
        # kernel's fan-in (all kernel axes but the last) multiply-accumulates.
        positions = 1
        for dim in out.shape[1:-1]:
            positions *= dim
        fan_in = 1
        for dim in kernel[:-1]:
            fan_in *= dim
        macs[name] = positions * out.shape[-1] * fan_in
    return macs


def forward_macs(model: VGG, image_size: int | None = None) -> int:
    """Forward multiply-accumulates of one image (conv and FC layers).

    Args:
      model: the net.
      image_size: input side; default the model's training size (see `layer_macs`).

    Returns:
      MACs per image, e.g. 15,470,264,320 for VGG-16 (D) at 224x224 with 1000 classes.
    """
    return sum(layer_macs(model, image_size).values())


def train_flops_per_image(model: VGG, image_size: int | None = None) -> int:
    """FLOPs of one training image: 6 x forward MACs (3 passes x 2 FLOPs per MAC).

    Args:
      model: the net.
      image_size: input side; default the model's training size.

    Returns:
      FLOPs per image of a training step (about 92.8e9 for VGG-16 at 224x224).
    """
    return TRAIN_FLOPS_PER_MAC * forward_macs(model, image_size)
