"""The authors' own Caffe nets (VGG_ILSVRC_16_layers, _19_layers) <-> torchvision's key layout.

The paper's authors released nets D and E (trained with scale jittering) as Caffe
`.caffemodel` files in 2014: a serialised `NetParameter` protobuf whose layers use Caffe's
old V1 message (`layers`, field 2: a name, a type enum and the parameter blobs). Later Caffe
files use the newer message (`layer`, field 100: the type as a string, blob shapes as a
`BlobShape`). Both are read here with the `protobuf` runtime alone, through our own
descriptor of the few messages and fields needed (`caffe_schema`).

Reading holds at most two copies of the weights at once: the file's bytes while protobuf
parses them, then the parsed message while the arrays are taken out of it (each blob's
values are one bytes object, viewed by numpy without a copy; see `caffe_schema`); the arrays
returned are those views. VGG-16's 553 MB file peaks at about twice its size.

What Caffe's nets differ in from torchvision's VGG, and what `read_caffemodel` does about it:
  - Inputs are BGR, 0-255, minus the mean pixel (B, G, R) = (103.939, 116.779, 123.68), with
    no division by a standard deviation: conv1_1's input channels are flipped to RGB, and
    the mean (in RGB order) travels with the weights.
  - Blobs of 2014 carry the legacy 4-D (num, channels, height, width) shape: a conv weight
    (out, in, kh, kw), a bias (1, 1, 1, out), a fully connected weight (1, 1, out, in).
  - FC6's input is Caffe's (C, H, W) flatten of pool5, the very order of torchvision's
    `classifier.0` (NCHW, channel-major): its matrix is taken as it is.
The net itself is deduced from the blobs (each conv's channels and kernel, the pooling
layers between blocks, the three inner-product layers), matched against the paper's Table 1
(A, B, D, E: the configurations torchvision names; narrowed widths are recognised as our
width_divisor narrows them), and checked against the deploy prototxt when one is given.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
from google.protobuf import message, text_format

from vgg_jax import models
from vgg_jax.weights import torchvision_format
from vgg_jax.weights.caffe_schema import MESSAGES, POOL_METHODS, V1_LAYER_TYPES

# The mean pixel the authors subtracted (Caffe's BGR order, on 0-255 inputs); no std division.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MEAN_RGB = CAFFE_MEAN_BGR[::-1]
STD_RGB = (1.0, 1.0, 1.0)
# Configurations that torchvision's key layout (our state_dict) has names for.
VERSIONS = tuple(torchvision_format.TORCHVISION_NAMES)

# What a layer type is to us, by its name in either format with "_" dropped, lower case
# (INNER_PRODUCT and InnerProduct). Layers without parameters that a VGG net (deploy or
# training) holds are "passive"; any other type is not VGG.
_KINDS = {"convolution": "conv", "innerproduct": "fc", "pooling": "pool"} | dict.fromkeys(
    ("relu", "dropout", "softmax", "softmaxloss", "softmaxwithloss", "accuracy", "data",
     "imagedata", "memorydata", "dummydata", "hdf5data", "windowdata", "input", "split",
     "silence", "flatten"), "passive")
# The paper's max-pool (2x2, stride 2, no padding); every conv has stride 1 and "same" padding.
_POOL_WINDOW = 2



@dataclasses.dataclass(frozen=True)
class CaffeWeights:
    """A Caffe VGG in torchvision's key layout, with the preprocessing it was trained with.

    Attributes:
      version: the configuration deduced, a key of `vgg_jax.models.ARCHITECTURES`.
      state_dict: torchvision's VGG keys (`torchvision_format.from_torchvision` takes them):
        float32 arrays, read-only views of the file's values except conv1_1's (flipped to
        RGB input); fc6 in torchvision's flatten order, which is Caffe's.
      num_classes: the width of fc8.
      mean_rgb: the mean pixel subtracted from 0-255 RGB inputs.
      std_rgb: what the difference is divided by: ones, the authors subtract the mean only.
    """

    version: str
    state_dict: dict[str, np.ndarray]
    num_classes: int
    mean_rgb: tuple[float, float, float] = MEAN_RGB
    std_rgb: tuple[float, float, float] = STD_RGB


@dataclasses.dataclass
class _Layer:
    """One Caffe layer as plain values (no reference into the parsed message)."""

    name: str
    kind: str  # "conv", "fc", "pool" or "passive"
    blobs: list[np.ndarray]
    num_output: int | None  # from the layer's parameters (the prototxt's only source)
    kernel: int | None


def read_caffemodel(path: str, prototxt: str | None = None) -> CaffeWeights:
    """Reads a Caffe VGG (the authors' 2014 V1 files, or the newer `layer` format).

    Args:
      path: a `.caffemodel` file.
      prototxt: its deploy `.prototxt` (optional); when given, its layers, widths and input
        size must agree with the weights.

    Returns:
      The weights in torchvision's layout, the configuration and the preprocessing;
      `torchvision_format.infer_model_options(w.state_dict, w.version)` gives the model's
      options (width divisor, fc_features, image_size).

    Raises:
      ValueError: one sentence naming the file and what was found, for a file protobuf
        cannot parse, a net that is not one of the paper's VGGs, or a prototxt that
        disagrees.
    """
    with open(path, "rb") as file:
        content = file.read()
    net = MESSAGES["NetParameter"]()
    try:
        net.ParseFromString(content)
    except message.DecodeError as error:
        raise ValueError(f"{path} is not a Caffe net: protobuf cannot parse it ({error}).") \
            from None
    del content  # The parsed message holds its own copy; do not keep two.
    layers = _layers(net, path, with_blobs=True)
    del net  # The arrays now hold the values.
    version, blocks, fcs = _deduce(layers, path)
    if prototxt is not None:
        _check_prototxt(prototxt, path, blocks, fcs)
    return CaffeWeights(version=version, state_dict=_state_dict(version, blocks, fcs),
                        num_classes=int(fcs[-1].blobs[0].shape[0]))


def _layers(net: message.Message, where: str, with_blobs: bool) -> list[_Layer]:
    if len(net.layers) and len(net.layer):
        raise ValueError(f"{where} mixes Caffe's V1 `layers` and newer `layer` messages; "
                         "Caffe itself refuses such a net.")
    if not len(net.layers) and not len(net.layer):
        raise ValueError(f"{where} holds no Caffe layers (is it a .caffemodel or deploy "
                         ".prototxt?).")
    v1_names = {number: name for name, number in V1_LAYER_TYPES.items()}
    records = []
    for layer in net.layers or net.layer:
        if net.layers and layer.HasField("v0_layer"):
            raise ValueError(f"{where} uses Caffe's V0 layer format (2013); convert it with "
                             "Caffe's upgrade_net_proto_binary first.")
        type_name = v1_names.get(layer.type, str(layer.type)) if net.layers else layer.type
        kind = _KINDS.get(type_name.replace("_", "").lower())
        if kind is None:
            raise ValueError(f"{where} is not a plain VGG: layer {layer.name!r} is of type "
                             f"{type_name}.")
        blobs = [_blob_array(blob, where, layer.name) for blob in layer.blobs] \
            if with_blobs else []
        num_output, kernel = None, None
        if kind == "conv" and layer.HasField("convolution_param"):
            blob_kernel = blobs[0].shape[-1] if blobs and blobs[0].ndim == 4 else None
            num_output, kernel = _conv_geometry(layer.convolution_param, blob_kernel, where,
                                                layer.name)
        elif kind == "fc":
            param = layer.inner_product_param
            num_output = param.num_output if param.HasField("num_output") else None
            if param.transpose and blobs:  # Stored (in, out); Caffe multiplies by its transpose.
                blobs[0] = blobs[0].reshape(blobs[0].shape[-2:]).T
        elif kind == "pool":
            _check_pool(layer.pooling_param, where, layer.name)
        records.append(_Layer(layer.name, kind, blobs, num_output, kernel))
    return records


def _blob_array(blob: message.Message, where: str, layer: str) -> np.ndarray:
    legacy = (blob.num, blob.channels, blob.height, blob.width)
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (
        legacy if any(legacy) else None)
    # Each read of a bytes field copies it (fc6's is 411 MB): read once.
    raw, dtype = blob.data, "<f4"
    if not raw:
        raw, dtype = blob.double_data, "<f8"
    if raw:  # float32 stays a view of the bytes; doubles are converted.
        values = np.frombuffer(raw, dtype).astype(np.float32, copy=False) \
            if len(raw) % np.dtype(dtype).itemsize == 0 else None
    else:  # Unpacked floats (or none): our bytes view kept them as unknown fields.
        unpacked = MESSAGES["FloatBlobProto"].FromString(blob.SerializeToString())
        values = np.asarray(unpacked.data, np.float32)
    if values is None or (shape is not None and values.size != math.prod(shape)):
        found = "a byte count that is no float array" if values is None else \
            f"{values.size} values"
        raise ValueError(f"{where}: a blob of layer {layer!r} has shape {shape} but {found}; "
                         "the file is truncated or not a Caffe net.")
    return values.reshape(shape if shape is not None else values.shape)


def _spatial(param: message.Message, single: str, h: str, w: str,
             default: int) -> tuple[int, int]:
    """(height, width) of a Caffe geometry setting given once, per axis, or as _h/_w."""
    if param.HasField(h) or param.HasField(w):
        return getattr(param, h), getattr(param, w)
    value = getattr(param, single)
    if isinstance(value, int):
        return (value, value) if param.HasField(single) else (default, default)
    values = list(value) or [default]
    return values[0], values[-1]


def _conv_geometry(param: message.Message, blob_kernel: int | None, where: str,
                   name: str) -> tuple[int | None, int | None]:
    kernel = _spatial(param, "kernel_size", "kernel_h", "kernel_w", blob_kernel or 0)
    pad = _spatial(param, "pad", "pad_h", "pad_w", 0)
    stride = _spatial(param, "stride", "stride_h", "stride_w", 1)
    grouped = param.group > 1 or any(d != 1 for d in param.dilation)
    if grouped or stride != (1, 1) or kernel[0] != kernel[1] or (
            kernel[0] and pad != (kernel[0] // 2,) * 2):
        raise ValueError(f"{where} is not a VGG: conv layer {name!r} has kernel {kernel}, pad "
                         f"{pad}, stride {stride}, group {param.group or 1} (VGG's are 3x3 "
                         "or 1x1, 'same' padding, stride 1, one group).")
    return (param.num_output if param.HasField("num_output") else None), (kernel[0] or None)


def _check_pool(param: message.Message, where: str, name: str) -> None:
    window = _spatial(param, "kernel_size", "kernel_h", "kernel_w", 0)
    stride = _spatial(param, "stride", "stride_h", "stride_w", 1)
    pad = _spatial(param, "pad", "pad_h", "pad_w", 0)
    if param.pool != POOL_METHODS["MAX"] or param.global_pooling or \
            window != (_POOL_WINDOW,) * 2 or stride != (_POOL_WINDOW,) * 2 or pad != (0, 0):
        method = {v: k for k, v in POOL_METHODS.items()}.get(param.pool, param.pool)
        raise ValueError(f"{where} is not a VGG: pooling layer {name!r} is {method} {window} "
                         f"stride {stride} pad {pad} (VGG's is MAX 2x2, stride 2, no pad).")


def _deduce(layers: list[_Layer], where: str) -> tuple[str, list[list[_Layer]], list[_Layer]]:
    """(version, conv layers by block, fc layers), with every shape checked along the net."""
    blocks, fcs = [[]], []
    for layer in layers:
        if layer.kind == "conv":
            if fcs:
                raise ValueError(f"{where} is not a VGG: conv layer {layer.name!r} comes after "
                                 f"inner-product layer {fcs[-1].name!r}.")
            blocks[-1].append(layer)
        elif layer.kind == "pool" and blocks[-1]:
            blocks.append([])
        elif layer.kind == "fc":
            fcs.append(layer)
    blocks = [block for block in blocks if block]
    if not any(layer.kind == "pool" for layer in layers):  # Blocks by name: conv<b>_<i>.
        blocks = _blocks_by_name([conv for block in blocks for conv in block], where)
    shapes = [[_conv_shape(conv, where) for conv in block] for block in blocks]
    if len(fcs) != len(models.HEAD_LAYERS) or not shapes:
        raise ValueError(f"{where} is not a VGG: it has {sum(map(len, shapes))} conv and "
                         f"{len(fcs)} inner-product layers (VGG: 8 to 19 convs, then 3).")
    version = _match_version([[(out, kernel) for out, _, kernel in block] for block in shapes],
                             where)
    channels = 3
    for out, in_channels, _ in (shape for block in shapes for shape in block):
        if in_channels is not None and in_channels != channels:
            raise ValueError(f"{where} is not a VGG: a conv layer takes {in_channels} "
                             f"channels where the net gives {channels}.")
        channels = out
    _check_head(fcs, channels, where)
    return version, blocks, fcs


def _blocks_by_name(convs: list[_Layer], where: str) -> list[list[_Layer]]:
    blocks: dict[int, list[_Layer]] = {}
    for conv in convs:
        match = re.fullmatch(r"conv(\d+)_\d+", conv.name)
        if match is None:
            raise ValueError(f"{where} has no pooling layers and conv layer {conv.name!r} is "
                             "not named conv<block>_<index>; its blocks cannot be told.")
        blocks.setdefault(int(match.group(1)), []).append(conv)
    return [blocks[key] for key in sorted(blocks)]


def _conv_shape(conv: _Layer, where: str) -> tuple[int, int | None, int]:
    """(out, in, kernel) of a conv, from its blobs (a .caffemodel) or its parameters."""
    if not conv.blobs:
        if conv.num_output is None or conv.kernel is None:
            raise ValueError(f"{where}: conv layer {conv.name!r} gives neither blobs nor "
                             "num_output and kernel_size.")
        return conv.num_output, None, conv.kernel
    weight = conv.blobs[0]
    if len(conv.blobs) != 2 or weight.ndim != 4 or weight.shape[2] != weight.shape[3] or \
            conv.blobs[1].size != weight.shape[0]:
        raise ValueError(f"{where} is not a VGG: conv layer {conv.name!r} has blobs of shapes "
                         f"{[b.shape for b in conv.blobs]} (expected a square "
                         "(out, in, k, k) weight and an (out,) bias).")
    return weight.shape[0], weight.shape[1], weight.shape[2]


def _match_version(blocks: list[list[tuple[int, int]]], where: str) -> str:
    width = blocks[0][0][0]
    divisor = models.ARCHITECTURES["A"][0][0][0] // width if width else 0
    for version in (*VERSIONS, "C"):
        expected = [[(max(channels // max(divisor, 1), 1), kernel) for channels, kernel in block]
                    for block in models.ARCHITECTURES[version]]
        if blocks == expected and version == "C":
            raise ValueError(f"{where} is configuration C (1x1 convs), which torchvision's "
                             "key layout has no names for; it is not read.")
        if blocks == expected:
            return version
    found = " | ".join(", ".join(f"{c}x{k}" for c, k in block) for block in blocks)
    raise ValueError(f"{where} is not one of the paper's VGGs: its conv blocks (channels x "
                     f"kernel) are {found}.")


def _check_head(fcs: list[_Layer], channels: int, where: str) -> None:
    if any(not fc.blobs for fc in fcs):
        return  # A prototxt: its widths are checked against the weights' by the caller.
    shapes = []
    for fc in fcs:
        weight = fc.blobs[0]
        if len(fc.blobs) != 2 or weight.ndim < 2 or \
                weight.size != math.prod(weight.shape[-2:]):
            raise ValueError(f"{where} is not a VGG: inner-product layer {fc.name!r} has "
                             f"blobs of shapes {[b.shape for b in fc.blobs]}.")
        fc.blobs[0] = weight.reshape(weight.shape[-2:])  # Legacy (1, 1, out, in).
        shapes.append(fc.blobs[0].shape)
    (fc6_out, fc6_in), (fc7_out, fc7_in), (_, fc8_in) = shapes
    window = math.isqrt(fc6_in // channels)
    if window * window * channels != fc6_in or fc7_in != fc6_out or fc8_in != fc7_out or \
            fc7_out != fc6_out or any(fc.blobs[1].size != fc.blobs[0].shape[0] for fc in fcs):
        raise ValueError(f"{where} is not a VGG: its inner-product weights are {shapes} after "
                         f"a {channels}-channel pool5 (expected ({channels} x h x w) inputs "
                         "for a square window, then equal widths).")


def _state_dict(version: str, blocks: list[list[_Layer]],
                fcs: list[_Layer]) -> dict[str, np.ndarray]:
    state_dict = {}
    convs = [conv for block in blocks for conv in block]
    for conv, index in zip(convs, torchvision_format.feature_indices(version).values()):
        weight, bias = conv.blobs
        state_dict[f"features.{index}.weight"] = weight
        state_dict[f"features.{index}.bias"] = bias.reshape(-1)
    # Caffe's first conv reads BGR: reverse its input channels to read RGB.
    first = state_dict["features.0.weight"][:, ::-1].copy()
    first.flags.writeable = False
    state_dict["features.0.weight"] = first
    for fc, index in zip(fcs, torchvision_format.CLASSIFIER_INDICES.values()):
        state_dict[f"classifier.{index}.weight"] = fc.blobs[0]
        state_dict[f"classifier.{index}.bias"] = fc.blobs[1].reshape(-1)
    return state_dict


def _check_prototxt(prototxt: str, where: str, blocks: list[list[_Layer]],
                    fcs: list[_Layer]) -> None:
    """Raises unless the deploy prototxt describes the net the weights make."""
    net = MESSAGES["NetParameter"]()
    with open(prototxt, encoding="utf-8") as file:
        try:
            text_format.Parse(file.read(), net, allow_unknown_field=True)
        except text_format.ParseError as error:
            raise ValueError(f"{prototxt} is not a Caffe prototxt: {error}.") from None
    described = _layers(net, prototxt, with_blobs=False)
    _, proto_blocks, proto_fcs = _deduce(described, prototxt)
    ours = [[(c.name, c.blobs[0].shape[0], c.blobs[0].shape[2]) for c in b] for b in blocks]
    theirs = [[(c.name, c.num_output, c.kernel) for c in b] for b in proto_blocks]
    head = [(fc.name, fc.blobs[0].shape[0]) for fc in fcs]
    proto_head = [(fc.name, fc.num_output) for fc in proto_fcs]
    if ours != theirs or head != proto_head:
        raise ValueError(f"{prototxt} describes another net than {where}: its conv blocks "
                         f"(name, channels, kernel) {theirs} and inner products {proto_head}, "
                         f"the weights' {ours} and {head}.")
    shapes = list(net.input_shape) + [shape for layer in net.layer if layer.type == "Input"
                                      for shape in layer.input_param.shape]
    dims = list(net.input_dim) or (list(shapes[0].dim) if shapes else [])
    channels = blocks[-1][-1].blobs[0].shape[0]
    window = math.isqrt(fcs[0].blobs[0].shape[1] // channels)
    if len(dims) == 4 and tuple(dims[2:]) != (window * models.TOTAL_STRIDE,) * 2:
        raise ValueError(f"{prototxt} gives input {dims[2]}x{dims[3]} but the fc6 weights of "
                         f"{where} take a {window}x{window} pool5, a "
                         f"{window * models.TOTAL_STRIDE}-pixel input.")


def write_caffemodel(path: str, variables: Any, version: str,
                     prototxt: str | None = None) -> None:
    """Writes our variables as a Caffe V1 `.caffemodel`, laid out as the authors' files are.

    The net is the deploy net (input "data" 1x3xSxS, convs with ReLUs, max-pools, fc6-fc8
    with ReLU and dropout, softmax "prob"), with legacy 4-D blob shapes and conv1_1 reading
    BGR: `read_caffemodel` reads it back and OpenCV 4's Caffe importer runs it (both tested;
    Caffe itself was not at hand). Inputs are expected as the authors' were (BGR, 0-255
    minus the mean pixel); a net trained on other inputs keeps its own preprocessing, which
    the file cannot carry. Layers are serialised one at a time (a concatenation of
    NetParameter messages is their merge), so the file is never held whole in memory.

    Args:
      path: the `.caffemodel` to write.
      variables: {"params": ...} of a VGG with the head, without batch norm.
      version: "A", "B", "D", "E" or a torchvision name.
      prototxt: also write the deploy `.prototxt` (the same net, text, without blobs) here.

    Raises:
      ValueError: for batch-norm variables (Caffe's VGG has none) or another version.
    """
    if any(name.endswith(models.BN_SUFFIX) for name in variables["params"]):
        raise ValueError("The variables have batch norm, which the Caffe VGG layout has not; "
                         "export a net without batch norm.")
    key = torchvision_format.torchvision_version(version)
    state_dict = torchvision_format.to_torchvision(variables, key)
    image_size = int(np.shape(variables["params"]["fc6"]["kernel"])[0]) * models.TOTAL_STRIDE
    header = MESSAGES["NetParameter"](name=torchvision_format.torchvision_name(key, False),
                                       input=["data"], input_dim=[1, 3, image_size, image_size])
    description = MESSAGES["NetParameter"]()
    description.CopyFrom(header)
    with open(path, "wb") as file:
        file.write(header.SerializeToString())
        for piece in _deploy_layers(key, state_dict):
            file.write(piece.SerializeToString())
            if prototxt is not None:
                del piece.layers[0].blobs[:]
                description.layers.add().CopyFrom(piece.layers[0])
    if prototxt is not None:
        with open(prototxt, "w", encoding="utf-8") as file:
            file.write(text_format.MessageToString(description))


def _deploy_layers(version: str, state_dict: dict[str, np.ndarray]):
    """Yields one NetParameter per layer of the deploy net, in forward order."""

    def piece(name, layer_type, bottom, top, blobs=(), **params):
        net = MESSAGES["NetParameter"]()
        layer = net.layers.add(name=name, type=V1_LAYER_TYPES[layer_type], bottom=[bottom],
                               top=[top], **params)
        for array, shape in blobs:
            layer.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3],
                            data=np.ascontiguousarray(array, "<f4").tobytes())
        return net

    indices, bottom = torchvision_format.feature_indices(version), "data"
    for block_index, block in enumerate(models.ARCHITECTURES[version], 1):
        for layer_index, (_, kernel) in enumerate(block, 1):
            name = f"conv{block_index}_{layer_index}"
            weight = state_dict[f"features.{indices[name]}.weight"]
            if name == "conv1_1":
                weight = weight[:, ::-1]  # Our RGB input -> Caffe's BGR.
            bias = state_dict[f"features.{indices[name]}.bias"]
            yield piece(name, "CONVOLUTION", bottom, name,
                        ((weight, weight.shape), (bias, (1, 1, 1, bias.size))),
                        convolution_param={"num_output": weight.shape[0], "pad": [kernel // 2],
                                           "kernel_size": [kernel]})
            # ReLUs run in place, as in the authors' nets.
            yield piece(f"relu{block_index}_{layer_index}", "RELU", name, name)
            bottom = name
        pool = {"pool": POOL_METHODS["MAX"], "kernel_size": _POOL_WINDOW, "stride": _POOL_WINDOW}
        yield piece(f"pool{block_index}", "POOLING", bottom, f"pool{block_index}",
                    pooling_param=pool)
        bottom = f"pool{block_index}"
    for name, index in torchvision_format.CLASSIFIER_INDICES.items():
        weight, bias = (state_dict[f"classifier.{index}.{part}"] for part in ("weight", "bias"))
        yield piece(name, "INNER_PRODUCT", bottom, name,
                    ((weight, (1, 1, *weight.shape)), (bias, (1, 1, 1, bias.size))),
                    inner_product_param={"num_output": weight.shape[0]})
        bottom = name
        if name != models.HEAD_LAYERS[-1]:
            yield piece(f"relu{name[2:]}", "RELU", name, name)
            yield piece(f"drop{name[2:]}", "DROPOUT", name, name)
    yield piece("prob", "SOFTMAX", bottom, "prob")
