"""The train step of the paper's recipe (3.1): softmax cross-entropy on the normalised
crops (or, for a box net, the loss sums vgg_jax.training.task picks), one SGD update,
jitted over the data mesh with the state donated."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vgg_jax.evaluation.metrics import classification_sums
from vgg_jax.models import VGG
from vgg_jax.preprocess import normalize_images
from vgg_jax.training import optim
from vgg_jax.training.state import TrainState

# (net outputs, batch, weights) -> metric sums holding "loss" (summed over the examples)
# and "count" (their total weight): what a task makes its loss of.
StepSums = Callable[[jax.Array, Mapping[str, jax.Array], jax.Array], dict[str, jax.Array]]



def classification_step_sums(logits: jax.Array, batch: Mapping[str, jax.Array],
                             weights: jax.Array) -> dict[str, jax.Array]:
    """The paper's classification loss and errors of a batch (`metrics.classification_sums`)."""
    return classification_sums(logits, batch["label"], weights)


def make_train_step(model: VGG, data_config: ml_collections.ConfigDict, *,
                    sums_fn: StepSums = classification_step_sums, grad_accum_steps: int = 1):
    """Returns the un-jitted train step: (state, batch) -> (new state, metric sums).

    The loss is the mean over the valid examples of the global batch; under jit with the
    batch sharded over devices XLA turns the gradient into an all-reduce, and the batch-norm
    statistics (means over the batch axis) into global ones, as on one device. Under
    gradient accumulation the step takes one micro-batch; the state's step advances on the
    last micro-batch of each optimiser step.

    Args:
      model: the net.
      data_config: config.data (mean/std for the on-device normalisation).
      sums_fn: the task's loss and metric sums (default: classification's).
      grad_accum_steps: micro-batches per optimiser step (config.train.grad_accum_steps).

    Returns:
      The step function.
    """
    mean_rgb, std_rgb = tuple(data_config.mean_rgb), tuple(data_config.std_rgb)
    frozen = frozenset(model.frozen_parameters)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        # A fresh dropout key for every micro-batch of the run, whatever its step.
        micro_batches_done = state.step * grad_accum_steps + optim.micro_batch_index(
            state.opt_state)
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), micro_batches_done)
        weights = batch["mask"].astype(jnp.float32)
        images = normalize_images(
            batch["image"], mean_rgb, std_rgb, batch["rgb_shift"], model.dtype)
        # Fine-tuning differentiates the trained groups only: no weight gradient is computed
        # for a frozen layer, nor any backward pass below the lowest trained layer.
        trained = {name: group for name, group in state.params.items() if name not in frozen}
        fixed = {name: group for name, group in state.params.items() if name in frozen}

        def loss_fn(trained_params):
            logits, updates = model.apply(
                {"params": {**trained_params, **fixed}, "batch_stats": state.batch_stats},
                images, train=True, mask=batch["mask"], rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            sums = sums_fn(logits, batch, weights)
            return sums["loss"] / jnp.maximum(sums["count"], 1.0), (sums, updates)

        (loss, (sums, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        grad_norm = optax.tree.norm(grads)  # of the trained groups: the rest never moves
        # The optimiser takes the whole tree; it gives the frozen groups zero updates and
        # never reads their (zero) gradients.
        grads = {**grads, **jax.tree.map(jnp.zeros_like, fixed)}
        new_state = state.apply_gradients(
            grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        metrics = dict(
            sums,
            skipped=jnp.sum(1.0 - weights),
            grad_norm=grad_norm,
            finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        )
        return new_state, metrics

    return train_step


def jit_train_step(model: VGG, data_config: ml_collections.ConfigDict,
                   *, sums_fn: StepSums = classification_step_sums, grad_accum_steps: int = 1):
    """The train step as training runs it: jitted, with the state's buffers donated (the
    old state is dead after the step, so XLA updates parameters in place).

    Args:
      model, data_config, sums_fn, grad_accum_steps: as for `make_train_step`.

    Returns:
      A jitted (state, batch) -> (new state, metric sums).
    """
    return jax.jit(make_train_step(model, data_config, sums_fn=sums_fn,
                                   grad_accum_steps=grad_accum_steps), donate_argnums=(0,))
