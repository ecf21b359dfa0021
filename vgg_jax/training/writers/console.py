"""The console writer: a tqdm progress bar over optimiser steps and a line per evaluation."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import tqdm

from vgg_jax.metric_names import EPOCH, LEARNING_RATE, TRAIN_IMAGES_PER_SEC, TRAIN_LOSS
from vgg_jax.runtime.console import LogRecordsAboveBar, is_terminal
from vgg_jax.training.writers.base import MetricWriter

# Which metrics the end-of-evaluation console line shows, and how it labels them.
# (label, metric suffix, shown as a percentage) of the per-evaluation console line.
_SUMMARY_FIELDS = (
    ("loss", "loss", False), ("top-1 err", "top1_error", True), ("top-5 err", "top5_error", True),
    ("loc err", "loc_error", True),  # a box net's (localisation, Appendix A)
)


def _format_value(value: float) -> str:
    if isinstance(value, float) and (value == 0 or 1e-3 <= abs(value) < 1e4 or math.isnan(value)):
        return f"{value:.4f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class ConsoleWriter(MetricWriter):
    """A progress bar over steps and a printed line per evaluation.

    The bar's postfix shows the latest loss, learning rate and images/s; an evaluation (a
    write that holds any "val/" metric) prints a line with the latest train and the new
    validation loss and errors. Without a bar, every write prints a line. Off a terminal
    (a SLURM log, a file, a pipe) there is no bar either: its carriage-return frames would
    pile up there, so the writes' plain lines report progress instead.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        initial_step: int,
        show_progress: bool,
        images_per_step: int | None = None,
        stream=None,
    ):
        """Args:
        total_steps: the last step of training (the bar's total).
        initial_step: the step training starts from (non-zero on resume).
        show_progress: draw the tqdm bar when `stream` is a terminal; False (or not a
          terminal) prints every write instead.
        images_per_step: global batch size, to show images/s from the bar's own rate
          until a train/images_per_sec value is written.
        stream: where to write (default sys.stderr, like tqdm).
        """
        self._stream = stream if stream is not None else sys.stderr
        self._images_per_step = images_per_step
        self._latest: dict[str, float] = {}
        self._bar = None
        self._log_guard = None
        if show_progress and is_terminal(self._stream):
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                file=self._stream,
            )
            self._log_guard = LogRecordsAboveBar(self._stream)

    def _print(self, line: str) -> None:
        # tqdm.write keeps the bar intact below the printed line.
        tqdm.tqdm.write(line, file=self._stream)

    def advance(self, step: int) -> None:
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._latest.update(scalars)
        is_eval = any(name.startswith("val/") for name in scalars)
        if self._bar is None:
            if is_eval:
                self._print(self._summary_line(step))
            else:
                items = " ".join(f"{k}={_format_value(v)}" for k, v in scalars.items())
                self._print(f"step {step} | {items}")
            return
        self.advance(step)
        postfix = {}
        if TRAIN_LOSS in self._latest:
            postfix["loss"] = f"{self._latest[TRAIN_LOSS]:.4f}"
        if LEARNING_RATE in self._latest:
            postfix["lr"] = f"{self._latest[LEARNING_RATE]:.2g}"
        images_per_sec = self._latest.get(TRAIN_IMAGES_PER_SEC)
        rate = self._bar.format_dict.get("rate")
        if images_per_sec is None and rate and self._images_per_step:
            images_per_sec = rate * self._images_per_step
        if images_per_sec is not None:
            postfix["img/s"] = f"{images_per_sec:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        if is_eval:
            self._print(self._summary_line(step))

    def _summary_line(self, step: int) -> str:
        parts = [f"step {step}"]
        if EPOCH in self._latest:
            parts.append(f"epoch {self._latest[EPOCH]:.2f}")
        for split in ("train", "val"):
            fields = [
                f"{label} {100 * self._latest[f'{split}/{key}']:.2f}%" if percent
                else f"{label} {_format_value(self._latest[f'{split}/{key}'])}"
                for label, key, percent in _SUMMARY_FIELDS
                if f"{split}/{key}" in self._latest
            ]
            if fields:
                parts.append(f"{split} " + " ".join(fields))
        if LEARNING_RATE in self._latest:
            parts.append(f"lr {self._latest[LEARNING_RATE]:.3g}")
        return " | ".join(parts)

    def log_text(self, message: str) -> None:
        self._print(message)

    def end_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.total = step
            self._bar.update(step - self._bar.n)
            self.close()

    def close(self) -> None:
        if self._log_guard is not None:
            self._log_guard.remove()
            self._log_guard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
