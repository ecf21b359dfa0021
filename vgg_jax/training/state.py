"""The train state: what one optimiser step reads and writes, and its initialisation.

Flax's TrainState (parameters, optimiser state, step) plus the dropout RNG key and the
running batch-norm statistics, created directly replicated over the data mesh. Its `step`
counts optimiser steps, as everything else does (under gradient accumulation one step takes
several micro-batches; their position within the step is the optimiser state's own count,
`optim.micro_batch_index`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from vgg_jax.models import VGG
from vgg_jax.runtime import parallel
from vgg_jax.training import optim

# Nets (with their meshes) whose compiled initialisation a process keeps for its next run.
_CACHED_INITIALISATIONS = 8


class TrainState(train_state.TrainState):
    """Flax's train state plus the raw RNG key that seeds dropout at every step and the
    running batch-norm statistics ({} for nets without batch norm); `step` counts
    optimiser steps."""

    rng: jax.Array
    batch_stats: Any

    def apply_gradients(self, *, grads: Any, **kwargs) -> TrainState:
        """One update call: the parameters move, and `step` advances, only when it completes
        an optimiser step (every call without gradient accumulation, the last micro-batch's
        with it).

        Args:
          grads: the gradient of the loss (of this micro-batch) for every parameter.
          **kwargs: other fields to replace (e.g. batch_stats).

        Returns:
          The new state.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        # MultiSteps counts a step's micro-batches and wraps back to 0 on its last one.
        # (A weakly typed 0/1, so the step keeps its type and the jitted step its cache.)
        completed = jnp.where(optim.micro_batch_index(opt_state) == 0, 1, 0)
        return self.replace(step=self.step + completed,
                            params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables: {"params"} and, with batch norm, {"batch_stats"}."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def create_train_state(
    model: VGG, tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh
) -> TrainState:
    """Initialises parameters and optimiser state directly replicated over the mesh.

    Args:
      model: the net.
      tx: the optimiser.
      seed: seeds parameter initialisation and dropout.
      mesh: the data mesh.

    Returns:
      The initial TrainState (step 0).
    """
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    variables = _init_variables(model, mesh)(init_key)

    def create(variables):
        return TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx,
            rng=jax.random.key_data(dropout_key), batch_stats=variables.get("batch_stats", {}),
        )

    return jax.jit(create, out_shardings=parallel.replicated(mesh))(variables)


@functools.lru_cache(maxsize=_CACHED_INITIALISATIONS)
def _init_variables(model: VGG, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], Any]:
    """The net's initialisation, jitted once per net and mesh: compiling its random
    initialisers takes seconds on CPU, and a second run in the same process (a notebook,
    the tests) reuses it. The optimiser state, cheap to compile, is made per run."""
    # numpy, not jax: built outside any trace, even when the first call is under
    # jax.eval_shape (the cached function must not keep a tracer).
    images = np.zeros((1, model.image_size, model.image_size, 3), np.float32)
    return jax.jit(lambda key: model.init(key, images, train=False),
                   out_shardings=parallel.replicated(mesh))
