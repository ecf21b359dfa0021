"""torchvision <-> vgg-jax weights, both ways, plain and batch norm: against a numpy
torchvision forward pass always, and against torchvision itself when torch is installed."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision_reference as reference

from vgg_jax.models import create_model
from vgg_jax.weights import torchvision_format as tw

HAS_TORCH = importlib.util.find_spec("torch") is not None and \
    importlib.util.find_spec("torchvision") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch and torchvision not installed")


def test_feature_indices_match_torchvision():
    assert list(tw.feature_indices("vgg11").values()) == [0, 3, 6, 8, 11, 13, 16, 18]
    assert list(tw.feature_indices("D").values()) == [
        0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(tw.feature_indices("E").values())[-1] == 34  # vgg19's last conv
    # vgg11_bn: Conv2d, BatchNorm2d, ReLU per conv.
    assert list(tw.feature_indices("vgg11_bn", batch_norm=True).values()) == [
        0, 4, 8, 11, 15, 18, 22, 25]
    ends = tw.feature_slice_ends("vgg16")
    assert (ends["conv1_1"], ends["pool1"], ends["conv4_3"], ends["pool5"]) == (2, 5, 23, 31)
    assert tw.feature_slice_ends("D", batch_norm=True)["pool5"] == 44  # len(vgg16_bn.features)


def test_names_parse_to_version_and_family():
    assert tw.parse_version("vgg16_bn") == ("D", True)
    assert tw.parse_version("VGG19") == ("E", False)
    assert tw.parse_version("b") == ("B", None)
    assert tw.torchvision_name("A", True) == "vgg11_bn"
    with pytest.raises(ValueError, match="no VGG of configuration C"):
        tw.parse_version("C")


@pytest.mark.parametrize("version,batch_norm", [
    ("A", False), ("B", False), ("D", False), ("E", False),
    ("A", True), ("B", True), ("D", True), ("E", True)])
def test_conversion_reproduces_the_torchvision_forward_pass(version, batch_norm):
    # 64x64 input: a 2x2 final map, so FC6's NCHW-flatten permutation is exercised.
    sd = reference.state_dict(version, image_size=64, seed=ord(version), batch_norm=batch_norm)
    options = tw.infer_model_options(sd, version)
    assert options == {"num_classes": reference.NUM_CLASSES,
                       "width_divisor": reference.WIDTH_DIVISOR,
                       "fc_features": reference.FC_FEATURES, "image_size": 64,
                       "batch_norm": batch_norm}
    variables = tw.from_torchvision(sd, tw.torchvision_name(version, batch_norm))
    model = create_model(version, **options)
    images = np.random.default_rng(1).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
    # Every named activation (torchvision's features[:k] outputs) and the logits at once.
    ours = model.apply(variables, jnp.asarray(images), outputs=model.feature_names)
    expected = reference.forward(sd, version, images, batch_norm=batch_norm)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        scale = np.abs(value).max()
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)
    # The converted variables fill the model's tree exactly.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
    # And back: the same state dict (num_batches_tracked, which we do not keep, is 0).
    back = tw.to_torchvision(variables, version)
    assert list(back) == list(sd)
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].dtype == np.int64 and back[key] == 0
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_full_size_state_dict_gives_torchvisions_model():
    # Zero-copy broadcast arrays with vgg16's real shapes (no 528 MB allocation).
    for batch_norm, count in ((False, 138_357_544), (True, 138_365_992)):
        shapes = {k: v.shape for k, v in reference.state_dict(
            "D", 224, width_divisor=1, fc_features=8, num_classes=8,
            batch_norm=batch_norm).items() if not k.startswith("classifier")}
        shapes.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                       "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                       "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)})
        sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        assert tw.infer_model_options(sd, "vgg16") == {
            "num_classes": 1000, "width_divisor": 1, "fc_features": 4096, "image_size": 224,
            "batch_norm": batch_norm}
        learned = [k for k in shapes if not k.endswith(("running_mean", "running_var",
                                                        "num_batches_tracked"))]
        assert sum(int(np.prod(shapes[k])) for k in learned) == count


def test_bad_state_dicts_are_clear_errors():
    sd = reference.state_dict("B")
    with pytest.raises(ValueError, match="features.3.weight' missing.*vgg11"):
        tw.from_torchvision(sd, "A")  # vgg13 weights read as vgg11
    broken = dict(sd, **{"classifier.3.weight": np.zeros((5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"classifier.3.weight has shape \(5, 5\)"):
        tw.from_torchvision(broken, "B")
    missing = {k: v for k, v in sd.items() if k != "features.7.bias"}
    with pytest.raises(ValueError, match="features.7.bias.*missing"):
        tw.from_torchvision(missing, "B")
    with pytest.raises(ValueError, match="no VGG of configuration C"):
        tw.from_torchvision(sd, "C")
    # The wrong family, either way: one sentence naming the setting that fixes it.
    with pytest.raises(ValueError, match=r"^The state dict has no batch norm .* but vgg13_bn "
                       r"was asked for; it is a vgg13: pass --config.model.batch_norm=False "
                       r"\(or name the net vgg13\)\.$"):
        tw.from_torchvision(sd, "vgg13_bn")
    bn_sd = reference.state_dict("B", batch_norm=True)
    with pytest.raises(ValueError, match=r"has batch norm \(features.1.running_mean\) but "
                       r"vgg13 was asked for; it is a vgg13_bn: pass --config.model.batch_norm=True"):
        tw.from_torchvision(bn_sd, "B", batch_norm=False)
    with pytest.raises(ValueError, match="has 10 classes .* but the net asked for has 1000; "
                       "pass --config.model.num_classes=10"):
        tw.from_torchvision(sd, "B", num_classes=1000)
    with pytest.raises(ValueError, match="disagree"):
        tw.from_torchvision(sd, "vgg13", batch_norm=True)
    # A letter says nothing about batch norm: the state dict decides.
    assert "batch_stats" in tw.from_torchvision(bn_sd, "B")
    # Wrapper prefixes and nesting are accepted.
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    assert tw.from_torchvision(wrapped, "vgg13")["params"].keys() == \
        tw.from_torchvision(sd, "B")["params"].keys()


def test_our_variables_go_to_torchvision_and_back_unchanged():
    model = create_model("B", num_classes=7, batch_norm=True, image_size=64, width_divisor=16,
                         fc_features=16)
    # Random values in the model's own tree (running statistics included).
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.uniform(0.5, 2, s.shape).astype(np.float32),
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    sd = tw.to_torchvision(variables, "vgg13_bn")
    assert len(sd) == 10 * (2 + 5) + 3 * 2  # conv weight, bias and 5 BN keys; 3 FC layers
    assert tw.infer_model_options(sd, "B") == {
        "num_classes": 7, "width_divisor": 16, "fc_features": 16, "image_size": 64,
        "batch_norm": True}
    jax.tree.map(np.testing.assert_array_equal, tw.from_torchvision(sd, "vgg13_bn"), variables)

    with pytest.raises(ValueError, match="have batch norm but vgg13 was asked for; use "
                       "version='vgg13_bn'"):
        tw.to_torchvision(variables, "vgg13")
    with pytest.raises(ValueError, match="batch_stats"):
        tw.to_torchvision({"params": variables["params"]}, "B")
    with pytest.raises(ValueError, match="no VGG of configuration C"):
        tw.to_torchvision(variables, "C")
    with pytest.raises(ValueError, match=r"layers \['conv1_2', .*is the version right"):
        tw.to_torchvision(variables, "vgg11_bn")


# ---------------------------------------------------------------------------------------
# Against torchvision itself (skipped without torch): its random-init nets in eval mode,
# batch-norm statistics set away from their initial values. fp32 on both sides.
# ---------------------------------------------------------------------------------------


def _torchvision_net(name, num_classes=10, seed=0):
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _images(n, height, width, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, height, width, 3)).astype(np.float32)


def _torch_run(module, images_nhwc):
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


@needs_torch
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg16_bn"])
def test_torchvision_logits_and_features_equal_ours(name):
    net = _torchvision_net(name)
    variables = tw.from_torchvision(net.state_dict(), name)
    version, batch_norm = tw.parse_version(name)
    model = create_model(version, num_classes=10, batch_norm=batch_norm)
    images = _images(2, 224, 224)
    np.testing.assert_allclose(model.apply(variables, images), _torch_run(net, images),
                               rtol=1e-4, atol=1e-4)
    # features[:k] on another image size, for every named activation.
    small = _images(1, 64, 96, seed=1)
    ours = model.apply(variables, small, outputs=model.feature_names[:-3])
    for feature, end in tw.feature_slice_ends(version, batch_norm).items():
        expected = _torch_run(net.features[:end], small)
        np.testing.assert_allclose(ours[feature], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=feature)


@needs_torch
@pytest.mark.parametrize("version,batch_norm", [("A", False), ("D", True)])
def test_our_weights_load_into_torchvision_strictly(version, batch_norm):
    import torch
    import torchvision

    model = create_model(version, num_classes=10, batch_norm=batch_norm)
    variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    if batch_norm:
        variables["batch_stats"] = jax.tree.map(
            lambda v: np.random.default_rng(v.size).uniform(0.5, 2, v.shape).astype(np.float32),
            variables["batch_stats"])
    name = tw.torchvision_name(version, batch_norm)
    net = getattr(torchvision.models, name)(weights=None, num_classes=10)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in
                         tw.to_torchvision(variables, name).items()}, strict=True)
    images = _images(2, 224, 224, seed=2)
    np.testing.assert_allclose(_torch_run(net.eval(), images), model.apply(variables, images),
                               rtol=1e-4, atol=1e-4)


@needs_torch
def test_batch_norm_training_update_matches_pytorch():
    import torch

    net = _torchvision_net("vgg11_bn").train()
    variables = tw.from_torchvision(net.state_dict(), "vgg11_bn")
    model = create_model("A", num_classes=10, batch_norm=True, dropout_rate=0.0)
    images = _images(4, 224, 224, seed=3)
    with torch.no_grad():
        net.features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    _, updates = model.apply(variables, images, train=True, outputs=("pool5",),
                             mutable=["batch_stats"])
    after = tw.to_torchvision({"params": variables["params"], **updates}, "vgg11_bn")
    torch_after = net.state_dict()
    for name, index in tw.feature_indices("A", batch_norm=True).items():
        key = f"features.{index + 1}"
        height = 224 >> int(name[4]) - 1  # conv{b}_*: 224 / 2^(b-1)
        n = 4 * height * height
        np.testing.assert_allclose(after[f"{key}.running_mean"],
                                   torch_after[f"{key}.running_mean"].numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
        # PyTorch's running variance takes the unbiased batch variance, flax the biased.
        batch_var_ours = (after[f"{key}.running_var"] - 0.9 * variables["batch_stats"][
            name + "_bn"]["var"]) / 0.1
        batch_var_torch = (torch_after[f"{key}.running_var"].numpy() - 0.9 * variables[
            "batch_stats"][name + "_bn"]["var"]) / 0.1
        np.testing.assert_allclose(batch_var_ours * n / (n - 1), batch_var_torch, rtol=1e-3,
                                   err_msg=name)
