"""The paper's optimiser (section 3.1) and its learning-rate plateau schedule.

Optimiser: mini-batch SGD with momentum 0.9 and an L2 penalty of 5e-4, the penalty
coupled to the gradient (its gradient `weight_decay * w` is added before the momentum,
as an L2 term in the loss would be), optionally with global-norm clipping and gradient
accumulation. The learning rate lives in the optimiser state
(`optax.inject_hyperparams`), so the host can change it between steps without the
jit-compiled train step being traced again.

Schedule: the paper divided the learning rate by 10 when the validation accuracy stopped
improving, three times in total. `plateau_init` / `plateau_update` state that rule in plain
Python, run on the host once per validation (its state is a few numbers, saved with the
run state); the host then pushes the new rate into the optimiser state with
`set_learning_rate`, and `explain` says in one line what the rule decided and why.

Typical use in a training loop:

    tx = create_optimizer(config.train)
    opt_state = tx.init(params)
    plateau = plateau_init(config.train)       # saved with the run state
    ...
    # after each validation:
    plateau, decision = plateau_update(plateau, val_metrics[config.train.plateau_monitor],
                                       config.train)
    if decision.reduced:
        opt_state = set_learning_rate(opt_state,
                                      config.train.learning_rate * decision.lr_scale)
    if decision.should_stop:
        ...  # the paper's stopping point: save and end training
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vgg_jax import metric_names
from vgg_jax.config_values import require

# Name of the hyperparameter that `optax.inject_hyperparams` keeps in the optimiser state.
_LEARNING_RATE = "learning_rate"
# The field of `optax.MultiStepsState` that counts the micro-batches of the step in progress.
_MICRO_BATCH_INDEX = "mini_step"


# --------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------


def decay_mask(params: Any) -> Any:
    """Marks the parameters the L2 penalty applies to when biases are exempt.

    Flax layers name their parameters {'kernel', 'bias'}; every leaf whose own name is
    'bias' is excluded, everything else is decayed.

    Args:
      params: a parameter pytree (nested dicts as made by flax, or any pytree).

    Returns:
      A pytree of Python bools with the structure of `params`: True = decayed.
    """

    def is_decayed(path, _leaf) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return name != "bias"

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def check_config(train_config: ml_collections.ConfigDict) -> None:
    """The rules of config.train's optimiser and plateau fields: values the optimiser or
    the plateau schedule cannot use fail before any work (`validate_config` runs this).

    Args:
      train_config: `config.train`.

    Raises:
      ConfigError: one sentence naming the first bad field and its valid range.
    """
    t = train_config
    require(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate} must be positive.")
    require(0 <= t.momentum < 1, f"config.train.momentum={t.momentum} must be in [0, 1).")
    require(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay} must be >= 0.")
    require(t.grad_clip_norm >= 0, f"config.train.grad_clip_norm={t.grad_clip_norm} must be "
            ">= 0 (0 disables clipping).")
    _check_plateau_config(train_config)


# Labels of `optax.multi_transform`: trained parameter groups get the paper's chain.
_TRAINED, _FROZEN = "trained", "frozen"


def freeze(tx: optax.GradientTransformation, frozen: Collection[str]
           ) -> optax.GradientTransformation:
    """Zero updates for the frozen parameter groups, `tx` for the others.

    Built with `optax.multi_transform`: the frozen groups go to `optax.set_to_zero()`, so
    no part of `tx` sees them. Weight decay cannot move them, clipping measures only the
    trained gradients, and `tx` keeps no momentum buffers for them (its state holds
    `optax.MaskedNode`s there): freezing costs no optimiser memory.

    Args:
      tx: the optimiser of the trained parameters.
      frozen: top-level keys of the parameter tree to keep fixed (e.g. "conv1_1",
        "conv1_1_bn"); empty returns `tx` itself.

    Returns:
      The combined transformation.
    """
    if not frozen:
        return tx
    frozen = frozenset(frozen)

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: _FROZEN if n in frozen else _TRAINED, group)
                for name, group in params.items()}

    return optax.multi_transform({_TRAINED: tx, _FROZEN: optax.set_to_zero()}, labels)


def create_optimizer(train_config: ml_collections.ConfigDict,
                     frozen: Collection[str] = ()) -> optax.GradientTransformation:
    """Builds the paper's optimiser from `config.train`.

    The chain applied to the (mean) gradient of each optimiser step is:
      1. global-norm clipping to `grad_clip_norm` (only if > 0), on the loss gradient
         alone, so the clip never fights the weight decay;
      2. + `weight_decay` * params (the paper's L2 penalty; biases included or not by
         `decay_biases`);
      3. SGD with heavy-ball momentum `momentum` (PyTorch/Caffe form: v = m*v + g,
         update = -lr * v) at `learning_rate`, the latter held in the optimiser state.

    With `grad_accum_steps` = k > 1 the chain is wrapped in `optax.MultiSteps`: the train
    step is then called with micro-batches of batch_size / k images, the gradients of k
    consecutive calls are averaged, and the parameters change only on every k-th call
    (the other calls return zero updates). With a loss that is a batch mean, k calls
    equal one step on the whole batch (dropout aside).

    Fine-tuning: the parameter groups in `frozen` get zero updates (`freeze`).

    Args:
      train_config: `config.train`; reads learning_rate, momentum, weight_decay,
        decay_biases, grad_clip_norm and grad_accum_steps.
      frozen: top-level parameter keys to keep fixed (the model's `frozen_parameters`).

    Returns:
      An optax.GradientTransformation; `get_learning_rate` / `set_learning_rate` read and
      change the learning rate in its state (fields checked by `check_config`).
    """
    momentum = float(train_config.momentum)
    weight_decay = float(train_config.weight_decay)
    clip_norm = float(train_config.grad_clip_norm)
    mask = None if train_config.decay_biases else decay_mask

    def paper_sgd(learning_rate):
        transforms = []
        if clip_norm > 0:
            transforms.append(optax.clip_by_global_norm(clip_norm))
        if weight_decay > 0:
            transforms.append(optax.add_decayed_weights(weight_decay, mask=mask))
        # momentum=None (not 0) when disabled keeps optax from allocating a trace buffer.
        transforms.append(optax.sgd(learning_rate, momentum=momentum or None))
        return optax.chain(*transforms)

    # Only the learning rate becomes state; float32 so that the state's dtypes never
    # depend on the parameters' dtype (a bfloat16 lr would round 1e-2 to 0.010009765625).
    tx = optax.inject_hyperparams(paper_sgd, hyperparam_dtype=jnp.float32)(
        learning_rate=float(train_config.learning_rate)
    )
    tx = freeze(tx, frozen)
    accum_steps = int(train_config.grad_accum_steps)
    if accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum_steps).gradient_transformation()
    return tx


def get_learning_rate(opt_state: Any) -> jax.Array:
    """Reads the learning rate the next optimiser step will use.

    Args:
      opt_state: the state of `create_optimizer(...)`, with or without gradient
        accumulation (MultiSteps), possibly nested inside a larger pytree.

    Returns:
      The learning rate, a float32 scalar array (on device: `float()` it to log it).

    Raises:
      ValueError: if the state holds no learning rate (not from `create_optimizer`).
    """
    # optax finds the inject_hyperparams state wherever it sits (MultiSteps included).
    value = optax.tree_utils.tree_get(opt_state, _LEARNING_RATE)
    if value is None:
        raise ValueError(
            "The optimiser state holds no learning rate; build the optimiser with "
            "vgg_jax.training.optim.create_optimizer.")
    return value


def micro_batch_index(opt_state: Any) -> jax.Array | int:
    """The position, within its optimiser step, of the micro-batch the next update takes.

    Under gradient accumulation (`optax.MultiSteps`) one optimiser step takes
    `grad_accum_steps` update calls, one per micro-batch; the optimiser state counts them
    (MultiSteps' `mini_step`, back to 0 once the step's last micro-batch is applied).

    Args:
      opt_state: the state of `create_optimizer(...)`.

    Returns:
      0 .. grad_accum_steps - 1 (an int32 array); the int 0 without accumulation.
    """
    value = optax.tree_utils.tree_get(opt_state, _MICRO_BATCH_INDEX)
    return 0 if value is None else value


def _like(reference: Any, value: float) -> Any:
    """`value` as an array with the dtype, weak type and sharding of `reference`.

    Keeping all three identical keeps the jit cache key of the train step unchanged, so
    the step is not traced or compiled again.
    """
    if not isinstance(reference, jax.Array):
        return np.asarray(value, dtype=np.asarray(reference).dtype)
    host = np.asarray(value, dtype=reference.dtype)
    # make_array_from_callback works for any sharding, also one spanning several hosts
    # (each host fills only its own devices; every host passes the same value).
    # (create_optimizer's learning rate is a strongly typed float32, so the new array's
    # weak_type, always False, matches too.)
    return jax.make_array_from_callback(reference.shape, reference.sharding, lambda idx: host[idx])


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
    """Returns `opt_state` with a new learning rate for the following steps.

    Call it on the host between train steps (e.g. after a plateau cut). The returned
    state has the same tree structure, shapes, dtypes and shardings as `opt_state`, so a
    jit-compiled step that takes it is neither retraced nor recompiled. With gradient
    accumulation the new rate applies from the next *optimiser* update (the k-th
    micro-step), whatever micro-step the state is at.

    Args:
      opt_state: the state of `create_optimizer(...)`, with or without MultiSteps,
        possibly nested inside a larger pytree (e.g. a TrainState's opt_state).
      learning_rate: the new absolute learning rate (not a factor).

    Returns:
      A new optimiser state; `opt_state` itself is not modified.
    """
    if not np.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"The learning rate must be finite and >= 0, got {learning_rate}.")
    old = get_learning_rate(opt_state)
    return optax.tree_utils.tree_set(
        opt_state, **{_LEARNING_RATE: _like(old, learning_rate)})


# --------------------------------------------------------------------------------------
# Plateau schedule
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """The plateau rule's state: a few plain numbers, saved with the run state.

    Attributes:
      best: the lowest monitored value so far (inf before the first validation).
      stalled: validations in a row without improvement since the last improvement or cut.
      num_reductions: cuts applied so far (at most plateau_max_reductions).
      should_stop: set once the metric stalled after the last allowed cut; stays set.
    """

    best: float = math.inf
    stalled: int = 0
    num_reductions: int = 0
    should_stop: bool = False

    def to_json(self) -> dict[str, Any]:
        """The state as JSON values (`best` is None before the first validation)."""
        return {"best": None if math.isinf(self.best) else self.best, "stalled": self.stalled,
                "num_reductions": self.num_reductions, "should_stop": self.should_stop}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> PlateauState:
        """The state `to_json` wrote.

        Args:
          values: the dict `to_json` returned (read back from JSON).

        Returns:
          The PlateauState.
        """
        best = values["best"]
        return cls(best=math.inf if best is None else float(best), stalled=int(values["stalled"]),
                   num_reductions=int(values["num_reductions"]),
                   should_stop=bool(values["should_stop"]))


class PlateauDecision(NamedTuple):
    """What one validation means for the learning rate, and why.

    Attributes:
      lr_scale: multiply config.train.learning_rate by this from now on
        (plateau_factor ** num_reductions).
      reduced: True if this validation caused a cut (call `set_learning_rate`).
      num_reductions: cuts so far, this one included.
      should_stop: True once the metric has gone `plateau_patience` validations without
        improvement after the last allowed cut: the paper's end of training.
      best_metric: the best monitored value so far (the reference for improvement).
      metric: this validation's monitored value.
      stalled: validations in a row without improvement, this one included (0 after an
        improvement; `plateau_patience` when it cut or stopped).
    """

    lr_scale: float
    reduced: bool
    num_reductions: int
    should_stop: bool
    best_metric: float
    metric: float
    stalled: int


def _check_plateau_config(train_config: ml_collections.ConfigDict) -> None:
    patience = train_config.plateau_patience
    require(not isinstance(patience, bool) and int(patience) == patience and patience >= 1,
            "config.train.plateau_patience must be an integer >= 1 (the number of consecutive "
            f"validations without improvement before the learning rate is cut); got {patience!r}.")
    require(0 < train_config.plateau_factor < 1,
            f"config.train.plateau_factor must be in (0, 1), got {train_config.plateau_factor}.")
    # At 1 the bar (1 - threshold) * best is 0 * inf = NaN before the first validation,
    # and no validation could ever count as an improvement.
    require(0 < train_config.plateau_threshold < 1,
            "config.train.plateau_threshold (relative improvement needed) must be in (0, 1), "
            f"got {train_config.plateau_threshold}.")
    max_reductions = train_config.plateau_max_reductions
    require(int(max_reductions) == max_reductions and max_reductions >= 0,
            f"config.train.plateau_max_reductions must be an integer >= 0, got {max_reductions!r}.")
    require(train_config.plateau_monitor in metric_names.MONITORABLE,
            f"config.train.plateau_monitor={train_config.plateau_monitor!r} must be one of the "
            f"validation metrics to minimise {metric_names.MONITORABLE} (the paper: "
            "'val/top1_error'): the plateau schedule cuts when it stops decreasing.")


def plateau_init(train_config: ml_collections.ConfigDict) -> PlateauState:
    """Creates the plateau schedule's state for a fresh run.

    Args:
      train_config: `config.train` (the rule's fields are read at each update).

    Returns:
      A PlateauState: no validation seen, no cut.
    """
    del train_config  # the fresh state is the same for every setting
    return PlateauState()


def plateau_lr_scale(state: PlateauState, train_config: ml_collections.ConfigDict) -> float:
    """The learning-rate multiplier implied by `state` (e.g. after restoring a checkpoint).

    Args:
      state: a PlateauState.
      train_config: `config.train`; reads plateau_factor.

    Returns:
      plateau_factor ** (cuts so far).
    """
    return float(train_config.plateau_factor) ** state.num_reductions


def plateau_update(
    state: PlateauState, metric: float, train_config: ml_collections.ConfigDict
) -> tuple[PlateauState, PlateauDecision]:
    """Feeds one validation's monitored metric to the plateau rule.

    The rule (the metric is minimised, e.g. val/top1_error):
      * a validation *improves* if metric < (1 - plateau_threshold) * best, where best is
        the lowest value seen so far (the first validation always improves; a NaN never
        does). An improvement sets best and resets the count of stalled validations;
      * after `plateau_patience` consecutive validations without improvement, the learning
        rate is cut by `plateau_factor` and the count restarts from 0 (best is kept);
      * at most `plateau_max_reductions` cuts; the next time the count reaches patience
        after the last cut, `should_stop` becomes True (and stays True), with no cut.

    So patience N cuts after N stalled validations (PyTorch's ReduceLROnPlateau would need
    patience N - 1 for that). With patience=2, threshold=1e-3, errors 0.50, 0.40, 0.40,
    0.40 cut at the 4th validation: the 3rd and 4th did not beat 0.40 * 0.999.

    Args:
      state: the current PlateauState (from `plateau_init` or a checkpoint).
      metric: the monitored value of this validation (config.train.plateau_monitor).
      train_config: `config.train`; reads the plateau_* fields.

    Returns:
      (new state, PlateauDecision). When `decision.reduced`, set the learning rate to
      config.train.learning_rate * decision.lr_scale with `set_learning_rate`.
    """
    metric = float(metric)
    if state.should_stop:
        return state, _decision(state, train_config, metric, reduced=False,
                                stalled=state.stalled)
    improved = metric < (1 - float(train_config.plateau_threshold)) * state.best
    best = metric if improved else state.best
    stalled = 0 if improved else state.stalled + 1
    reduced = should_stop = False
    if stalled >= int(train_config.plateau_patience):
        reduced = state.num_reductions < int(train_config.plateau_max_reductions)
        should_stop = not reduced
    new_state = PlateauState(
        best=best, stalled=0 if reduced or should_stop else stalled,
        num_reductions=state.num_reductions + int(reduced), should_stop=should_stop)
    return new_state, _decision(new_state, train_config, metric, reduced=reduced,
                                stalled=stalled)


def _decision(state: PlateauState, train_config, metric: float, *, reduced: bool,
              stalled: int) -> PlateauDecision:
    return PlateauDecision(
        lr_scale=plateau_lr_scale(state, train_config), reduced=reduced,
        num_reductions=state.num_reductions, should_stop=state.should_stop,
        best_metric=state.best, metric=metric, stalled=stalled)


def explain(decision: PlateauDecision, train_config: ml_collections.ConfigDict) -> str:
    """One line saying what the plateau rule decided at a validation and why.

    Args:
      decision: from `plateau_update`.
      train_config: `config.train`; reads learning_rate and the plateau_* fields.

    Returns:
      The line: an improvement, a stall counted towards patience, a cut, or the stop.
    """
    t = train_config
    name, value = t.plateau_monitor, f"{decision.metric:.4g}"
    if decision.stalled == 0:
        return f"Plateau rule: {name} {value} is the best so far."
    unchanged = (f"{name} {value} has not improved on its best, {decision.best_metric:.4g}, "
                 f"by {t.plateau_threshold:g} (relative) for {decision.stalled} validation"
                 f"{'s' if decision.stalled > 1 else ''}")
    if decision.reduced:
        return (f"Plateau rule: {unchanged}: learning rate cut to "
                f"{t.learning_rate * decision.lr_scale:.2e} (cut {decision.num_reductions} of "
                f"{t.plateau_max_reductions}).")
    if decision.should_stop:
        return (f"Plateau rule: {unchanged} with no learning-rate cut left "
                f"({decision.num_reductions} made, config.train.plateau_max_reductions="
                f"{t.plateau_max_reductions}): training stops here.")
    return f"Plateau rule: {unchanged} (it cuts at {t.plateau_patience})."


def monitored_metric(metrics: Mapping[str, Any], train_config: ml_collections.ConfigDict) -> float:
    """Picks the plateau schedule's metric out of an evaluation's metrics.

    Args:
      metrics: evaluation results keyed by metric name (e.g. 'val/top1_error').
      train_config: `config.train`; reads plateau_monitor.

    Returns:
      The monitored value as a Python float.

    Raises:
      KeyError: if the evaluation did not produce the monitored metric.
    """
    name = train_config.plateau_monitor
    if name not in metrics:
        raise KeyError(
            f"config.train.plateau_monitor={name!r} is not among the evaluation metrics "
            f"{sorted(metrics)}; set it to one of them."
        )
    return float(metrics[name])
