"""The six nets of Table 1: exact sizes, shapes, LRN, dropout and initialisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax.models import VERSIONS, count_parameters, create_model, local_response_norm

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
