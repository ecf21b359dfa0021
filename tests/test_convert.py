"""torchvision -> vgg-jax weight conversion, checked against a numpy torchvision forward pass."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpoint, convert, models
from vgg_jax.models import create_model

WIDTH_DIVISOR, FC_FEATURES, NUM_CLASSES = 16, 32, 10


def torchvision_state_dict(version, image_size=64, seed=0, width_divisor=WIDTH_DIVISOR,
                           fc_features=FC_FEATURES, num_classes=NUM_CLASSES):
    """A random state dict in torchvision's VGG layout, narrowed like our width_divisor."""
    rng = np.random.default_rng(seed)
    sd, in_channels = {}, 3
    indices = convert.feature_indices(version)
    layers = [layer for block in models.ARCHITECTURES[version] for layer in block]
    for index, (channels, kernel) in zip(indices.values(), layers):
        out = channels // width_divisor
        fan_in = in_channels * kernel * kernel
        sd[f"features.{index}.weight"] = (
            rng.standard_normal((out, in_channels, kernel, kernel)) * np.sqrt(2 / fan_in)
        ).astype(np.float32)
        sd[f"features.{index}.bias"] = rng.normal(0, 0.1, out).astype(np.float32)
        in_channels = out
    flat = in_channels * (image_size // 32) ** 2
    for i, (n_in, n_out) in zip((0, 3, 6), ((flat, fc_features), (fc_features, fc_features),
                                            (fc_features, num_classes))):
        sd[f"classifier.{i}.weight"] = (
            rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)).astype(np.float32)
        sd[f"classifier.{i}.bias"] = rng.normal(0, 0.1, n_out).astype(np.float32)
    return sd


def conv2d_nchw(x, weight, bias):
    """torch.nn.Conv2d(padding=1, stride=1) in numpy: x [N, C, H, W], weight [O, C, kh, kw]."""
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


def torchvision_forward(sd, version, images_nhwc):
    """torchvision's VGG.forward in numpy: features, NCHW flatten, classifier (eval mode)."""
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
    indices = convert.feature_indices(version)
    for block_index, block in enumerate(models.ARCHITECTURES[version], 1):
        for layer_index in range(1, len(block) + 1):
            i = indices[f"conv{block_index}_{layer_index}"]
            x = np.maximum(conv2d_nchw(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]), 0)
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    x = x.reshape(x.shape[0], -1)  # torch.flatten(x, 1) of an NCHW map: channel-major.
    for i, relu in ((0, True), (3, True), (6, False)):
        x = x @ sd[f"classifier.{i}.weight"].T.astype(np.float64) + sd[f"classifier.{i}.bias"]
        if relu:
            x = np.maximum(x, 0)
    return x


def test_feature_indices_match_torchvision():
    assert list(convert.feature_indices("vgg11").values()) == [0, 3, 6, 8, 11, 13, 16, 18]
    assert list(convert.feature_indices("D").values()) == [
        0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(convert.feature_indices("E").values())[-1] == 34  # vgg19's last conv


@pytest.mark.parametrize("version", ["A", "B", "D", "E"])
def test_conversion_reproduces_the_torchvision_forward_pass(version):
    # 64x64 input: a 2x2 final map, so FC6's NCHW-flatten permutation is exercised.
    sd = torchvision_state_dict(version, image_size=64, seed=ord(version))
    options = convert.infer_model_options(sd, version)
    assert options == {"num_classes": NUM_CLASSES, "width_divisor": WIDTH_DIVISOR,
                       "fc_features": FC_FEATURES, "image_size": 64}
    variables = convert.from_torchvision(sd, convert.TORCHVISION_NAMES[version])
    model = create_model(version, **options)
    images = np.random.default_rng(1).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(model.apply(variables, jnp.asarray(images)))
    reference = torchvision_forward(sd, version, images)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * scale)
    # The converted parameters fill the model's tree exactly.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(variables["params"])
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables["params"])


def test_full_size_state_dict_gives_torchvisions_model():
    # Zero-copy broadcast arrays with vgg16's real shapes (no 528 MB allocation).
    shapes = {k: v.shape for k, v in torchvision_state_dict(
        "D", 224, width_divisor=1, fc_features=8, num_classes=8).items()
        if not k.startswith("classifier")}
    shapes.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                   "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                   "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)})
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert convert.infer_model_options(sd, "vgg16") == {
        "num_classes": 1000, "width_divisor": 1, "fc_features": 4096, "image_size": 224}
    assert sum(int(np.prod(s)) for s in shapes.values()) == 138_357_544


def test_bad_state_dicts_are_clear_errors():
    sd = torchvision_state_dict("B")
    with pytest.raises(ValueError, match="features.3.weight' missing.*vgg11"):
        convert.from_torchvision(sd, "A")  # vgg13 weights read as vgg11
    broken = dict(sd, **{"classifier.3.weight": np.zeros((5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"classifier.3.weight has shape \(5, 5\)"):
        convert.from_torchvision(broken, "B")
    missing = {k: v for k, v in sd.items() if k != "features.7.bias"}
    with pytest.raises(ValueError, match="features.7.bias.*missing"):
        convert.from_torchvision(missing, "B")
    with pytest.raises(ValueError, match="batch-norm"):
        convert.from_torchvision(dict(sd, **{"features.1.running_mean": np.zeros(4)}), "B")
    with pytest.raises(ValueError, match="no weights for configuration C"):
        convert.from_torchvision(sd, "C")
    with pytest.raises(ValueError, match="not supported"):
        convert.from_torchvision(sd, "vgg13_bn")
    # Wrapper prefixes and nesting are accepted.
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    assert convert.from_torchvision(wrapped, "vgg13")["params"].keys() == \
        convert.from_torchvision(sd, "B")["params"].keys()


def test_cli_writes_a_checkpoint_with_torchvision_preprocessing(tmp_path, capsys):
    sd = torchvision_state_dict("A", image_size=32)
    path = str(tmp_path / "vgg11.npz")
    np.savez(path, **sd)
    out = str(tmp_path / "converted")
    convert.main([path, "--version", "vgg11", "--out", out])
    assert "--mode=eval" in capsys.readouterr().out
    variables, config = checkpoint.load_variables(out)
    assert config.model.version == "A" and config.data.image_size == 32
    assert (config.model.width_divisor, config.model.fc_features) == (WIDTH_DIVISOR, FC_FEATURES)
    np.testing.assert_allclose(config.data.mean_rgb, (123.675, 116.28, 103.53))
    np.testing.assert_allclose(config.data.std_rgb, (58.395, 57.12, 57.375))
    assert config.data.train_scale_min == config.data.train_scale_max == 256
    expected = convert.from_torchvision(sd, "A")
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch installed")
def test_pth_without_torch_names_the_fix(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\0")
    with pytest.raises(SystemExit, match="pip install torch"):
        convert.load_state_dict(str(path))
