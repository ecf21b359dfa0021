"""The six nets of Table 1: exact sizes, shapes, LRN, dropout and initialisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vgg_a
from vgg_jax.models import (
    VERSIONS,
    count_parameters,
    create_model,
    create_model_from_config,
    local_response_norm,
)

# Exact parameter counts with a 1000-class head (the paper's Table 2, torchvision agrees).
PAPER_PARAMETER_COUNTS = {
    "A": 132_863_336,
    "A_LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
# Weight layers per configuration (Table 1).
WEIGHT_LAYERS = {"A": 11, "A_LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}

SMALL = dict(image_size=32, width_divisor=16, fc_features=32)


@pytest.mark.parametrize("version", VERSIONS)
def test_parameter_count_matches_paper(version):
    assert count_parameters(create_model(version)) == PAPER_PARAMETER_COUNTS[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_weight_layers_and_output_shape_at_small_width(version):
    model = create_model(version, num_classes=10, **SMALL)
    images = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    assert len(variables["params"]) == WEIGHT_LAYERS[version]
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_names_are_case_insensitive_and_unknown_names_fail():
    assert create_model("a-lrn", **SMALL).use_lrn
    assert create_model("a_lrn", **SMALL).use_lrn
    assert not create_model("a", **SMALL).use_lrn
    with pytest.raises(ValueError, match="valid versions are A, A_LRN, B, C, D, E"):
        create_model("F")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("A", image_size=100)
    with pytest.raises(ValueError, match="Unknown VGG option"):
        create_model("A", widht_divisor=2)


def test_config_c_has_three_1x1_convolutions():
    model = create_model("C", **SMALL)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
    kernels = {name: layer["kernel"].shape for name, layer in params["params"].items()}
    one_by_one = sorted(name for name, shape in kernels.items()
                        if name.startswith("conv") and shape[:2] == (1, 1))
    assert one_by_one == ["conv3_3", "conv4_3", "conv5_3"]


def _numpy_lrn(x, size, alpha, beta, k):
    channels = x.shape[-1]
    out = np.empty_like(x)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + size // 2 + 1)
        out[..., c] = x[..., c] / (k + alpha * np.sum(x[..., lo:hi] ** 2, axis=-1)) ** beta
    return out


def test_lrn_matches_the_alexnet_formula():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 11)).astype(np.float32) * 30
    expected = _numpy_lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0)
    got = local_response_norm(jnp.asarray(x), size=5, alpha=1e-4, beta=0.75, k=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lrn_is_the_only_difference_between_a_and_a_lrn():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) * 50
    plain, with_lrn = create_model("A", **SMALL), create_model("A_LRN", **SMALL)
    variables = plain.init(jax.random.key(0), images)
    # Same parameter tree: LRN has none.
    assert jax.tree.structure(variables) == jax.tree.structure(
        with_lrn.init(jax.random.key(0), images))
    assert not np.allclose(plain.apply(variables, images), with_lrn.apply(variables, images))
    # With alpha = 0 and k = 1 the normalisation is the identity, and the nets agree.
    identity_lrn = create_model("A_LRN", lrn_alpha=0.0, lrn_k=1.0, **SMALL)
    np.testing.assert_allclose(
        identity_lrn.apply(variables, images), plain.apply(variables, images), rtol=1e-6)


def test_dropout_only_in_training():
    model = create_model("A", num_classes=10, **SMALL)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    eval_a = model.apply(variables, images, train=False)
    eval_b = model.apply(variables, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    no_dropout = create_model("A", num_classes=10, dropout_rate=0.0, **SMALL)
    np.testing.assert_allclose(
        no_dropout.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)}),
        eval_a, rtol=1e-6)


def test_initialisers():
    images = jnp.ones((1, 64, 64, 3))
    glorot = create_model("A", image_size=64, width_divisor=4, fc_features=64)
    params = glorot.init(jax.random.key(0), images)["params"]
    for layer in params.values():
        np.testing.assert_array_equal(layer["bias"], 0.0)
    # Glorot-uniform bound sqrt(6 / (fan_in + fan_out)); FC6 keeps a dense layer's fans.
    fc6 = params["fc6"]["kernel"]
    fan_in, fan_out = np.prod(fc6.shape[:3]), fc6.shape[3]
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(fc6).max() <= bound and np.abs(fc6).max() > 0.9 * bound
    conv = params["conv3_1"]["kernel"]
    conv_bound = np.sqrt(6.0 / (9 * conv.shape[2] + 9 * conv.shape[3]))
    assert np.abs(conv).max() <= conv_bound and np.abs(conv).max() > 0.9 * conv_bound

    normal = create_model("A", image_size=64, width_divisor=4, fc_features=64,
                          initializer="normal", normal_init_stddev=0.1)
    fc6 = normal.init(jax.random.key(0), images)["params"]["fc6"]["kernel"]
    assert abs(float(np.std(fc6)) - 0.1) < 0.005 and abs(float(np.mean(fc6))) < 0.005


def test_bfloat16_compute_keeps_float32_parameters():
    model = create_model("A", num_classes=10, dtype=jnp.bfloat16, **SMALL)
    images = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert model.apply(variables, images).dtype == jnp.float32


def test_dense_view_shares_parameters_and_matches_crop_at_training_size():
    model = create_model("A", num_classes=10, image_size=64, width_divisor=16, fc_features=32)
    images = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
    variables = model.init(jax.random.key(0), images)
    crop_logits = model.apply(variables, images)
    dense_map = model.apply(variables, images, dense=True)
    assert dense_map.shape == (2, 1, 1, 10)
    np.testing.assert_allclose(dense_map[:, 0, 0], crop_logits, rtol=1e-5, atol=1e-5)
    # A 128x160 image gives a (128/32 - 2 + 1) x (160/32 - 2 + 1) score map.
    big = jnp.ones((1, 128, 160, 3))
    assert model.apply(variables, big, dense=True).shape == (1, 3, 4, 10)
    with pytest.raises(ValueError, match="dense=True"):
        model.apply(variables, big)


# torchvision's vgg11_bn ... vgg19_bn: the plain count plus a scale and a bias per conv
# channel (its model documentation agrees).
BATCH_NORM_PARAMETER_COUNTS = {
    "A": 132_868_840, "B": 133_053_736, "D": 138_365_992, "E": 143_678_248}


@pytest.mark.parametrize("version", sorted(BATCH_NORM_PARAMETER_COUNTS))
def test_batch_norm_parameter_count_matches_torchvision(version):
    model = create_model(version, batch_norm=True)
    assert count_parameters(model) == BATCH_NORM_PARAMETER_COUNTS[version]


def _conv_same(x, layer):
    return jax.lax.conv_general_dilated(
        x, layer["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer["bias"]


def test_batch_norm_follows_torchvision_and_updates_like_pytorch():
    model = create_model("A", num_classes=10, batch_norm=True, **SMALL)
    images = jax.random.normal(jax.random.key(1), (6, 32, 32, 3)) * 3 + 1
    variables = model.init(jax.random.key(0), images)
    # A BatchNorm after every conv, named after it, with parameters and running statistics.
    convs = [name for name in variables["params"] if name.startswith("conv")
             and not name.endswith("_bn")]
    assert sorted(variables["batch_stats"]) == sorted(f"{c}_bn" for c in convs)
    assert set(variables["params"]) == set(convs) | {f"{c}_bn" for c in convs} | {
        "fc6", "fc7", "fc8"}
    assert (model.bn_momentum, model.bn_epsilon) == (0.9, 1e-5)  # PyTorch's 0.1 and 1e-5

    # Training: normalised by the batch's own statistics (biased variance); the running
    # ones move a tenth of the way towards them, as PyTorch's momentum 0.1 does.
    stats = {"mean": jnp.full((4,), 0.5), "var": jnp.full((4,), 2.0)}
    variables = {"params": variables["params"],
                 "batch_stats": dict(variables["batch_stats"], conv1_1_bn=stats)}
    pre = np.asarray(_conv_same(images, variables["params"]["conv1_1"]), np.float64)
    batch_mean, batch_var = pre.mean(axis=(0, 1, 2)), pre.var(axis=(0, 1, 2))
    bn = variables["params"]["conv1_1_bn"]
    out, updates = model.apply(variables, images, train=True, outputs=("conv1_1",),
                               mutable=["batch_stats"])
    expected = np.maximum((pre - batch_mean) / np.sqrt(batch_var + 1e-5) * bn["scale"]
                          + bn["bias"], 0)
    np.testing.assert_allclose(out["conv1_1"], expected, rtol=1e-4, atol=1e-4)
    new = updates["batch_stats"]["conv1_1_bn"]
    np.testing.assert_allclose(new["mean"], 0.9 * 0.5 + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * 2.0 + 0.1 * batch_var, rtol=1e-5)

    # Examples outside the mask do not count in the statistics.
    mask = jnp.array([True, True, True, False, False, False])
    _, masked = model.apply(variables, images, train=True, outputs=("conv1_1",), mask=mask,
                            mutable=["batch_stats"])
    _, first_three = model.apply(variables, images[:3], train=True, outputs=("conv1_1",),
                                 mutable=["batch_stats"])
    np.testing.assert_allclose(masked["batch_stats"]["conv1_1_bn"]["var"],
                               first_three["batch_stats"]["conv1_1_bn"]["var"], rtol=1e-5)

    # Evaluation: the running statistics, so each image's output is its own.
    evaluated = model.apply(variables, images, outputs=("conv1_1",))["conv1_1"]
    expected = np.maximum((pre - 0.5) / np.sqrt(2.0 + 1e-5) * bn["scale"] + bn["bias"], 0)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-4, atol=1e-4)
    logits = model.apply(variables, images)
    np.testing.assert_allclose(model.apply(variables, images[:2]), logits[:2], rtol=1e-5,
                               atol=1e-6)


def _count_convolutions(fn, *args):
    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == "conv_general_dilated"
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None:
                    total += count(getattr(inner, "jaxpr", inner))
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_named_outputs_compute_nothing_after_the_last_asked():
    model = create_model("D", num_classes=10, batch_norm=True, **SMALL)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    assert model.feature_names == (
        "conv1_1", "conv1_2", "pool1", "conv2_1", "conv2_2", "pool2", "conv3_1", "conv3_2",
        "conv3_3", "pool3", "conv4_1", "conv4_2", "conv4_3", "pool4", "conv5_1", "conv5_2",
        "conv5_3", "pool5", "fc6", "fc7", "fc8")
    full = model.apply(variables, images, outputs=model.feature_names)
    np.testing.assert_allclose(full["fc8"], model.apply(variables, images), rtol=1e-6)
    assert full["conv4_3"].shape == (2, 4, 4, 32) and full["pool5"].shape == (2, 1, 1, 32)
    assert full["fc7"].shape == (2, 32) and np.all(full["fc7"] >= 0)  # after the ReLU

    # Asked out of order: returned in the order asked, equal to the full pass's.
    some = model.apply(variables, images, outputs=("conv3_1", "conv1_2"))
    assert list(some) == ["conv3_1", "conv1_2"]
    np.testing.assert_array_equal(some["conv3_1"], full["conv3_1"])

    # Cheap: conv3_1 is the fifth of D's 13 convs + 3 FC convolutions.
    convs = lambda names: _count_convolutions(
        lambda x: model.apply(variables, x, outputs=names), images)
    assert convs(("conv3_1", "conv1_2")) == 5
    assert convs(("pool5",)) == 13
    assert convs(("fc7",)) == 15
    assert _count_convolutions(lambda x: model.apply(variables, x), images) == 16

    with pytest.raises(ValueError, match=r"'conv6_1'.*conv1_1, conv1_2, pool1, .*pool5, fc6"):
        model.apply(variables, images, outputs=("conv4_3", "conv6_1"))
    assert create_model("A_LRN", **SMALL).feature_names[:3] == ("conv1_1", "lrn", "pool1")


def test_trunk_without_head_takes_any_size_and_pools_globally():
    with_head = create_model("B", num_classes=10, **SMALL)
    images = jax.random.normal(jax.random.key(1), (2, 48, 80, 3))
    variables = with_head.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    trunk = create_model("B", include_head=False, **SMALL)
    assert set(trunk.init(jax.random.key(0), images)["params"]) == {
        name for name in variables["params"] if name.startswith("conv")}
    assert "fc6" not in trunk.feature_names
    pool5 = trunk.apply(variables, images)  # the head's parameters are simply unused
    assert pool5.shape == (2, 1, 2, 32)
    np.testing.assert_array_equal(
        pool5, with_head.apply(variables, images, outputs=("pool5",))["pool5"])
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        pooled = create_model("B", include_head=False, pooling=pooling, **SMALL)
        np.testing.assert_allclose(pooled.apply(variables, images),
                                   reduce(np.asarray(pool5), axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="include_head=False"):
        create_model("B", pooling="avg")
    with pytest.raises(ValueError, match="at least 32x32"):
        trunk.apply(variables, jnp.zeros((1, 31, 64, 3)))
    with pytest.raises(ValueError, match="fc6"):
        trunk.apply(variables, images, outputs=("fc6",))


def test_normal_initialiser_default_gives_net_a_trainable_logits():
    """Full-width net A (on 32x32 inputs, to stay cheap) under `initializer=normal`: the
    config's default std keeps the initial logits small; the paper's literal "variance
    1e-2" (std 0.1) stays reachable by override, and blows them up."""
    config = vgg_a.get_config()
    config.model.initializer = "normal"
    config.data.image_size = 32
    images = 50.0 * jax.random.normal(jax.random.key(1), (2, 32, 32, 3))  # mean-subtracted

    def max_logit(stddev):
        config.model.normal_init_stddev = stddev
        model = create_model_from_config(config)
        variables = jax.jit(model.init)(jax.random.key(0), images)
        return float(jnp.max(jnp.abs(model.apply(variables, images))))

    assert max_logit(vgg_a.get_config().model.normal_init_stddev) < 1.0
    assert max_logit(0.1) > 1e4
