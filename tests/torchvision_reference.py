"""torchvision's VGG in numpy, for tests without torch: random state dicts in its layout
(plain and `_bn`, narrowed like our width_divisor) and its eval-mode forward pass."""

import numpy as np

from vgg_jax import models
from vgg_jax.weights.torchvision_format import feature_indices

WIDTH_DIVISOR, FC_FEATURES, NUM_CLASSES = 16, 32, 10
# torchvision's BatchNorm2d epsilon.
BN_EPSILON = 1e-5


def state_dict(version, image_size=64, seed=0, width_divisor=WIDTH_DIVISOR,
               fc_features=FC_FEATURES, num_classes=NUM_CLASSES, batch_norm=False):
    """A random state dict in torchvision's VGG layout; batch-norm statistics far from
    their initial (0, 1), so that using them (or not) shows."""
    rng = np.random.default_rng(seed)
    sd, in_channels = {}, 3
    indices = feature_indices(version, batch_norm)
    layers = [layer for block in models.ARCHITECTURES[version] for layer in block]
    for index, (channels, kernel) in zip(indices.values(), layers):
        out = channels // width_divisor
        fan_in = in_channels * kernel * kernel
        sd[f"features.{index}.weight"] = (
            rng.standard_normal((out, in_channels, kernel, kernel)) * np.sqrt(2 / fan_in)
        ).astype(np.float32)
        sd[f"features.{index}.bias"] = rng.normal(0, 0.1, out).astype(np.float32)
        if batch_norm:
            bn = f"features.{index + 1}"
            sd[f"{bn}.weight"] = rng.uniform(0.5, 1.5, out).astype(np.float32)
            sd[f"{bn}.bias"] = rng.normal(0, 0.2, out).astype(np.float32)
            sd[f"{bn}.running_mean"] = rng.normal(0, 0.5, out).astype(np.float32)
            sd[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, out).astype(np.float32)
            sd[f"{bn}.num_batches_tracked"] = np.array(1000, np.int64)
        in_channels = out
    flat = in_channels * (image_size // 32) ** 2
    for i, (n_in, n_out) in zip((0, 3, 6), ((flat, fc_features), (fc_features, fc_features),
                                            (fc_features, num_classes))):
        sd[f"classifier.{i}.weight"] = (
            rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)).astype(np.float32)
        sd[f"classifier.{i}.bias"] = rng.normal(0, 0.1, n_out).astype(np.float32)
    return sd


def conv2d_nchw(x, weight, bias):
    """torch.nn.Conv2d(padding=kernel // 2, stride=1) in numpy: x [N, C, H, W]."""
    kh, kw = weight.shape[2:]
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    h, w = x.shape[2:]
    out = np.zeros((x.shape[0], weight.shape[0], h, w), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("nchw,oc->nohw", padded[:, :, dy : dy + h, dx : dx + w],
                             weight[:, :, dy, dx])
    return out + bias[None, :, None, None]


def batch_norm_eval(x, sd, prefix):
    """torch.nn.BatchNorm2d in eval mode: the running statistics, NCHW."""
    shape = (1, -1, 1, 1)
    mean, var = sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]
    scale, bias = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + BN_EPSILON)
            * scale.reshape(shape) + bias.reshape(shape))


def forward(sd, version, images_nhwc, batch_norm=False, head=True):
    """torchvision's VGG.forward in numpy, eval mode: every named activation (NHWC, as
    our `outputs=` gives them) and, with the head, the logits under "fc8"."""
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
    indices = feature_indices(version, batch_norm)
    activations = {}
    for block_index, block in enumerate(models.ARCHITECTURES[version], 1):
        for layer_index in range(1, len(block) + 1):
            name = f"conv{block_index}_{layer_index}"
            i = indices[name]
            x = conv2d_nchw(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"])
            if batch_norm:
                x = batch_norm_eval(x, sd, f"features.{i + 1}")
            x = np.maximum(x, 0)
            activations[name] = x.transpose(0, 2, 3, 1)
        n, c, h, w = x.shape
        x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        activations[f"pool{block_index}"] = x.transpose(0, 2, 3, 1)
    if not head:
        return activations
    x = x.reshape(x.shape[0], -1)  # torch.flatten(x, 1) of an NCHW map: channel-major.
    for name, i, relu in (("fc6", 0, True), ("fc7", 3, True), ("fc8", 6, False)):
        x = x @ sd[f"classifier.{i}.weight"].T.astype(np.float64) + sd[f"classifier.{i}.bias"]
        if relu:
            x = np.maximum(x, 0)
        activations[name] = x
    return activations
