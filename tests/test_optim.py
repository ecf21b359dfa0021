"""Tests of the paper's optimiser and plateau schedule (vgg_jax/training/optim.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from vgg_jax.training import optim


def train_config(**overrides):
    config = base.get_config().train
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def small_params():
    return {
        "conv1": {"kernel": jnp.full((3, 3, 1, 2), 2.0), "bias": jnp.full((2,), 3.0)},
        "fc": {"kernel": jnp.full((2, 4), -1.0), "bias": jnp.full((4,), 5.0)},
    }


# --- Optimiser -------------------------------------------------------------------------


@pytest.mark.parametrize("decay_biases", [False, True])
def test_weight_decay_masks_biases(decay_biases):
    params = small_params()
    config = train_config(
        learning_rate=1.0, momentum=0.0, weight_decay=0.1, decay_biases=decay_biases
    )
    tx = optim.create_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # With a zero gradient the update is the decay alone: -lr * wd * w.
    for layer in ("conv1", "fc"):
        np.testing.assert_allclose(updates[layer]["kernel"], -0.1 * params[layer]["kernel"])
        expected_bias = -0.1 * params[layer]["bias"] if decay_biases else 0.0
        np.testing.assert_allclose(
            updates[layer]["bias"], expected_bias + 0 * params[layer]["bias"]
        )


def test_decay_mask_by_parameter_name():
    mask = optim.decay_mask(small_params())
    assert mask == {
        "conv1": {"kernel": True, "bias": False},
        "fc": {"kernel": True, "bias": False},
    }


def test_two_steps_on_a_quadratic_match_hand_computed_sgd_momentum_l2():
    lr, momentum, wd = 0.1, 0.9, 0.01
    curvature = np.array([1.0, 3.0, 0.5])
    w0 = np.array([1.0, -2.0, 4.0])

    def loss(w):
        return 0.5 * jnp.sum(curvature * w**2)

    config = train_config(learning_rate=lr, momentum=momentum, weight_decay=wd)
    tx = optim.create_optimizer(config)
    params = jnp.asarray(w0, jnp.float32)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)

    # By hand, float64: v <- m v + (grad + wd w); w <- w - lr v.
    w, v = w0.copy(), np.zeros_like(w0)
    for _ in range(2):
        v = momentum * v + (curvature * w + wd * w)
        w = w - lr * v
    np.testing.assert_allclose(params, w, rtol=1e-6)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_accumulation_equals_one_step_on_the_whole_batch(clip_norm):
    k, micro_batch, features, outputs = 4, 3, 5, 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(k * micro_batch, features)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(k * micro_batch, outputs)), jnp.float32)
    params0 = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(features, outputs)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(outputs,)), jnp.float32),
        }
    }

    def loss(params, xb, yb):
        prediction = xb @ params["dense"]["kernel"] + params["dense"]["bias"]
        return jnp.mean((prediction - yb) ** 2)

    common = {"learning_rate": 0.05, "decay_biases": False, "grad_clip_norm": clip_norm}
    big_tx = optim.create_optimizer(train_config(grad_accum_steps=1, **common))
    acc_tx = optim.create_optimizer(train_config(grad_accum_steps=k, **common))

    # jit only to keep the test fast: eager dispatch of the optax chain is slow on CPU.
    big_update, acc_update = jax.jit(big_tx.update), jax.jit(acc_tx.update)
    grad_fn = jax.jit(jax.grad(loss))
    big_params, big_state = params0, big_tx.init(params0)
    acc_params, acc_state = params0, acc_tx.init(params0)
    for _ in range(2):  # two optimiser steps, so momentum is exercised too
        grads = grad_fn(big_params, x, y)
        updates, big_state = big_update(grads, big_state, big_params)
        big_params = optax.apply_updates(big_params, updates)
        for i in range(k):
            before = acc_params
            micro = slice(i * micro_batch, (i + 1) * micro_batch)
            xb, yb = x[micro], y[micro]
            grads = grad_fn(acc_params, xb, yb)
            updates, acc_state = acc_update(grads, acc_state, acc_params)
            acc_params = optax.apply_updates(acc_params, updates)
            if i < k - 1:  # parameters move only on the k-th micro-step
                jax.tree.map(np.testing.assert_array_equal, acc_params, before)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            acc_params,
            big_params,
        )


def test_clipping_bounds_the_update():
    clip = 0.5
    config = train_config(learning_rate=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=clip)
    tx = optim.create_optimizer(config)
    params = small_params()
    state = tx.init(params)
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e3), params)
    updates, _ = tx.update(huge, state, params)
    assert float(optax.tree.norm(updates)) == pytest.approx(clip, rel=1e-5)
    small = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    updates, _ = tx.update(small, state, params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, small)


@pytest.mark.parametrize("accum", [1, 3])
def test_set_learning_rate_changes_the_rate_without_retracing(accum):
    config = train_config(learning_rate=0.1, momentum=0.0, weight_decay=0.0, grad_accum_steps=accum)
    tx = optim.create_optimizer(config)
    params = small_params()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    # As the train step will hold it: the whole state replicated over a device mesh.
    state = jax.device_put(tx.init(params), replicated)
    grads = jax.tree.map(jnp.ones_like, params)
    traces = []

    @jax.jit
    def step(opt_state, params):
        traces.append(1)
        return tx.update(grads, opt_state, params)

    assert float(optim.get_learning_rate(state)) == pytest.approx(0.1)
    for _ in range(accum):
        updates, state = step(state, params)
    np.testing.assert_allclose(updates["fc"]["kernel"], -0.1, rtol=1e-6)

    new_state = optim.set_learning_rate(state, 1e-3)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
        assert (old.shape, old.dtype, old.weak_type, old.sharding) == (
            new.shape,
            new.dtype,
            new.weak_type,
            new.sharding,
        )
    assert float(optim.get_learning_rate(new_state)) == pytest.approx(1e-3)
    assert float(optim.get_learning_rate(state)) == pytest.approx(0.1)  # not mutated
    for _ in range(accum):
        updates, new_state = step(new_state, params)
    np.testing.assert_allclose(updates["fc"]["kernel"], -1e-3, rtol=1e-6)
    assert len(traces) == 1


def test_bad_optimiser_config_is_rejected_by_name():
    with pytest.raises(ValueError, match="config.train.grad_clip_norm"):
        optim.check_config(train_config(grad_clip_norm=-1.0))


# --- Plateau schedule ------------------------------------------------------------------


def run_plateau(metrics, **overrides):
    config = train_config(**overrides)
    state = optim.plateau_init(config)
    decisions = []
    for metric in metrics:
        state, decision = optim.plateau_update(state, metric, config)
        decisions.append(decision)
    return state, decisions


def cut_indices(decisions):
    return [i for i, d in enumerate(decisions) if d.reduced]


def test_cuts_after_patience_evaluations_without_improvement_and_only_then():
    # patience 2: the 2nd consecutive evaluation that does not improve triggers the cut.
    errors = [0.9, 0.8, 0.7, 0.75, 0.7, 0.6, 0.65, 0.5, 0.55, 0.6, 0.4, 0.45]
    _, decisions = run_plateau(errors, plateau_patience=2, plateau_threshold=1e-3)
    assert cut_indices(decisions) == [4, 9]
    assert [d.num_reductions for d in decisions] == [0] * 4 + [1] * 5 + [2] * 3
    assert decisions[-1].lr_scale == pytest.approx(0.01)
    assert not any(d.should_stop for d in decisions)


def test_patience_one_cuts_at_the_first_stall():
    _, decisions = run_plateau([0.5, 0.4, 0.45, 0.3, 0.3], plateau_patience=1)
    assert cut_indices(decisions) == [2, 4]


def test_at_most_max_reductions_then_stop_when_the_last_cut_stalls():
    errors = [0.5] + [0.5] * 20
    _, decisions = run_plateau(errors, plateau_patience=3, plateau_max_reductions=3)
    assert cut_indices(decisions) == [3, 6, 9]
    stop = [i for i, d in enumerate(decisions) if d.should_stop]
    assert stop[0] == 12 and stop == list(range(12, 21))  # sticky once set
    assert decisions[-1].num_reductions == 3
    assert decisions[-1].lr_scale == pytest.approx(1e-3)


def test_improvement_after_the_last_cut_postpones_the_stop():
    errors = [0.5, 0.5, 0.5, 0.4, 0.4, 0.4]
    _, decisions = run_plateau(errors, plateau_patience=2, plateau_max_reductions=1)
    assert cut_indices(decisions) == [2]
    assert [d.should_stop for d in decisions] == [False] * 5 + [True]


def test_relative_threshold_is_respected():
    # best 0.4, threshold 10%: an improvement needs < 0.36, so 0.37 and 0.365 are stalls.
    # Then best 0.35: 0.33 and 0.32 are not < 0.315, another cut.
    errors = [0.4, 0.37, 0.365, 0.35, 0.33, 0.32]
    _, decisions = run_plateau(errors, plateau_patience=2, plateau_threshold=0.1)
    assert cut_indices(decisions) == [2, 5]
    assert decisions[3].best_metric == pytest.approx(0.35)
    assert decisions[5].best_metric == pytest.approx(0.35)
    # With a 1e-3 threshold every one of them improves.
    _, decisions = run_plateau(errors[:2] + [0.36, 0.35, 0.33, 0.32], plateau_patience=2)
    assert cut_indices(decisions) == []


def test_nan_counts_as_no_improvement():
    _, decisions = run_plateau([0.5, float("nan"), float("nan")], plateau_patience=2)
    assert cut_indices(decisions) == [2]


def test_state_round_trips_through_json():
    config = train_config(plateau_patience=2)
    errors = [0.5, 0.4, 0.45, 0.45, 0.3, 0.35, 0.35, 0.4, 0.4]
    state = optim.plateau_init(config)
    assert optim.PlateauState.from_json(json.loads(json.dumps(state.to_json()))) == state
    for metric in errors[:4]:
        state, _ = optim.plateau_update(state, metric, config)
    # As the checkpoint stores it: JSON text in the run state's metadata.
    restored = optim.PlateauState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state
    assert optim.plateau_lr_scale(restored, config) == pytest.approx(0.1)
    a, b = state, restored
    for metric in errors[4:]:
        a, decision_a = optim.plateau_update(a, metric, config)
        b, decision_b = optim.plateau_update(b, metric, config)
        assert decision_a == decision_b
    assert decision_a.num_reductions == 3


def test_each_decision_is_explained_in_one_line():
    config = train_config(plateau_patience=2, plateau_max_reductions=1, learning_rate=0.01)
    _, decisions = run_plateau([0.5, 0.5, 0.5, 0.5, 0.5], plateau_patience=2,
                               plateau_max_reductions=1, learning_rate=0.01)
    lines = [optim.explain(d, config) for d in decisions]
    assert lines[0] == "Plateau rule: val/top1_error 0.5 is the best so far."
    assert "for 1 validation (it cuts at 2)" in lines[1]
    assert lines[2].endswith("learning rate cut to 1.00e-03 (cut 1 of 1).")
    assert "not improved on its best, 0.5, by 0.001 (relative) for 2 validations" in lines[2]
    assert lines[4].endswith("with no learning-rate cut left (1 made, "
                             "config.train.plateau_max_reductions=1): training stops here.")
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize("patience", [0, -1])
def test_bad_patience_is_rejected_naming_the_field(patience):
    with pytest.raises(ValueError, match="config.train.plateau_patience"):
        optim.check_config(train_config(plateau_patience=patience))


def test_bad_plateau_fields_are_rejected():
    with pytest.raises(ValueError, match="plateau_factor"):
        optim.check_config(train_config(plateau_factor=1.0))
    with pytest.raises(ValueError, match="plateau_threshold"):
        optim.check_config(train_config(plateau_threshold=0.0))
    with pytest.raises(ValueError, match="plateau_monitor"):
        optim.check_config(train_config(plateau_monitor="val/top1_accuracy"))


def test_monitored_metric():
    config = train_config(plateau_monitor="val/top1_error")
    assert optim.monitored_metric({"val/top1_error": np.float32(0.25)}, config) == 0.25
    with pytest.raises(KeyError, match="plateau_monitor"):
        optim.monitored_metric({"val/loss": 1.0}, config)
