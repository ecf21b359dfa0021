"""Data parallelism over every device of every host: the mesh, shardings and start-up.

Training is synchronous data parallelism, as in the paper (3.3): parameters are replicated,
each device holds a slice of the global batch, and XLA inserts the gradient all-reduce.
This is written with `jax.jit` and `NamedSharding` over a one-axis mesh named "data".
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

DATA_AXIS = "data"

# How long a process waits for another's outcome of a step that every process runs (see
# `first_failure`). The processes reach such a step within seconds of each other, or within
# the time process 0 takes to start wandb; this only bounds the wait for a process that
# died on the way there.
AGREEMENT_TIMEOUT_S = 300
_MS_PER_S = 1000
_AGREEMENT_KEY = "vgg_jax/agreement"
# Each run of a step gets fresh keys (the store keeps a job's keys for its life); every
# process runs each step the same number of times, so the numbers match across processes.
_agreement_counts: collections.Counter = collections.Counter()

# Task counts set by launchers whose layout jax.distributed detects by itself.
_TASK_COUNT_ENV_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _launched_on_cluster() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(name) or 1) > 1 for name in _TASK_COUNT_ENV_VARS)


def joins_several_processes(coordinator_address: str = "", num_processes: int = 0) -> bool:
    """Whether `initialize_distributed` with these arguments may join several processes.

    Known before any process joins, and without starting a jax backend, so that a single
    process can still fail on a bad config before any work.

    Args:
      coordinator_address: "host:port" of process 0, or "" to auto-detect.
      num_processes: total number of processes, or 0 to auto-detect.

    Returns:
      True unless the job is one process (--num_processes=1, or neither flags nor a
      cluster environment asking for more).
    """
    if num_processes > 0:
        return num_processes > 1
    return bool(coordinator_address) or _launched_on_cluster()


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Starts jax.distributed when the job spans several processes.

    With explicit arguments they are used as given; otherwise jax's auto-detection runs
    when a cluster environment (SLURM, Open MPI, an explicit coordinator variable) shows
    more than one task. A single plain process needs no initialisation.

    Args:
      coordinator_address: "host:port" of process 0, or "" to auto-detect.
      num_processes: total number of processes, or 0 to auto-detect.
      process_id: this process's index, or -1 to auto-detect.

    Raises:
      ValueError: for a process index out of range, or several processes without a
        coordinator address or a cluster environment.
    """
    if num_processes > 0 and not 0 <= process_id < num_processes and process_id != -1:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                         f"{num_processes}).")
    if num_processes > 1 and not coordinator_address and not _launched_on_cluster():
        raise ValueError(f"--num_processes={num_processes} needs --coordinator_address="
                         "host:port of process 0 (no cluster environment to detect it from).")
    if coordinator_address or num_processes > 0:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
        )
    elif _launched_on_cluster():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


class PeerProcessError(RuntimeError):
    """Another process of the job failed a step that this process passed."""


def first_failure(step: str, failure: str) -> str:
    """Every process's outcome of `step`, agreed across the job.

    A step that can fail on one process alone (the workdir lock of its own file, process
    0's metrics writers) would otherwise leave the other processes waiting in their next
    collective until jax's timeouts end them with an unrelated error. Each process
    publishes its outcome through jax.distributed's key-value store and reads everyone's
    in process order, so all of them get the same answer.

    Args:
      step: a name for the step, the same on every process (e.g. "workdir_lock").
      failure: this process's failure in one sentence, or "" when it succeeded.

    Returns:
      The first failure in process order, or "" when every process succeeded; `failure`
      itself when jax.distributed does not join several processes.
    """
    # jax exposes its distributed key-value client through no public name of its own;
    # orbax's public multihost module hands it out (and follows jax's versions).
    # Checked first: it starts no backend, which jax.process_count() would.
    if not ocp_multihost.is_jax_distributed_client_initialized():
        return failure
    num_processes = jax.process_count()
    if num_processes < 2:
        return failure
    client = ocp_multihost.get_jax_distributed_client()
    _agreement_counts[step] += 1
    prefix = f"{_AGREEMENT_KEY}/{step}/{_agreement_counts[step]}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(failure))
    for index in range(num_processes):
        try:
            outcome = json.loads(client.blocking_key_value_get(
                f"{prefix}/{index}", AGREEMENT_TIMEOUT_S * _MS_PER_S))
        except jax.errors.JaxRuntimeError:
            return (f"Process {index} of {num_processes} did not report within "
                    f"{AGREEMENT_TIMEOUT_S} s whether it passed the step {step!r}; see its log.")
        if outcome:
            return outcome
    return ""


def sum_over_processes(local: np.ndarray) -> np.ndarray:
    """Element-wise sum of an array over every process of the job (the array itself in a
    single process); every process must call it with the same shape.

    Args:
      local: this process's values.

    Returns:
      The job's sums, the same on every process.
    """
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def create_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "data".

    Args:
      devices: the devices to use; default every device of every process.

    Returns:
      The mesh.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of values every device holds whole (parameters, optimiser state).

    Args:
      mesh: the data mesh.

    Returns:
      A sharding that splits no axis.
    """
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of arrays split along their first axis over the data axis.

    Args:
      mesh: the data mesh.

    Returns:
      A sharding of the leading (batch) axis over DATA_AXIS; other axes are not split.
    """
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local slice.

    Args:
      batch: this process's examples; leading axis = global batch / process count.
      mesh: the data mesh.

    Returns:
      Global arrays, split along the batch axis over every device.
    """
    sharding = batch_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host or device values whole on every device of the mesh.

    Args:
      tree: arrays (numpy or jax) in any pytree, e.g. the parameters.
      mesh: the data mesh.

    Returns:
      The same pytree of jax arrays with the `replicated` sharding.
    """
    return jax.device_put(tree, replicated(mesh))
