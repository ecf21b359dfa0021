"""torchvision's VGG state dicts <-> our variables, both ways, with and without batch norm.

torchvision builds vgg11/13/16/19 (our A, B, D, E) and their `_bn` twins from a `features`
Sequential and a `classifier` Sequential. Its state dict holds, for every conv of
`features`, `features.N.weight` (out, in, kh, kw) and `features.N.bias`, N counting every
module: Conv2d, [BatchNorm2d,] ReLU per conv and one MaxPool2d per block. A `_bn` net's
BatchNorm2d at N + 1 adds `weight` (scale), `bias`, `running_mean`, `running_var` and
`num_batches_tracked`. The FC layers are `classifier.{0,3,6}.weight` (out, in) / `.bias`.
Our head is convolutional, so:

  conv    (out, in, kh, kw)        <-> (kh, kw, in, out)                 params["conv4_3"]
  BN      weight, bias             <-> scale, bias                       params["conv4_3_bn"]
          running_mean, running_var <-> mean, var                   batch_stats["conv4_3_bn"]
  FC6     (4096, 512 * 7 * 7)      <-> (7, 7, 512, 4096). torchvision flattens the NCHW map
          channel-major (index c * 49 + y * 7 + x), so the matrix is reshaped to
          (4096, 512, 7, 7) and transposed, not reshaped straight into NHWC order.
  FC7/FC8 (out, in)                <-> (1, 1, in, out)

BatchNorm2d's epsilon (1e-5) and momentum (0.1) are module constants, not state: our
batch-norm net uses the same epsilon and flax's momentum 0.9, which is the same update
(see vgg_jax.models). Evaluation with the running averages is the same formula in both.
Only training differs, and negligibly: PyTorch updates `running_var` with the unbiased
batch variance (times n / (n - 1), n = batch x height x width per channel), flax with the
biased one. `num_batches_tracked` (used by PyTorch only when momentum is None) is written
as 0.

Widths may be narrowed (channels divided, as our width_divisor does) and FC6's window may
be other than 7x7 (our image_size other than 224); `infer_model_options` recovers the
options from a state dict. No torch here: values are numpy arrays, or torch tensors read
through `.detach().cpu().numpy()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_jax import models

# torchvision's model names of the paper's configurations (it has no C or A-LRN).
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
# torchvision's suffix of the batch-norm variants (vgg16_bn).
BN_NAME_SUFFIX = "_bn"
# Indices of the FC layers in torchvision's `classifier` Sequential
# (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear).
CLASSIFIER_INDICES = {"fc6": 0, "fc7": 3, "fc8": 6}
# Prefixes that wrappers (DataParallel, some training scripts) put before every key.
_KEY_PREFIXES = ("module.", "model.")
# The buffer PyTorch's BatchNorm2d counts batches in; we keep no such count.
_BATCHES_TRACKED = "num_batches_tracked"


def parse_version(version: str) -> tuple[str, bool | None]:
    """Reads a net name: our configuration letter or torchvision's model name.

    Args:
      version: "A", "B", "D", "E" (any case, as `models.canonical_version` accepts), or
        vgg11, vgg13, vgg16, vgg19, or vgg11_bn ... vgg19_bn.

    Returns:
      (our version key, batch norm): True for a `_bn` name, False for another torchvision
      name, None for a configuration letter (which says nothing about batch norm).

    Raises:
      ValueError: for an unknown name, or a configuration torchvision has no layout for
        (C, A-LRN).
    """
    name = str(version).strip().lower()
    by_name = {v: k for k, v in TORCHVISION_NAMES.items()}
    if name.endswith(BN_NAME_SUFFIX) and name[: -len(BN_NAME_SUFFIX)] in by_name:
        return by_name[name[: -len(BN_NAME_SUFFIX)]], True
    if name in by_name:
        return by_name[name], False
    key = models.canonical_version(version)
    if key not in TORCHVISION_NAMES:
        raise ValueError(
            f"torchvision has no VGG of configuration {key}; it has A (vgg11), B (vgg13), "
            "D (vgg16) and E (vgg19), each also with batch norm (vgg11_bn ...).")
    return key, None


def torchvision_version(version: str) -> str:
    """Our version key of a net name (see `parse_version`): "vgg16_bn", "d" -> "D".

    Args:
      version: a configuration letter or a torchvision model name.

    Returns:
      "A", "B", "D" or "E".
    """
    return parse_version(version)[0]


def torchvision_name(version: str, batch_norm: bool) -> str:
    """torchvision's model name: ("D", True) -> "vgg16_bn".

    Args:
      version: a configuration letter or a torchvision model name.
      batch_norm: the batch-norm variant.

    Returns:
      The name of torchvision's constructor (torchvision.models.<name>).
    """
    return TORCHVISION_NAMES[torchvision_version(version)] + (
        BN_NAME_SUFFIX if batch_norm else "")


def _features_layout(version: str, batch_norm: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(conv name -> index of its Conv2d, activation name -> k of features[:k])."""
    conv_index, slice_end, position = {}, {}, 0
    for block_index, block in enumerate(models.ARCHITECTURES[torchvision_version(version)], 1):
        for layer_index in range(1, len(block) + 1):
            name = f"conv{block_index}_{layer_index}"
            conv_index[name] = position
            position += 3 if batch_norm else 2  # Conv2d, [BatchNorm2d,] ReLU
            slice_end[name] = position
        position += 1  # MaxPool2d
        slice_end[f"pool{block_index}"] = position
    return conv_index, slice_end


def feature_indices(version: str, batch_norm: bool = False) -> dict[str, int]:
    """Our conv layer names -> their index in torchvision's `features` Sequential.

    Args:
      version: "A", "B", "D", "E" or a torchvision name.
      batch_norm: the `_bn` layout (each conv's BatchNorm2d sits at its index + 1).

    Returns:
      {"conv1_1": 0, "conv1_2": 2, ...} in the order of the forward pass, the index N of
      torchvision's `features.N.weight` key.
    """
    return _features_layout(version, batch_norm)[0]


def feature_slice_ends(version: str, batch_norm: bool = False) -> dict[str, int]:
    """Where each of our named activations is in torchvision: k of `model.features[:k]`.

    Args:
      version: "A", "B", "D", "E" or a torchvision name.
      batch_norm: the `_bn` layout.

    Returns:
      {"conv1_1": 2, ..., "conv4_3": 23, "pool5": 31} for vgg16: torchvision's
      `features[:k](x)` equals our `outputs=(name,)` activation (NCHW there, NHWC here).
    """
    return _features_layout(version, batch_norm)[1]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # A torch tensor; torch itself is never imported here.
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def clean_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Unwraps a nested state dict ("state_dict", "model", ...) and drops key prefixes.

    Args:
      state_dict: a torchvision state dict, possibly saved by a wrapper or a trainer.

    Returns:
      The plain {"features.0.weight": ..., ...} dict.
    """
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


def batch_norm_key(state_dict: Mapping[str, Any]) -> str | None:
    """The first running-statistics key of a state dict: a `_bn` net has them.

    Args:
      state_dict: torchvision VGG keys.

    Returns:
      A key such as "features.1.running_mean", or None for a net without batch norm.
    """
    return next((k for k in clean_keys(state_dict) if k.endswith("running_mean")), None)


def _shape(sd: Mapping[str, Any], key: str, version: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(
            f"Key {key!r} missing from the state dict: not a torchvision "
            f"{TORCHVISION_NAMES[version]} (VGG-{version}) state dict?")
    return tuple(int(d) for d in np.shape(sd[key]))


def infer_model_options(state_dict: Mapping[str, Any], version: str) -> dict[str, Any]:
    """The VGG options a torchvision-layout state dict was made with.

    Args:
      state_dict: torchvision VGG keys (see the module docstring).
      version: "A", "B", "D", "E" or a torchvision name.

    Returns:
      {"num_classes", "width_divisor", "fc_features", "image_size", "batch_norm"};
      torchvision's own vgg16 gives 1000, 1, 4096, 224, False.

    Raises:
      ValueError: if a key that fixes an option is missing, or the widths match no width
        divisor or square FC6 window.
    """
    sd = clean_keys(state_dict)
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
        "batch_norm": batch_norm_key(sd) is not None,
    }


def _claimed_batch_norm(version: str, batch_norm: bool | None) -> bool | None:
    named = parse_version(version)[1]
    if named is not None and batch_norm is not None and named != batch_norm:
        raise ValueError(
            f"version={version!r} and batch_norm={batch_norm} disagree; name the net once, "
            f"e.g. version={torchvision_name(version, batch_norm)!r}.")
    return batch_norm if batch_norm is not None else named


def check_family(state_dict: Mapping[str, Any], version: str, *,
                 batch_norm: bool | None = None, num_classes: int | None = None) -> None:
    """Checks that a state dict is the net asked for: batch norm or not, and class count.

    Args:
      state_dict: torchvision VGG keys.
      version: a configuration letter or torchvision name; a torchvision name says
        whether the net has batch norm (vgg16_bn) or not (vgg16).
      batch_norm: the net asked for has batch norm; None = as the name says, or whatever
        the state dict has.
      num_classes: the class count asked for; None = the state dict's.

    Raises:
      ValueError: one sentence naming the mismatch and the setting that fixes it.
    """
    claimed = _claimed_batch_norm(version, batch_norm)
    found_key = batch_norm_key(state_dict)
    if claimed is not None and claimed != (found_key is not None):
        found = (f"has batch norm ({found_key})" if found_key
                 else "has no batch norm (no running_mean keys)")
        actual = torchvision_name(version, found_key is not None)
        raise ValueError(
            f"The state dict {found} but {torchvision_name(version, claimed)} was asked for; "
            f"it is a {actual}: pass --config.model.batch_norm={found_key is not None} "
            f"(or name the net {actual}).")
    key = torchvision_version(version)
    classes = _shape(clean_keys(state_dict), "classifier.6.weight", key)[0]
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"The state dict has {classes} classes (classifier.6.weight) but the net asked "
            f"for has {num_classes}; pass --config.model.num_classes={classes} (another class "
            "count needs fine-tuning with a new head).")


class _Reader:
    """Takes keys out of a state dict with their expected shapes, remembering which."""

    def __init__(self, sd: Mapping[str, Any], key: str, divisor: int, batch_norm: bool):
        self.sd, self.taken = sd, set()
        self.describe = (f"{torchvision_name(key, batch_norm)} (VGG-{key}) with width "
                         f"divisor {divisor}")

    def take(self, name: str, shape: tuple[int, ...], copy: bool = True) -> np.ndarray:
        """The value of `name`, checked against `shape`; copy=False when the caller's
        reordering copies it anyway (fc6 is 411 MB in VGG-16: one copy fewer)."""
        self.taken.add(name)
        if name not in self.sd:
            raise ValueError(f"Key {name!r} missing from the state dict: not a torchvision "
                             f"{self.describe} state dict?")
        value = _to_numpy(self.sd[name])
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} for "
                             f"{self.describe}.")
        # A copy: a torch tensor's numpy view would change with the torch net's training.
        return np.array(value, order="C", copy=True) if copy else value


def from_torchvision(state_dict: Mapping[str, Any], version: str, *,
                     batch_norm: bool | None = None,
                     num_classes: int | None = None) -> dict[str, Any]:
    """Turns a torchvision VGG state dict (plain or `_bn`) into our variables.

    Args:
      state_dict: torchvision's keys (see the module docstring); values torch tensors or
        numpy arrays. Widths may be narrowed; `infer_model_options` gives the matching
        model options.
      version: "A", "B", "D", "E", or vgg11 ... vgg19, or vgg11_bn ... vgg19_bn.
      batch_norm: the net asked for has batch norm (see `check_family`); None = as the
        version's name says, or as the state dict is.
      num_classes: the class count asked for; None = the state dict's.

    Returns:
      {"params": {conv1_1: {kernel, bias}, [conv1_1_bn: {scale, bias},] ..., fc6, fc7,
      fc8}[, "batch_stats": {conv1_1_bn: {mean, var}, ...}]} of float32 numpy arrays, for
      `models.create_model(version, **infer_model_options(state_dict, version))`.

    Raises:
      ValueError: for the wrong family or class count (`check_family`), or a missing,
        unexpected or wrongly shaped key, naming it.
    """
    sd = clean_keys(state_dict)
    check_family(sd, version, batch_norm=batch_norm, num_classes=num_classes)
    key = torchvision_version(version)
    options = infer_model_options(sd, key)
    divisor, with_bn = options["width_divisor"], options["batch_norm"]
    reader = _Reader(sd, key, divisor, with_bn)
    params, stats = {}, {}
    in_channels = 3
    layers = [layer for block in models.ARCHITECTURES[key] for layer in block]
    for (name, index), (channels, kernel) in zip(feature_indices(key, with_bn).items(), layers):
        out = max(channels // divisor, 1)
        weight = reader.take(f"features.{index}.weight", (out, in_channels, kernel, kernel))
        params[name] = {"kernel": weight.transpose(2, 3, 1, 0),
                        "bias": reader.take(f"features.{index}.bias", (out,))}
        if with_bn:
            bn, bn_name = f"features.{index + 1}", name + models.BN_SUFFIX
            params[bn_name] = {"scale": reader.take(f"{bn}.weight", (out,)),
                               "bias": reader.take(f"{bn}.bias", (out,))}
            stats[bn_name] = {"mean": reader.take(f"{bn}.running_mean", (out,)),
                              "var": reader.take(f"{bn}.running_var", (out,))}
            reader.taken.add(f"{bn}.{_BATCHES_TRACKED}")
        in_channels = out
    params.update(_head_from_torchvision(reader, in_channels, options))
    unexpected = sorted(set(sd) - reader.taken)
    if unexpected:
        raise ValueError(
            f"Unexpected keys for {reader.describe}: {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}; is the version right?")
    variables = {"params": params}
    if with_bn:
        variables["batch_stats"] = stats
    return variables


def _head_from_torchvision(reader: _Reader, in_channels: int,
                           options: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    features, classes = options["fc_features"], options["num_classes"]
    window = options["image_size"] // models.TOTAL_STRIDE
    fc6 = reader.take("classifier.0.weight", (features, in_channels * window * window),
                      copy=False)
    # Channel-major NCHW flatten -> (out, C, h, w) -> our (h, w, C, out) kernel (a copy).
    fc6 = fc6.reshape(features, in_channels, window, window).transpose(2, 3, 1, 0)
    head = {"fc6": {"kernel": np.array(fc6, order="C", copy=True),
                    "bias": reader.take("classifier.0.bias", (features,))}}
    for name, in_features, out_features in (("fc7", features, features),
                                            ("fc8", features, classes)):
        index = CLASSIFIER_INDICES[name]
        weight = reader.take(f"classifier.{index}.weight", (out_features, in_features),
                             copy=False)
        head[name] = {
            "kernel": np.array(weight.T.reshape(1, 1, in_features, out_features), order="C",
                               copy=True),
            "bias": reader.take(f"classifier.{index}.bias", (out_features,)),
        }
    return head


def _layer(tree: Mapping[str, Any], name: str, what: str) -> Mapping[str, np.ndarray]:
    if name not in tree:
        raise ValueError(f"The variables have no {name!r} ({what}); are they the version "
                         "given, with the head included?")
    return {k: np.asarray(v, np.float32) for k, v in tree[name].items()}


def to_torchvision(variables: Mapping[str, Any], version: str) -> dict[str, np.ndarray]:
    """Turns our variables into a torchvision VGG state dict (the inverse of
    `from_torchvision`).

    Args:
      variables: {"params"[, "batch_stats"]} of a VGG with the head (host or device
        arrays); batch norm is taken from them.
      version: "A", "B", "D", "E" or a torchvision name; a `_bn` name must match
        variables with batch norm.

    Returns:
      {key: numpy array} in torchvision's order: float32 weights, int64
      num_batches_tracked. At full width with a 224 crop, torchvision's own constructor
      (`torchvision.models.vgg16_bn(num_classes=...)`) loads it with strict=True.

    Raises:
      ValueError: for a version torchvision does not have, variables of another family
        or version, or batch-norm parameters without their statistics.
    """
    key = torchvision_version(version)
    params, stats = variables["params"], variables.get("batch_stats") or {}
    with_bn = any(name.endswith(models.BN_SUFFIX) for name in params)
    claimed = parse_version(version)[1]
    if claimed is not None and claimed != with_bn:
        raise ValueError(
            f"The variables {'have' if with_bn else 'have no'} batch norm but "
            f"{version} was asked for; use version={torchvision_name(key, with_bn)!r}.")
    sd: dict[str, np.ndarray] = {}
    for name, index in feature_indices(key, with_bn).items():
        conv = _layer(params, name, "a conv layer")
        sd[f"features.{index}.weight"] = conv["kernel"].transpose(3, 2, 0, 1)
        sd[f"features.{index}.bias"] = conv["bias"]
        if with_bn:
            bn_name, bn = name + models.BN_SUFFIX, f"features.{index + 1}"
            norm = _layer(params, bn_name, "batch-norm parameters")
            running = _layer(stats, bn_name, "batch_stats: pass the running statistics")
            sd[f"{bn}.weight"], sd[f"{bn}.bias"] = norm["scale"], norm["bias"]
            sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"] = running["mean"], running["var"]
            sd[f"{bn}.{_BATCHES_TRACKED}"] = np.zeros((), np.int64)
    fc6 = _layer(params, "fc6", "the head")["kernel"]  # (h, w, C, out)
    sd["classifier.0.weight"] = fc6.transpose(3, 2, 0, 1).reshape(fc6.shape[3], -1)
    sd["classifier.0.bias"] = _layer(params, "fc6", "the head")["bias"]
    for name in ("fc7", "fc8"):
        layer, index = _layer(params, name, "the head"), CLASSIFIER_INDICES[name]
        sd[f"classifier.{index}.weight"] = layer["kernel"][0, 0].T
        sd[f"classifier.{index}.bias"] = layer["bias"]
    extra = sorted(set(params) - _our_layer_names(key, with_bn))
    if extra:
        raise ValueError(f"The variables have layers {extra} that "
                         f"{torchvision_name(key, with_bn)} has not; is the version right?")
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _our_layer_names(version: str, batch_norm: bool) -> frozenset[str]:
    # Our parameter layers of a torchvision net: its convs, their batch norms, fc6-fc8.
    convs = feature_indices(version, batch_norm)
    bns = {name + models.BN_SUFFIX for name in convs} if batch_norm else set()
    return frozenset(convs) | bns | set(CLASSIFIER_INDICES)


# torchvision's nets by their number of conv layers (C, which torchvision lacks, also has
# 13, three of them 1x1).
_VERSION_BY_CONV_COUNT = {8: "A", 10: "B", 13: "D", 16: "E"}


def infer_version(state_dict: Mapping[str, Any]) -> str:
    """Which of torchvision's nets a state dict in its layout holds, from its conv count.

    Args:
      state_dict: torchvision VGG keys (values: arrays or anything with a shape).

    Returns:
      "A", "B", "D" or "E".

    Raises:
      ValueError: when the count of 4-D `features.N.weight` kernels is none of theirs.
    """
    sd = clean_keys(state_dict)
    convs = sum(1 for key, value in sd.items()
                if key.startswith("features.") and key.endswith(".weight")
                and len(np.shape(value)) == 4)
    if convs not in _VERSION_BY_CONV_COUNT:
        raise ValueError(
            f"The state dict has {convs} conv kernels (features.N.weight); torchvision's "
            "VGGs have 8 (vgg11), 10 (vgg13), 13 (vgg16) or 16 (vgg19). Is it a VGG?")
    return _VERSION_BY_CONV_COUNT[convs]
