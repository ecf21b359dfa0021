"""Caffe nets for tests, without Caffe: random VGGs written as `.caffemodel` files, and a numpy
forward pass that runs a file as Caffe would (BGR NCHW input, layer by layer).

The schema here is declared on its own, as Caffe's caffe.proto declares it (a blob's values
`repeated float` packed, or unpacked or as doubles on request; 2014's legacy 4-D blob
shapes), not through vgg_jax's `caffe_schema` view of it: a wrong field number on either
side shows. Field numbers checked against BVLC/caffe's src/caffe/proto/caffe.proto.
"""

import numpy as np
import torchvision_reference
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from vgg_jax import models

# The authors' mean pixel, (B, G, R), on 0-255 inputs (their release notes; the paper's notes).
AUTHORS_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
# V1LayerParameter.LayerType values used here.
V1_TYPES = {"CONVOLUTION": 4, "DATA": 5, "DROPOUT": 6, "INNER_PRODUCT": 14, "LRN": 15,
            "POOLING": 17, "RELU": 18, "SOFTMAX": 20, "SOFTMAX_LOSS": 21}
# LayerParameter.type strings of the same layers.
NEW_TYPES = {"CONVOLUTION": "Convolution", "DATA": "Data", "DROPOUT": "Dropout",
             "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "POOLING": "Pooling",
             "RELU": "ReLU", "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss"}
WIDTH_DIVISOR, FC_FEATURES, NUM_CLASSES, IMAGE_SIZE = 16, 32, 10, 64


def _schema(values: str):
    """Message classes; `values`: "packed" (Caffe), "unpacked" or "double" blob values."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name=f"caffe_test_{values}.proto",
                                               package="caffe_test", syntax="proto2")

    def message(name, *fields):
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, repeated, *packed in fields:
            field = msg.field.add(name=field_name, number=number,
                                  label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if isinstance(kind, str):
                field.type, field.type_name = F.TYPE_MESSAGE, f".caffe_test.{kind}"
            else:
                field.type = kind
            if packed:
                field.options.packed = packed[0]

    message("BlobShape", ("dim", 1, F.TYPE_INT64, True, True))
    value_field = ("double_data", 8, F.TYPE_DOUBLE) if values == "double" else \
        ("data", 5, F.TYPE_FLOAT)
    message("BlobProto", ("num", 1, F.TYPE_INT32, False), ("channels", 2, F.TYPE_INT32, False),
            ("height", 3, F.TYPE_INT32, False), ("width", 4, F.TYPE_INT32, False),
            (*value_field, True, values != "unpacked"), ("shape", 7, "BlobShape", False))
    message("ConvolutionParameter", ("num_output", 1, F.TYPE_UINT32, False),
            ("pad", 3, F.TYPE_UINT32, True), ("kernel_size", 4, F.TYPE_UINT32, True),
            ("stride", 6, F.TYPE_UINT32, True))
    message("PoolingParameter", ("pool", 1, F.TYPE_INT32, False),
            ("kernel_size", 2, F.TYPE_UINT32, False), ("stride", 3, F.TYPE_UINT32, False))
    message("InnerProductParameter", ("num_output", 1, F.TYPE_UINT32, False),
            ("transpose", 6, F.TYPE_BOOL, False))
    message("V0LayerParameter", ("name", 1, F.TYPE_STRING, False))
    message("V1LayerParameter", ("layer", 1, "V0LayerParameter", False),
            ("bottom", 2, F.TYPE_STRING, True), ("top", 3, F.TYPE_STRING, True),
            ("name", 4, F.TYPE_STRING, False), ("type", 5, F.TYPE_INT32, False),
            ("blobs", 6, "BlobProto", True), ("convolution_param", 10, "ConvolutionParameter",
                                             False),
            ("inner_product_param", 17, "InnerProductParameter", False),
            ("pooling_param", 19, "PoolingParameter", False))
    message("LayerParameter", ("name", 1, F.TYPE_STRING, False),
            ("type", 2, F.TYPE_STRING, False), ("bottom", 3, F.TYPE_STRING, True),
            ("top", 4, F.TYPE_STRING, True), ("blobs", 7, "BlobProto", True),
            ("convolution_param", 106, "ConvolutionParameter", False),
            ("inner_product_param", 117, "InnerProductParameter", False),
            ("pooling_param", 121, "PoolingParameter", False))
    message("NetParameter", ("name", 1, F.TYPE_STRING, False),
            ("layers", 2, "V1LayerParameter", True), ("input", 3, F.TYPE_STRING, True),
            ("input_dim", 4, F.TYPE_INT32, True), ("layer", 100, "LayerParameter", True))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe_test.NetParameter"))


NET_CLASSES = {values: _schema(values) for values in ("packed", "unpacked", "double")}


def vgg_layers(version, seed=0, width_divisor=WIDTH_DIVISOR, fc_features=FC_FEATURES,
               num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, with_training_layers=False):
    """The layers of a VGG as Caffe holds them, with random weights: a list of dicts
    {name, type (V1 name), bottom, top, blobs, conv (num_output, pad, kernel) | pool | ip}.
    conv1_1's weights read BGR (they are random: only the order they are applied in counts).
    """
    rng = np.random.default_rng(seed)
    layers, bottom, channels = [], "data", 3
    if with_training_layers:  # A training net as Caffe saves it starts with its data layer.
        layers.append({"name": "data", "type": "DATA", "bottom": [], "top": ["data", "label"]})
    for b, block in enumerate(models.ARCHITECTURES[version], 1):
        for i, (out, kernel) in enumerate(block, 1):
            out, name = max(out // width_divisor, 1), f"conv{b}_{i}"
            weight = rng.standard_normal((out, channels, kernel, kernel)) * np.sqrt(
                2 / (channels * kernel * kernel))
            layers.append({"name": name, "type": "CONVOLUTION", "bottom": [bottom],
                           "top": [name], "conv": (out, kernel // 2, kernel),
                           "blobs": [weight.astype(np.float32),
                                     rng.normal(0, 0.1, out).astype(np.float32)]})
            layers.append({"name": f"relu{b}_{i}", "type": "RELU", "bottom": [name],
                           "top": [name]})
            bottom, channels = name, out
        layers.append({"name": f"pool{b}", "type": "POOLING", "bottom": [bottom],
                       "top": [f"pool{b}"], "pool": True})
        bottom = f"pool{b}"
    inputs = channels * (image_size // 32) ** 2
    for name, out in (("fc6", fc_features), ("fc7", fc_features), ("fc8", num_classes)):
        weight = rng.standard_normal((out, inputs)) * np.sqrt(2 / inputs)
        layers.append({"name": name, "type": "INNER_PRODUCT", "bottom": [bottom], "top": [name],
                       "ip": out, "blobs": [weight.astype(np.float32),
                                            rng.normal(0, 0.1, out).astype(np.float32)]})
        if name != "fc8":
            layers += [{"name": f"relu{name[2:]}", "type": "RELU", "bottom": [name],
                        "top": [name]},
                       {"name": f"drop{name[2:]}", "type": "DROPOUT", "bottom": [name],
                        "top": [name]}]
        bottom, inputs = name, out
    if with_training_layers:
        layers.append({"name": "loss", "type": "SOFTMAX_LOSS", "bottom": ["fc8", "label"],
                       "top": ["loss"]})
    else:
        layers.append({"name": "prob", "type": "SOFTMAX", "bottom": ["fc8"], "top": ["prob"]})
    return layers


def write(path, layers, layout="v1", values="packed", input_size=None, with_blobs=True,
          legacy_shapes=None, transpose_fc=False):
    """Writes the layers as a binary NetParameter (V1 `layers` with legacy 4-D blob shapes
    as in 2014, or the newer `layer` with BlobShape; `legacy_shapes` overrides the layout's
    choice); `transpose_fc` stores inner-product weights (in, out) with transpose set.
    Returns the message."""
    legacy_shapes = layout == "v1" if legacy_shapes is None else legacy_shapes
    net = NET_CLASSES[values](name="test_vgg")
    if input_size:
        net.input.append("data")
        net.input_dim.extend([1, 3, input_size, input_size])
    for spec in layers:
        layer = net.layers.add() if layout == "v1" else net.layer.add()
        layer.name, layer.bottom[:], layer.top[:] = spec["name"], spec["bottom"], spec["top"]
        layer.type = V1_TYPES[spec["type"]] if layout == "v1" else NEW_TYPES[spec["type"]]
        if "conv" in spec:
            out, pad, kernel = spec["conv"]
            layer.convolution_param.num_output = out
            layer.convolution_param.pad.append(pad)
            layer.convolution_param.kernel_size.append(kernel)
        if "pool" in spec:
            layer.pooling_param.pool, layer.pooling_param.kernel_size = 0, 2  # MAX
            layer.pooling_param.stride = 2
        arrays = list(spec.get("blobs", [])) if with_blobs else []
        if "ip" in spec:
            layer.inner_product_param.num_output = spec["ip"]
            if transpose_fc:
                layer.inner_product_param.transpose = True
                arrays[:1] = [arrays[0].T] if arrays else []
        for array in arrays:
            blob = layer.blobs.add()
            if legacy_shapes:  # Legacy: (out, in, kh, kw), (1, 1, out, in), (1, 1, 1, out).
                blob.num, blob.channels, blob.height, blob.width = (
                    (1,) * (4 - array.ndim) + array.shape)
            else:
                blob.shape.dim.extend(array.shape)
            if values == "double":
                blob.double_data.extend(array.astype(np.float64).ravel())
            else:
                blob.data.extend(array.ravel())
    if path is not None:
        with open(path, "wb") as file:
            file.write(net.SerializeToString())
    return net


def forward(path, images_bgr):
    """Runs a .caffemodel as Caffe's deploy net would, up to the last inner product.

    Args:
      path: a file (read with this module's schema, packed floats).
      images_bgr: [N, H, W, 3] BGR, 0-255.

    Returns:
      The last inner product's output (the logits), float64.
    """
    net = NET_CLASSES["packed"]()
    with open(path, "rb") as file:
        net.ParseFromString(file.read())
    layers = net.layers or net.layer
    blobs = {"data": (images_bgr - AUTHORS_MEAN_BGR).transpose(0, 3, 1, 2).astype(np.float64)}
    logits = None
    for layer in layers:
        kind = layer.type if net.layers else {v: V1_TYPES[k] for k, v in NEW_TYPES.items()}[
            layer.type]
        arrays = [_blob(blob) for blob in layer.blobs]
        x = blobs.get(layer.bottom[0]) if layer.bottom else None
        if kind == V1_TYPES["CONVOLUTION"]:
            assert list(layer.convolution_param.pad) == [arrays[0].shape[-1] // 2]
            y = torchvision_reference.conv2d_nchw(x, arrays[0], arrays[1].ravel())
        elif kind == V1_TYPES["RELU"]:
            y = np.maximum(x, 0)
        elif kind == V1_TYPES["POOLING"]:
            n, c, h, w = x.shape
            y = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        elif kind == V1_TYPES["INNER_PRODUCT"]:
            weight = arrays[0].reshape(arrays[0].shape[-2:])
            if layer.inner_product_param.transpose:  # Stored (in, out).
                weight = weight.T
            y = logits = x.reshape(x.shape[0], -1) @ weight.T + arrays[1].ravel()
        else:  # Dropout (identity at test time), softmax, data: not needed for the logits.
            continue
        blobs[layer.top[0]] = y
    return logits


def _blob(blob):
    values = np.asarray(blob.data, np.float64)
    shape = tuple(blob.shape.dim) or (blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(shape)
