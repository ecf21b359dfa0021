"""Training curves of one or several runs, drawn from their metrics.jsonl into one PNG.

A 2x2 grid: loss, top-1 error and top-5 error (train solid, validation dashed, with
markers), and the learning rate (log scale). Each workdir gets one colour, labelled by
the workdir's name. The x axis is the epoch when the runs logged it, else the step.

    python -m vgg_jax.plot --workdir=runs/vgg_a --workdir=runs/vgg_b --out=curves.png
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from vgg_jax import metric_names as names
from vgg_jax.training import writers

# (panel title, train metric, validation metric); None = not drawn for that split.
_PANELS = (
    ("loss", names.TRAIN_LOSS, names.VAL_LOSS),
    ("top-1 error", names.TRAIN_TOP1_ERROR, names.VAL_TOP1_ERROR),
    ("top-5 error", names.TRAIN_TOP5_ERROR, names.VAL_TOP5_ERROR),
    ("learning rate", names.LEARNING_RATE, None),
)
_GRID = (2, 2)
_PANEL_SIZE_INCHES = (6.0, 4.0)
_DPI = 100


def load_history(workdir: str) -> dict[str, dict[int, float]]:
    """Reads a run's metrics.jsonl into {metric: {step: value}}.

    A step written twice (a run resumed from a checkpoint older than its last logs)
    keeps the later value, the one of the resumed run.

    Args:
      workdir: a training workdir holding metrics.jsonl.

    Returns:
      The history of every metric, "epoch" included.

    Raises:
      FileNotFoundError: if the workdir has no metrics.jsonl.
      ValueError: if it holds no record.
    """
    path = os.path.join(workdir, writers.METRICS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {writers.METRICS_FILENAME} in {workdir!r}: pass the --workdir of a training "
            "run (it writes that file as it trains)."
        )
    history: dict[str, dict[int, float]] = {}
    for record in writers.read_metrics(path):
        step = int(record[names.STEP])
        for name, value in record.items():
            if name != names.STEP and isinstance(value, (int, float)):
                history.setdefault(name, {})[step] = float(value)
    if not history:
        raise ValueError(f"{path} holds no metrics yet.")
    return history


def _series(history: dict[str, dict[int, float]], name: str, use_epochs: bool):
    """The (x, y) arrays of one metric, x in steps or in epochs."""
    steps = np.array(sorted(history.get(name, {})), dtype=np.float64)
    values = np.array([history[name][int(s)] for s in steps], dtype=np.float64)
    if not use_epochs or not steps.size:
        return steps, values
    # Epochs may be logged at some steps only: map steps to epochs by interpolation
    # inside the logged range and by the run's steps-per-epoch line outside it.
    known = np.array(sorted(history[names.EPOCH]), dtype=np.float64)
    epochs = np.array([history[names.EPOCH][int(s)] for s in known], dtype=np.float64)
    if known.size == 1:
        slope, intercept = (epochs[0] / known[0] if known[0] else 0.0), 0.0
    else:
        slope, intercept = np.polyfit(known, epochs, 1)
    inside = (steps >= known[0]) & (steps <= known[-1])
    x = np.where(inside, np.interp(steps, known, epochs), slope * steps + intercept)
    return x, values


def plot_curves(workdirs: Sequence[str], output_path: str) -> str:
    """Draws the training curves of one or several runs into one PNG.

    Args:
      workdirs: training workdirs, each holding a metrics.jsonl; one colour each,
        labelled by the workdir's base name.
      output_path: the PNG to write (its directory is created if needed).

    Returns:
      `output_path`.

    Raises:
      FileNotFoundError: if a workdir has no metrics.jsonl.
      ValueError: if no workdir is given, or one holds no metrics.
    """
    if not workdirs:
        raise ValueError("Give at least one workdir to plot.")
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(labels)) < len(labels):  # same names in different places: show the paths
        labels = [os.path.normpath(w) for w in workdirs]
    histories = [(label, load_history(w)) for label, w in zip(labels, workdirs)]
    # Runs are comparable in epochs (batch sizes may differ); steps only if one lacks them.
    use_epochs = all(len(h.get(names.EPOCH, {})) > 0 for _, h in histories)
    x_label = "epoch" if use_epochs else "step"

    rows, cols = _GRID
    figure = Figure(
        figsize=(cols * _PANEL_SIZE_INCHES[0], rows * _PANEL_SIZE_INCHES[1]),
        dpi=_DPI,
        layout="constrained",
    )
    axes = figure.subplots(rows, cols).ravel()
    colours = [f"C{i}" for i in range(len(histories))]
    for ax, (title, train_name, val_name) in zip(axes, _PANELS):
        for colour, (label, history) in zip(colours, histories):
            if train_name is not None and train_name in history:
                x, y = _series(history, train_name, use_epochs)
                split = "" if val_name is None else " train"
                # The learning rate changes by steps: draw it as a staircase.
                drawstyle = "steps-post" if val_name is None else "default"
                ax.plot(
                    x, y, color=colour, linestyle="-", drawstyle=drawstyle, label=f"{label}{split}"
                )
            if val_name is not None and val_name in history:
                x, y = _series(history, val_name, use_epochs)
                ax.plot(
                    x,
                    y,
                    color=colour,
                    linestyle="--",
                    marker="o",
                    markersize=3,
                    label=f"{label} val",
                )
        if title == "learning rate" and ax.lines:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(output_path, format="png")
    return output_path


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_multi_string(
        "workdir", [], "A training workdir holding metrics.jsonl (repeat for several runs).")
    flags.DEFINE_string("out", "curves.png", "The PNG to write.")


def main(argv: Sequence[str]) -> None:
    """Command line: python -m vgg_jax.plot --workdir=DIR [--workdir=DIR ...] --out=PNG."""
    workdirs, out = flags.FLAGS.workdir, flags.FLAGS.out
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments {' '.join(argv[1:])}; pass each run directory as "
                 "--workdir=DIR.")
    if not workdirs:
        sys.exit("Pass at least one --workdir=DIR holding a metrics.jsonl.")
    if not out.lower().endswith(".png"):
        sys.exit(f"--out={out} must name a .png file (the curves are drawn as PNG).")
    try:
        path = plot_curves(workdirs, out)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"Error: {error}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
