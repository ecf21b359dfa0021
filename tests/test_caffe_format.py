"""The authors' Caffe nets: .caffemodel files (V1 and newer layouts) against a numpy forward
pass of the Caffe net (BGR, mean pixel, NCHW, Caffe's flatten), our export read back, bad
files refused in one sentence, and OpenCV 4's Caffe importer when it is installed."""

import importlib.util
import os

import caffe_reference as caffe
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision_reference
from google.protobuf import text_format

from vgg_jax.models import create_model
from vgg_jax.weights import caffe_format, torchvision_format

# OpenCV 5 removed the Caffe importer; 4.x has it.
_CV2 = importlib.util.find_spec("cv2") is not None and hasattr(
    __import__("cv2").dnn, "readNetFromCaffe")
needs_opencv_caffe = pytest.mark.skipif(
    not _CV2, reason="OpenCV with cv2.dnn.readNetFromCaffe (4.x) not installed")


def _images(size=caffe.IMAGE_SIZE, count=2):
    """RGB 0-255 images: smooth ramps plus noise, so the channel order matters."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                     np.full((size, size), 60, np.float32)], -1)
    return np.clip(base + rng.normal(0, 30, (count, size, size, 3)), 0, 255).astype(np.float32)


def _our_logits(weights, images_rgb):
    """Our net built from what read_caffemodel gives, on its own preprocessing of RGB."""
    options = torchvision_format.infer_model_options(weights.state_dict, weights.version)
    model = create_model(weights.version, **options)
    variables = torchvision_format.from_torchvision(weights.state_dict, weights.version)
    x = (images_rgb - np.array(weights.mean_rgb, np.float32)) / np.array(weights.std_rgb,
                                                                          np.float32)
    return np.asarray(model.apply(variables, jnp.asarray(x)))


def _our_net(version, seed, batch_norm=False, **options):
    """A small net of ours and its variables, without an (eager, slow) init."""
    state_dict = torchvision_reference.state_dict(
        version, image_size=caffe.IMAGE_SIZE, seed=seed, width_divisor=caffe.WIDTH_DIVISOR,
        fc_features=caffe.FC_FEATURES, num_classes=caffe.NUM_CLASSES, batch_norm=batch_norm,
        **options)
    model = create_model(version, **torchvision_format.infer_model_options(state_dict, version))
    return model, torchvision_format.from_torchvision(state_dict, version)


def _assert_close(ours, reference):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("version,layout,training_net", [
    ("D", "v1", False), ("E", "v1", True), ("A", "layer", False), ("B", "layer", True)])
def test_caffe_net_gives_the_caffe_forward_pass(tmp_path, version, layout, training_net):
    # 64x64 inputs: a 2x2 pool5, so FC6's (C, H, W) flatten order is exercised.
    path = str(tmp_path / "net.caffemodel")
    caffe.write(path, caffe.vgg_layers(version, seed=ord(version),
                                       with_training_layers=training_net), layout=layout)
    weights = caffe_format.read_caffemodel(path)
    assert weights.version == version and weights.num_classes == caffe.NUM_CLASSES
    assert weights.mean_rgb == (123.68, 116.779, 103.939)
    assert weights.std_rgb == (1.0, 1.0, 1.0)
    assert torchvision_format.infer_model_options(weights.state_dict, version) == {
        "num_classes": caffe.NUM_CLASSES, "width_divisor": caffe.WIDTH_DIVISOR,
        "fc_features": caffe.FC_FEATURES, "image_size": caffe.IMAGE_SIZE, "batch_norm": False}
    images = _images()
    reference = caffe.forward(path, images[..., ::-1])  # Caffe reads BGR.
    _assert_close(_our_logits(weights, images), reference)
    # Without the BGR flip the logits would differ: the test can tell.
    assert not np.allclose(caffe.forward(path, images), reference, rtol=1e-3)


@pytest.mark.parametrize("variant", [
    {"values": "unpacked"}, {"values": "double"}, {"transpose_fc": True},
    {"layout": "layer", "legacy_shapes": True}])
def test_blob_encodings_read_alike(tmp_path, variant):
    layers = caffe.vgg_layers("A", seed=3)
    caffe.write(str(tmp_path / "plain.caffemodel"), layers)
    caffe.write(str(tmp_path / "other.caffemodel"), layers, **variant)
    plain = caffe_format.read_caffemodel(str(tmp_path / "plain.caffemodel"))
    other = caffe_format.read_caffemodel(str(tmp_path / "other.caffemodel"))
    assert list(other.state_dict) == list(plain.state_dict)
    for key, value in plain.state_dict.items():
        np.testing.assert_array_equal(other.state_dict[key], value, err_msg=key)
    if variant.get("transpose_fc"):  # The reference runs it too.
        images = _images()[..., ::-1]
        np.testing.assert_allclose(caffe.forward(str(tmp_path / "other.caffemodel"), images),
                                   caffe.forward(str(tmp_path / "plain.caffemodel"), images))


def test_full_width_trunk_gives_the_released_shapes(tmp_path):
    # The real VGG-16 trunk (512 x 7 x 7 pool5, 1000 classes) with a narrow fc6/fc7, cheap;
    # written by our exporter (the small nets above check its format independently).
    state_dict = torchvision_reference.state_dict("D", image_size=224, width_divisor=1,
                                                  fc_features=8, num_classes=1000)
    path = str(tmp_path / "vgg16.caffemodel")
    caffe_format.write_caffemodel(path, torchvision_format.from_torchvision(state_dict, "D"),
                                  "D")
    weights = caffe_format.read_caffemodel(path)
    assert weights.version == "D" and weights.num_classes == 1000
    assert torchvision_format.infer_model_options(weights.state_dict, "D") == {
        "num_classes": 1000, "width_divisor": 1, "fc_features": 8, "image_size": 224,
        "batch_norm": False}
    assert list(weights.state_dict) == list(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(weights.state_dict[key], value, err_msg=key)
    assert weights.state_dict["classifier.0.weight"].shape == (8, 25088)
    assert not weights.state_dict["classifier.0.weight"].flags.writeable  # a view, no copy


def test_our_export_reads_back_and_runs_as_caffe(tmp_path):
    model, variables = _our_net("E", seed=1)
    path, prototxt = str(tmp_path / "ours.caffemodel"), str(tmp_path / "ours.prototxt")
    caffe_format.write_caffemodel(path, variables, "vgg19", prototxt=prototxt)
    weights = caffe_format.read_caffemodel(path, prototxt)
    back = torchvision_format.from_torchvision(weights.state_dict, weights.version)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    # Run by the independent reader and forward pass: BGR minus the mean pixel.
    images = _images()
    reference = caffe.forward(path, images[..., ::-1])
    ours = np.asarray(model.apply(variables, jnp.asarray(images - weights.mean_rgb)))
    _assert_close(ours, reference)
    with open(prototxt) as file:
        text = file.read()
    assert 'type: CONVOLUTION' in text and "input_dim: 64" in text and "blobs" not in text
    _, with_bn = _our_net("A", seed=2, batch_norm=True)
    with pytest.raises(ValueError, match="The variables have batch norm"):
        caffe_format.write_caffemodel(str(tmp_path / "bn.caffemodel"), with_bn, "A")


def _deploy_text(layers, input_size=caffe.IMAGE_SIZE):
    """A deploy prototxt in Caffe's text form, as the authors' is written."""
    lines = ['name: "VGG_ILSVRC_test"', 'input: "data"'] + [
        f"input_dim: {d}" for d in (10, 3, input_size, input_size)]
    for spec in layers:
        body = [f'bottom: "{b}"' for b in spec["bottom"]] + [f'top: "{t}"' for t in spec["top"]]
        body += [f'name: "{spec["name"]}"', f"type: {spec['type']}"]
        if "conv" in spec:
            out, pad, kernel = spec["conv"]
            body.append(f"convolution_param {{ num_output: {out} pad: {pad} "
                        f"kernel_size: {kernel} }}")
        if "pool" in spec:
            body.append("pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        if "ip" in spec:
            body.append(f"inner_product_param {{ num_output: {spec['ip']} }}")
        if spec["type"] == "DROPOUT":  # A field our schema leaves out: skipped.
            body.append("dropout_param { dropout_ratio: 0.5 }")
        lines.append("layers {\n  " + "\n  ".join(body) + "\n}")
    return "\n".join(lines) + "\n"


def test_prototxt_must_agree_with_the_weights(tmp_path):
    layers = caffe.vgg_layers("D")
    path = str(tmp_path / "net.caffemodel")
    caffe.write(path, layers)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(_deploy_text(layers))
    assert caffe_format.read_caffemodel(path, str(deploy)).version == "D"
    deploy.write_text(_deploy_text(layers, input_size=224))
    with pytest.raises(ValueError, match=r"deploy.prototxt gives input 224x224 but the fc6 "
                                         r"weights of .*net.caffemodel take a 2x2 pool5"):
        caffe_format.read_caffemodel(path, str(deploy))
    wider = [dict(spec, ip=64) if spec["name"] == "fc7" else spec for spec in layers]
    deploy.write_text(_deploy_text(wider))
    with pytest.raises(ValueError, match=r"deploy.prototxt describes another net than .*"
                                         r"\('fc7', 64\).*\('fc7', 32\)"):
        caffe_format.read_caffemodel(path, str(deploy))


def test_newer_prototxt_input_layer_gives_the_input_size(tmp_path):
    layers = caffe.vgg_layers("B")
    path = str(tmp_path / "net.caffemodel")
    caffe.write(path, layers, layout="layer")
    described = text_format.MessageToString(caffe.write(None, layers, layout="layer",
                                                        with_blobs=False))
    deploy = tmp_path / "deploy.prototxt"
    for size in (caffe.IMAGE_SIZE, 96):
        deploy.write_text(f'layer {{ name: "input" type: "Input" top: "data" input_param {{ '
                          f'shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}\n'
                          + described)
        if size == caffe.IMAGE_SIZE:
            assert caffe_format.read_caffemodel(path, str(deploy)).version == "B"
    with pytest.raises(ValueError, match="gives input 96x96 but the fc6 weights"):
        caffe_format.read_caffemodel(path, str(deploy))


def test_blocks_by_name_when_no_pooling_layers(tmp_path):
    # A file holding only the layers with weights: the conv<block>_<index> names tell blocks.
    layers = [spec for spec in caffe.vgg_layers("E") if "blobs" in spec]
    path = tmp_path / "weights_only.caffemodel"
    caffe.write(str(path), layers)
    assert caffe_format.read_caffemodel(str(path)).version == "E"
    layers[0] = dict(layers[0], name="first")
    caffe.write(str(path), layers)
    with pytest.raises(ValueError, match="conv layer 'first' is not named conv<block>_<index>"):
        caffe_format.read_caffemodel(str(path))


@pytest.mark.parametrize("case,message", [
    ("garbage", r"is not a Caffe net: protobuf cannot parse it"),
    ("truncated", r"is not a Caffe net: protobuf cannot parse it"),
    ("prototxt_as_weights", r"is not a Caffe net: protobuf cannot parse it"),
    ("empty", r"holds no Caffe layers"),
    ("lrn", r"is not a plain VGG: layer 'norm1' is of type LRN"),
    ("missing_conv", r"is not one of the paper's VGGs: its conv blocks \(channels x kernel\) "
                     r"are 4x3, 4x3 \| 8x3, 8x3 \| 16x3, 16x3 \| 32x3"),
    ("config_c", r"is configuration C \(1x1 convs\)"),
    ("stride", r"is not a VGG: conv layer 'conv2_1' has kernel \(3, 3\), pad \(1, 1\), "
               r"stride \(2, 2\)"),
    ("v0", r"uses Caffe's V0 layer format"),
    ("wrong_fc6", r"is not a VGG: its inner-product weights are"),
])
def test_bad_files_fail_in_one_sentence_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.caffemodel"
    layers = caffe.vgg_layers("D")
    if case == "garbage":
        path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(64))
    elif case == "truncated":
        caffe.write(str(path), layers)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "prototxt_as_weights":
        path.write_text(_deploy_text(layers))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "lrn":
        lrn = {"name": "norm1", "type": "LRN", "bottom": ["conv1_1"], "top": ["norm1"]}
        caffe.write(str(path), layers[:2] + [lrn] + layers[2:])
    elif case == "missing_conv":
        caffe.write(str(path), [s for s in layers if s["name"] not in ("conv3_3", "relu3_3")])
    elif case == "config_c":
        caffe.write(str(path), caffe.vgg_layers("C"))
    elif case == "stride":
        net = caffe.write(None, layers)
        next(layer for layer in net.layers if layer.name == "conv2_1").convolution_param \
            .stride.append(2)
        path.write_bytes(net.SerializeToString())
    elif case == "v0":
        net = caffe.write(None, layers)
        net.layers[0].layer.name = "conv1_1"
        path.write_bytes(net.SerializeToString())
    elif case == "wrong_fc6":
        fc6 = next(spec for spec in layers if spec["name"] == "fc6")
        fc6["blobs"][0] = fc6["blobs"][0][:, :-1]
        caffe.write(str(path), layers)
    with pytest.raises(ValueError, match=message) as error:
        caffe_format.read_caffemodel(str(path))
    assert str(path) in str(error.value) and str(error.value).count(". ") == 0


@needs_opencv_caffe
def test_opencv_caffe_importer_agrees(tmp_path):
    import cv2  # Optional: only OpenCV 4.x has the Caffe importer.

    layers = caffe.vgg_layers("D", seed=5)
    path, deploy = str(tmp_path / "net.caffemodel"), tmp_path / "deploy.prototxt"
    caffe.write(path, layers)
    deploy.write_text(_deploy_text(layers, input_size=caffe.IMAGE_SIZE))
    images = _images()
    net = cv2.dnn.readNetFromCaffe(str(deploy), path)
    net.setInput((images[..., ::-1] - caffe.AUTHORS_MEAN_BGR).transpose(0, 3, 1, 2).copy())
    opencv = net.forward("fc8").reshape(len(images), -1)
    _assert_close(caffe.forward(path, images[..., ::-1]), opencv)  # The reference itself.
    _assert_close(_our_logits(caffe_format.read_caffemodel(path, str(deploy)), images), opencv)
    # And our export, with the prototxt written beside it.
    ours, ours_deploy = str(tmp_path / "ours.caffemodel"), str(tmp_path / "ours.prototxt")
    model, variables = _our_net("B", seed=2)
    caffe_format.write_caffemodel(ours, variables, "B", prototxt=ours_deploy)
    net = cv2.dnn.readNetFromCaffe(ours_deploy, ours)
    net.setInput((images[..., ::-1] - caffe.AUTHORS_MEAN_BGR).transpose(0, 3, 1, 2).copy())
    _assert_close(np.asarray(model.apply(variables, jnp.asarray(images - caffe_format.MEAN_RGB))),
                  net.forward("fc8").reshape(len(images), -1))
