"""Imports torchvision's pretrained VGG weights (vgg11/13/16/19 = nets A/B/D/E).

torchvision's state dict holds `features.N.weight` (out, in, kh, kw) / `features.N.bias`
for the convolutions, N counting every module of its `features` Sequential (conv, ReLU,
max-pool), and `classifier.{0,3,6}.weight` (out, in) / `.bias` for the three FC layers.
Our head is convolutional, so:

  conv    (out, in, kh, kw)        -> (kh, kw, in, out)
  FC6     (4096, 512 * 7 * 7)      -> (7, 7, 512, 4096). torchvision flattens the NCHW map
          channel-major (index c * 49 + y * 7 + x), so the matrix is reshaped to
          (4096, 512, 7, 7) and transposed, not reshaped straight into NHWC order.
  FC7/FC8 (out, in)                -> (1, 1, in, out)

Its preprocessing differs from the paper's: pixels are scaled to [0, 1] and normalised by
ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); on our 0-255 scale
that is mean_rgb = 255 * mean, std_rgb = 255 * std, which the converted config carries.
torchvision reports its accuracy with resize-256 / centre-crop-224, i.e. our single-crop
protocol at Q = 256.

  python -m vgg_jax.convert vgg16-397923af.pth --version D --out runs/torchvision_vgg16
  python main.py --config=configs/vgg_d.py --workdir=runs/torchvision_vgg16 --mode=eval

The .pth is read with torch.load(weights_only=True), which refuses arbitrary pickled
objects. A .npz of the same keys works without torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from vgg_jax import models

# torchvision's model names of the paper's configurations (it has no C or A-LRN).
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
# torchvision's preprocessing on a 0-1 scale (its ImageNet weights' documentation).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# torchvision's evaluation resize (shorter side) before the 224 centre crop.
TORCHVISION_RESIZE = 256
# Indices of the FC layers in torchvision's `classifier` Sequential
# (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear).
CLASSIFIER_INDICES = {"fc6": 0, "fc7": 3, "fc8": 6}
# Prefixes that wrappers (DataParallel, some training scripts) put before every key.
_KEY_PREFIXES = ("module.", "model.")


def torchvision_version(version: str) -> str:
    """Maps "D", "d", "vgg16" ... to our version key; only A, B, D, E exist in torchvision.

    Args:
      version: a configuration letter (any case, as `models.canonical_version` accepts) or
        a torchvision model name (vgg11, vgg13, vgg16, vgg19).

    Returns:
      "A", "B", "D" or "E".

    Raises:
      ValueError: for a batch-normalised name (vgg16_bn ...), an unknown name, or a
        configuration torchvision has no weights for (C, A-LRN).
    """
    name = str(version).strip().lower()
    by_name = {v: k for k, v in TORCHVISION_NAMES.items()}
    if name in by_name:
        return by_name[name]
    if name.endswith("_bn") and name[:-3] in by_name:
        raise ValueError(
            f"{version}: batch-normalised VGGs are not part of the paper and are not "
            "supported; use vgg11, vgg13, vgg16 or vgg19.")
    key = models.canonical_version(version)
    if key not in TORCHVISION_NAMES:
        raise ValueError(
            f"torchvision has no weights for configuration {key}; it has A (vgg11), "
            "B (vgg13), D (vgg16) and E (vgg19).")
    return key


def feature_indices(version: str) -> dict[str, int]:
    """Our conv layer names -> their index in torchvision's `features` Sequential.

    Each conv adds two modules (Conv2d, ReLU) and each block ends with one MaxPool2d.

    Args:
      version: "A", "B", "D", "E" or vgg11/13/16/19.

    Returns:
      {"conv1_1": 0, "conv1_2": 2, ...} in the order of the forward pass, the index N of
      torchvision's `features.N.weight` key.
    """
    indices, position = {}, 0
    for block_index, block in enumerate(models.ARCHITECTURES[torchvision_version(version)], 1):
        for layer_index, _ in enumerate(block, 1):
            indices[f"conv{block_index}_{layer_index}"] = position
            position += 2
        position += 1
    return indices


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # A torch tensor; torch itself is never imported here.
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def _clean_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    for nested in ("state_dict", "model_state_dict", "model"):
        if nested in state_dict and isinstance(state_dict[nested], Mapping):
            state_dict = state_dict[nested]
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def infer_model_options(state_dict: Mapping[str, Any], version: str) -> dict[str, int]:
    """The VGG options a torchvision-layout state dict was made with.

    Args:
      state_dict: torchvision VGG keys (see the module docstring).
      version: "A", "B", "D", "E" or vgg11/13/16/19.

    Returns:
      {"num_classes", "width_divisor", "fc_features", "image_size"}; torchvision's own
      weights give 1000, 1, 4096, 224.

    Raises:
      ValueError: if a key that fixes an option is missing, or the widths match no width
        divisor or square FC6 window.
    """
    sd = _clean_keys(state_dict)
    key = torchvision_version(version)
    first = _shape(sd, "features.0.weight", key)
    width_divisor = 64 // first[0] if first[0] and 64 % first[0] == 0 else 0
    if width_divisor < 1:
        raise ValueError(f"features.0.weight has {first[0]} output channels; expected 64 "
                         "(or 64 divided by a width divisor).")
    last_channels = max(models.ARCHITECTURES[key][-1][-1][0] // width_divisor, 1)
    fc6 = _shape(sd, "classifier.0.weight", key)
    window = math.isqrt(fc6[1] // last_channels) if fc6[1] % last_channels == 0 else 0
    if window < 1 or window * window * last_channels != fc6[1]:
        raise ValueError(
            f"classifier.0.weight has {fc6[1]} inputs, not {last_channels} channels times "
            "a square window (torchvision: 512 x 7 x 7 = 25088).")
    fc8 = _shape(sd, "classifier.6.weight", key)
    return {
        "num_classes": int(fc8[0]),
        "width_divisor": int(width_divisor),
        "fc_features": int(fc6[0]),
        "image_size": int(window * models.TOTAL_STRIDE),
    }


def _shape(sd: Mapping[str, Any], key: str, version: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(
            f"Key {key!r} missing from the state dict: not a torchvision "
            f"{TORCHVISION_NAMES[version]} (VGG-{version}) state dict?")
    return tuple(int(d) for d in _to_numpy(sd[key]).shape)


def from_torchvision(state_dict: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Turns a torchvision VGG state dict into our variables.

    Args:
      state_dict: keys features.N.weight/bias and classifier.{0,3,6}.weight/bias; values
        torch tensors or numpy arrays. Widths may be narrowed (channels divided, as our
        width_divisor does); `infer_model_options` recovers the matching model options.
      version: "A", "B", "D", "E", or vgg11, vgg13, vgg16, vgg19.

    Returns:
      {"params": {conv1_1: {kernel, bias}, ..., fc6, fc7, fc8}} of float32 numpy arrays,
      for `models.create_model(version, **infer_model_options(state_dict, version))`.

    Raises:
      ValueError: for a missing, unexpected or wrongly shaped key (batch-norm VGGs
        included), naming it.
    """
    key = torchvision_version(version)
    sd = _clean_keys(state_dict)
    if any(k.endswith(("running_mean", "running_var")) for k in sd):
        raise ValueError("The state dict has batch-norm statistics (a vgg*_bn model); only "
                         "the plain vgg11/13/16/19 are the paper's nets.")
    options = infer_model_options(sd, key)
    divisor, window = options["width_divisor"], options["image_size"] // models.TOTAL_STRIDE
    expected_keys = set()
    params: dict[str, dict[str, np.ndarray]] = {}

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        expected_keys.add(name)
        if name not in sd:
            raise ValueError(
                f"Key {name!r} missing from the state dict: not a torchvision "
                f"{TORCHVISION_NAMES[key]} (VGG-{key}) state dict?")
        value = _to_numpy(sd[name])
        if value.shape != shape:
            raise ValueError(
                f"{name} has shape {value.shape}, expected {shape} for "
                f"{TORCHVISION_NAMES[key]} (VGG-{key}) with width divisor {divisor}.")
        return value

    in_channels = 3
    indices = feature_indices(key)
    layers = [layer for block in models.ARCHITECTURES[key] for layer in block]
    for (name, index), (channels, kernel) in zip(indices.items(), layers):
        out = max(channels // divisor, 1)
        weight = take(f"features.{index}.weight", (out, in_channels, kernel, kernel))
        bias = take(f"features.{index}.bias", (out,))
        params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
        in_channels = out

    features, classes = options["fc_features"], options["num_classes"]
    fc6 = take("classifier.0.weight", (features, in_channels * window * window))
    # Channel-major NCHW flatten -> (out, C, h, w) -> our (h, w, C, out) kernel.
    fc6 = fc6.reshape(features, in_channels, window, window).transpose(2, 3, 1, 0)
    params["fc6"] = {"kernel": fc6, "bias": take("classifier.0.bias", (features,))}
    for name, in_features, out_features in (("fc7", features, features),
                                            ("fc8", features, classes)):
        index = CLASSIFIER_INDICES[name]
        weight = take(f"classifier.{index}.weight", (out_features, in_features))
        params[name] = {
            "kernel": weight.T.reshape(1, 1, in_features, out_features),
            "bias": take(f"classifier.{index}.bias", (out_features,)),
        }
    unexpected = sorted(set(sd) - expected_keys)
    if unexpected:
        raise ValueError(
            f"Unexpected keys for {TORCHVISION_NAMES[key]} (VGG-{key}): {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}; is the version right?")
    return {"params": {name: {k: np.ascontiguousarray(v) for k, v in layer.items()}
                       for name, layer in params.items()}}


def converted_config(version: str, options: Mapping[str, int]) -> ml_collections.ConfigDict:
    """A run config describing converted torchvision weights and their preprocessing.

    Args:
      version: our version key ("A", "B", "D", "E").
      options: from `infer_model_options`.

    Returns:
      The base recipe with the model options, torchvision's normalisation on the 0-255
      scale, and S = Q = 256 (its resize-256 protocol).
    """
    from configs import base

    config = base.get_config()
    config.model.version = torchvision_version(version)
    config.model.num_classes = int(options["num_classes"])
    config.model.width_divisor = int(options["width_divisor"])
    config.model.fc_features = int(options["fc_features"])
    config.data.image_size = int(options["image_size"])
    config.data.mean_rgb = tuple(255.0 * m for m in TORCHVISION_MEAN)
    config.data.std_rgb = tuple(255.0 * s for s in TORCHVISION_STD)
    config.data.train_scale_min = config.data.train_scale_max = TORCHVISION_RESIZE
    config.data.eval_scale = TORCHVISION_RESIZE
    return config


def load_state_dict(path: str) -> dict[str, Any]:
    """Reads a .pth (torch.load, weights_only=True) or a .npz of torchvision keys.

    Args:
      path: the weight file; a name ending in .npz is read with numpy, anything else with
        torch.

    Returns:
      The state dict: key -> torch tensor (.pth) or numpy array (.npz).

    Raises:
      SystemExit: if the file is not .npz and PyTorch is not installed.
    """
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"Reading {path} needs PyTorch: `pip install torch` (CPU wheels suffice), or "
            "save the state dict as .npz with numpy.") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_file(path: str, version: str, out: str) -> str:
    """Converts a torchvision weight file into a params checkpoint under `out`.

    Args:
      path: the torchvision state dict (.pth) or a .npz of its keys.
      version: "A", "B", "D", "E" or vgg11/13/16/19.
      out: the directory (workdir) to write the weights and their run config into.

    Returns:
      The workdir written (what `checkpoint.save_variables` returns).

    Raises:
      ValueError: if the state dict does not match the version (see `from_torchvision`).
    """
    from vgg_jax import checkpoint

    state_dict = load_state_dict(path)
    key = torchvision_version(version)
    variables = from_torchvision(state_dict, key)
    options = infer_model_options(state_dict, key)
    return checkpoint.save_variables(out, variables, converted_config(key, options))


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m vgg_jax.convert WEIGHTS --version V --out DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m vgg_jax.convert",
        description="Convert torchvision VGG weights (vgg11/13/16/19) to a vgg-jax checkpoint.")
    parser.add_argument("weights", help="torchvision state dict (.pth) or .npz of its keys")
    parser.add_argument("--version", required=True,
                        help="A, B, D or E (or vgg11, vgg13, vgg16, vgg19)")
    parser.add_argument("--out", required=True, help="directory (workdir) to write")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.weights):
        parser.error(f"{args.weights} is not a file.")
    from vgg_jax import checkpoint

    existing = checkpoint.checkpoint_dir(args.out)
    if os.path.isdir(existing) and os.listdir(existing):
        parser.error(f"{existing} already holds checkpoints; pass a new --out directory "
                     "(converted weights would mix with that run's steps).")
    try:
        out = convert_file(args.weights, args.version, args.out)
    except ValueError as e:
        sys.exit(f"Conversion failed: {e}")
    print(f"Wrote {out}; evaluate with: python main.py --config=configs/vgg_"
          f"{torchvision_version(args.version).lower()}.py --workdir={out} --mode=eval")


if __name__ == "__main__":
    main()
