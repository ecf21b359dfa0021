"""Tests of the training-curve plot (vgg_jax/plot.py) on synthetic metrics.jsonl files."""

import json
import os
import subprocess
import sys

import pytest

from vgg_jax import metric_names as names
from vgg_jax import plot
from vgg_jax.training import writers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_synthetic_run(workdir, steps_per_epoch=10, epochs=4, with_epoch=True):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, writers.METRICS_FILENAME), "w") as f:
        for step in range(5, epochs * steps_per_epoch + 1, 5):
            record = {
                "step": step,
                names.TRAIN_LOSS: 7.0 / (1 + step),
                names.TRAIN_TOP1_ERROR: 1 - step / 100,
                names.TRAIN_TOP5_ERROR: 0.8 - step / 100,
                names.LEARNING_RATE: 0.01 if step < 20 else 0.001,
            }
            if with_epoch:
                record[names.EPOCH] = step / steps_per_epoch
            f.write(json.dumps(record) + "\n")
            if step % steps_per_epoch == 0:
                val = {
                    "step": step,
                    names.VAL_LOSS: 8.0 / (1 + step),
                    names.VAL_TOP1_ERROR: 1 - step / 120,
                    names.VAL_TOP5_ERROR: 0.9 - step / 120,
                }
                f.write(json.dumps(val) + "\n")


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_plot_writes_a_png_for_several_runs(tmp_path):
    write_synthetic_run(str(tmp_path / "vgg_a"))
    write_synthetic_run(str(tmp_path / "vgg_b"), steps_per_epoch=20)
    out = str(tmp_path / "figures" / "curves.png")
    assert plot.plot_curves([str(tmp_path / "vgg_a"), str(tmp_path / "vgg_b")], out) == out
    assert_png(out)


def test_plot_falls_back_to_steps_without_epochs(tmp_path):
    write_synthetic_run(str(tmp_path / "run"), with_epoch=False)
    assert_png(plot.plot_curves([str(tmp_path / "run")], str(tmp_path / "c.png")))


def test_resumed_steps_keep_the_later_value(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    records = [
        {"step": 1, "train/loss": 3.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 2, "train/loss": 1.5},
    ]
    with open(os.path.join(workdir, writers.METRICS_FILENAME), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    assert plot.load_history(workdir) == {"train/loss": {1: 3.0, 2: 1.5}}


def test_workdir_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No metrics.jsonl in"):
        plot.plot_curves([str(tmp_path)], str(tmp_path / "c.png"))
    assert not os.path.exists(tmp_path / "c.png")


def test_command_line(tmp_path):
    write_synthetic_run(str(tmp_path / "run"))
    out = str(tmp_path / "cli.png")
    command = [sys.executable, "-m", "vgg_jax.plot", f"--workdir={tmp_path / 'run'}",
               f"--out={out}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "Wrote" in result.stdout
    assert_png(out)
    missing = subprocess.run(
        [sys.executable, "-m", "vgg_jax.plot", f"--workdir={tmp_path / 'nowhere'}", "--out", out],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "No metrics.jsonl" in missing.stderr
