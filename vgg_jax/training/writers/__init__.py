"""One metrics interface for training, with three backends.

* console: a tqdm progress bar over optimiser steps (rate, ETA, and the latest loss,
  learning rate and images/s), plus one printed line per evaluation with the train and
  validation loss and top-1/top-5 error;
* JSON lines: `<workdir>/metrics.jsonl`, one object per `write_scalars` call holding
  "step" and every scalar written (read back by `vgg_jax.plot`);
* Weights & Biases: mode from `config.wandb.mode`, files under `<workdir>/wandb/`, the
  same run resumed when training restarts in the same workdir.

Only the main process (JAX process 0) writes: `create_writer(..., is_main_process=False)`
returns a writer that does nothing, so the training loop needs no `if` around logging. Every
process calls `create_writer`: if process 0's writers fail to start, the others fail too
instead of going on into training without it.

Usage:

    with create_writer(config, workdir, is_main_process=jax.process_index() == 0,
                       total_steps=total, initial_step=step) as writer:
        for step in range(step + 1, total + 1):
            ...
            writer.advance(step)                       # every step: cheap, no device sync
            if step % config.train.log_every_steps == 0:
                writer.write_scalars(step, {TRAIN_LOSS: loss, LEARNING_RATE: lr, ...})
"""

from __future__ import annotations

import ml_collections

from vgg_jax.runtime import parallel
from vgg_jax.training.writers.base import MetricWriter, MultiWriter, NoOpWriter
from vgg_jax.training.writers.console import ConsoleWriter
from vgg_jax.training.writers.json_lines import METRICS_FILENAME, JsonLinesWriter, read_metrics
from vgg_jax.training.writers.wandb_run import (
    WANDB_RUN_ID_FILENAME,
    WandbWriter,
    check_config,
    resolve_wandb_mode,
)

__all__ = ["METRICS_FILENAME", "WANDB_RUN_ID_FILENAME", "ConsoleWriter", "JsonLinesWriter",
           "MetricWriter", "MultiWriter", "NoOpWriter", "WandbWriter", "check_config",
           "create_writer", "read_metrics", "resolve_wandb_mode"]

# The name under which the processes agree that process 0's writers started.
_WRITERS_STEP = "metrics_writers"


def create_writer(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    is_main_process: bool,
    total_steps: int,
    initial_step: int = 0,
) -> MetricWriter:
    """Builds the metrics writer of a training run.

    Args:
      config: the full config; reads config.progress_bar, config.train.batch_size and
        config.wandb (mode, project, name, tags).
      workdir: the run's directory: metrics.jsonl and wandb/ are written inside.
      is_main_process: True on JAX process 0 only; other processes get a NoOpWriter.
      total_steps: the last optimiser step of training (progress bar and ETA).
      initial_step: the step training starts from (the restored step on resume).

    Every process of a multi-process job must call this: they agree on whether process 0's
    writers started (`parallel.first_failure`), so that a failure there stops them all.

    Returns:
      A MetricWriter: console + JSON lines (+ wandb unless its mode is "disabled"), or a
      NoOpWriter.

    Raises:
      parallel.PeerProcessError: on the other processes, when process 0's writers failed
        to start (process 0 raises its own error).
    """
    writer: MetricWriter = NoOpWriter()
    if is_main_process:
        try:
            writer = _main_process_writer(config, workdir, total_steps, initial_step)
        except Exception as error:
            # The other processes would otherwise go on into training and wait in its
            # first collective for this one, until a jax timeout ends them.
            parallel.first_failure(_WRITERS_STEP, (
                f"Process 0 could not start its metrics writers ({type(error).__name__}: "
                f"{error}); see its log."))
            raise
    failure = parallel.first_failure(_WRITERS_STEP, "")
    if failure:
        writer.close()
        raise parallel.PeerProcessError(failure)
    return writer


def _main_process_writer(config: ml_collections.ConfigDict, workdir: str, total_steps: int,
                         initial_step: int) -> MetricWriter:
    """Console, JSON lines and wandb writers; those started are closed if a later one fails."""
    mode = resolve_wandb_mode(config.wandb.mode)
    # wandb first: the lines it prints while starting would otherwise be glued onto the
    # progress bar's line (the bar's frames end without a newline).
    wandb_writers = [WandbWriter(config, workdir, mode=mode)] if mode != "disabled" else []
    writers: list[MetricWriter] = []
    try:
        writers.append(ConsoleWriter(
            total_steps=total_steps,
            initial_step=initial_step,
            show_progress=bool(config.get("progress_bar", True)),
            images_per_step=config.train.batch_size,
        ))
        writers.append(JsonLinesWriter(workdir, initial_step=initial_step))
    except Exception:
        MultiWriter(writers + wandb_writers).close()
        raise
    return MultiWriter(writers + wandb_writers)
