"""Our own protobuf descriptor of the part of Caffe's schema that VGG's weights need.

Caffe's `.caffemodel` is a serialised `NetParameter`; its `.prototxt` the same message as
text. The subset here is declared with the field numbers the wire format fixes and Caffe's
field names (which the text form uses), through `descriptor_pb2` in a private descriptor
pool, so that it neither needs Caffe nor clashes with a `caffe_pb2` loaded beside it.

One liberty keeps memory down: Caffe declares a blob's values `repeated float data = 5
[packed = true]`. Packed, they are one length-delimited field holding the little-endian
float32 values back to back: the same bytes on the wire as a `bytes` field. Declared as
`bytes` here (`double_data` likewise), each blob comes out of the parse as one Python bytes
object that numpy views without a copy, where `repeated float` would make a Python float
per value (138 million for VGG-16). `FloatBlobProto` declares the same field as floats, for
values written unpacked (legal protobuf, though Caffe never writes them so).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

# Caffe's V1 layer-type enum (V1LayerParameter.LayerType): the numbers the binary files hold,
# the names their prototxt text uses.
V1_LAYER_TYPES = {
    "NONE": 0, "ACCURACY": 1, "BNLL": 2, "CONCAT": 3, "CONVOLUTION": 4, "DATA": 5,
    "DROPOUT": 6, "EUCLIDEAN_LOSS": 7, "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10,
    "IM2COL": 11, "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15,
    "MULTINOMIAL_LOGISTIC_LOSS": 16, "POOLING": 17, "RELU": 18, "SIGMOID": 19, "SOFTMAX": 20,
    "SOFTMAX_LOSS": 21, "SPLIT": 22, "TANH": 23, "WINDOW_DATA": 24, "ELTWISE": 25, "POWER": 26,
    "SIGMOID_CROSS_ENTROPY_LOSS": 27, "HINGE_LOSS": 28, "MEMORY_DATA": 29, "ARGMAX": 30,
    "THRESHOLD": 31, "DUMMY_DATA": 32, "SLICE": 33, "MVN": 34, "ABSVAL": 35, "SILENCE": 36,
    "CONTRASTIVE_LOSS": 37, "EXP": 38, "DECONVOLUTION": 39,
}
# PoolingParameter.PoolMethod.
POOL_METHODS = {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}
# message -> ((field, number, type), ...). A type is a scalar type name, a
# message name, or "enum:<name>"; "*" marks a repeated field.
_PACKAGE = "vgg_jax_caffe"  # apart from any caffe_pb2 loaded in the same process
_ENUMS = {"V1LayerType": V1_LAYER_TYPES, "PoolMethod": POOL_METHODS}
_SCHEMA = {
    "BlobShape": (("dim", 1, "int64*"),),
    "BlobProto": (("num", 1, "int64"), ("channels", 2, "int64"), ("height", 3, "int64"),
                  ("width", 4, "int64"), ("data", 5, "bytes"), ("shape", 7, "BlobShape"),
                  ("double_data", 8, "bytes")),
    "FloatBlobProto": (("data", 5, "float*"),),  # the unpacked fallback view of BlobProto
    "ConvolutionParameter": (
        ("num_output", 1, "uint32"), ("pad", 3, "uint32*"), ("kernel_size", 4, "uint32*"),
        ("group", 5, "uint32"), ("stride", 6, "uint32*"), ("pad_h", 9, "uint32"),
        ("pad_w", 10, "uint32"), ("kernel_h", 11, "uint32"), ("kernel_w", 12, "uint32"),
        ("stride_h", 13, "uint32"), ("stride_w", 14, "uint32"), ("dilation", 18, "uint32*")),
    "PoolingParameter": (
        ("pool", 1, "enum:PoolMethod"), ("kernel_size", 2, "uint32"), ("stride", 3, "uint32"),
        ("pad", 4, "uint32"), ("kernel_h", 5, "uint32"), ("kernel_w", 6, "uint32"),
        ("stride_h", 7, "uint32"), ("stride_w", 8, "uint32"), ("pad_h", 9, "uint32"),
        ("pad_w", 10, "uint32"), ("global_pooling", 12, "bool")),
    "InnerProductParameter": (("num_output", 1, "uint32"), ("axis", 5, "int32"),
                              ("transpose", 6, "bool")),
    "V1LayerParameter": (
        ("v0_layer", 1, "bytes"), ("bottom", 2, "string*"), ("top", 3, "string*"),
        ("name", 4, "string"), ("type", 5, "enum:V1LayerType"), ("blobs", 6, "BlobProto*"),
        ("convolution_param", 10, "ConvolutionParameter"),
        ("inner_product_param", 17, "InnerProductParameter"),
        ("pooling_param", 19, "PoolingParameter")),
    "InputParameter": (("shape", 1, "BlobShape*"),),
    "LayerParameter": (
        ("name", 1, "string"), ("type", 2, "string"), ("bottom", 3, "string*"),
        ("top", 4, "string*"), ("blobs", 7, "BlobProto*"),
        ("convolution_param", 106, "ConvolutionParameter"),
        ("inner_product_param", 117, "InnerProductParameter"),
        ("pooling_param", 121, "PoolingParameter"), ("input_param", 143, "InputParameter")),
    "NetParameter": (
        ("name", 1, "string"), ("layers", 2, "V1LayerParameter*"), ("input", 3, "string*"),
        ("input_dim", 4, "int64*"), ("input_shape", 8, "BlobShape*"),
        ("layer", 100, "LayerParameter*")),
}


def _message_classes() -> dict[str, type[message.Message]]:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{_PACKAGE}.proto", package=_PACKAGE, syntax="proto2")
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)
    for name, fields in _SCHEMA.items():
        proto = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            base = kind.rstrip("*")
            entry = proto.field.add(name=field_name, number=number, label=(
                field.LABEL_REPEATED if kind.endswith("*") else field.LABEL_OPTIONAL))
            if base.startswith("enum:"):
                entry.type, entry.type_name = field.TYPE_ENUM, f".{_PACKAGE}.{base[5:]}"
            elif base in _SCHEMA:
                entry.type, entry.type_name = field.TYPE_MESSAGE, f".{_PACKAGE}.{base}"
            else:
                entry.type = getattr(field, f"TYPE_{base.upper()}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{_PACKAGE}.{name}")) for name in _SCHEMA}


MESSAGES = _message_classes()
