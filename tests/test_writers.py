"""Tests of the metrics writers (vgg_jax/training/writers/): real files, wandb in offline mode."""

import fcntl
import glob
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import logging as absl_logging

from configs import base
from vgg_jax import metric_names as names
from vgg_jax.training import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(wandb_mode="disabled", progress_bar=True):
    config = base.get_config()
    config.wandb.mode = wandb_mode
    config.wandb.name = "test-run"
    config.wandb.tags = ("test",)
    config.progress_bar = progress_bar
    return config


TRAIN = {
    names.TRAIN_LOSS: 2.5,
    names.TRAIN_TOP1_ERROR: 0.75,
    names.TRAIN_TOP5_ERROR: 0.5,
    names.TRAIN_IMAGES_PER_SEC: 123.4,
    names.TRAIN_GRAD_NORM: 1.5,
    names.LEARNING_RATE: 0.01,
    names.EPOCH: 0.5,
}
VAL = {names.VAL_LOSS: 2.25, names.VAL_TOP1_ERROR: 0.625, names.VAL_TOP5_ERROR: 0.375}


def test_json_lines_hold_every_metric_written(tmp_path):
    workdir = str(tmp_path / "run")
    with writers.create_writer(
        make_config(), workdir, is_main_process=True, total_steps=20, initial_step=0
    ) as writer:
        for step in range(1, 21):
            writer.advance(step)
            if step % 10 == 0:
                # Device scalars and numpy scalars are fetched and written as numbers.
                writer.write_scalars(
                    step, {**TRAIN, names.TRAIN_LOSS: jnp.float32(2.5), "lr": np.float32(0.01)}
                )
        writer.write_scalars(20, VAL)
    records = writers.read_metrics(os.path.join(workdir, writers.METRICS_FILENAME))
    assert [r["step"] for r in records] == [10, 20, 20]
    for record in records[:2]:
        assert set(record) == {"step", *TRAIN}
        for name, value in TRAIN.items():
            assert record[name] == pytest.approx(value, rel=1e-6)
    assert records[2] == {"step": 20, **VAL}


def test_json_lines_on_resume_drop_redone_steps_and_a_cut_last_line(tmp_path):
    workdir = str(tmp_path)
    config = make_config()
    with writers.create_writer(
        config, workdir, is_main_process=True, total_steps=10, initial_step=0
    ) as writer:
        writer.write_scalars(5, {"train/loss": 1.0})
        writer.write_scalars(6, {"train/loss": 0.9})  # after the checkpoint of step 5
    path = os.path.join(workdir, writers.METRICS_FILENAME)
    with open(path, "a") as f:
        f.write('{"step": 6, "train/lo')  # a job killed in the middle of a write
    with writers.create_writer(
        config, workdir, is_main_process=True, total_steps=10, initial_step=5
    ) as writer:
        writer.write_scalars(6, {"train/loss": 0.5})
    assert writers.read_metrics(path) == [
        {"step": 5, "train/loss": 1.0},
        {"step": 6, "train/loss": 0.5},
    ]


def test_non_scalar_metric_is_rejected(tmp_path):
    with (
        writers.create_writer(
            make_config(), str(tmp_path), is_main_process=True, total_steps=1, initial_step=0
        ) as writer,
        pytest.raises(ValueError, match="train/loss"),
    ):
        writer.write_scalars(1, {"train/loss": np.ones(3)})


def test_wandb_offline_writes_under_the_workdir_and_resumes_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    config = make_config("offline")
    for initial_step in (0, 10):
        with writers.create_writer(
            config, workdir, is_main_process=True, total_steps=20, initial_step=initial_step
        ) as writer:
            writer.write_scalars(initial_step + 10, {**TRAIN, **VAL})
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2
    with open(os.path.join(workdir, writers.WANDB_RUN_ID_FILENAME)) as f:
        run_id = f.read().strip()
    # The restarted job logged into the same run id.
    # (wandb appends "-1" to the directory of a second start within the same second.)
    assert all(f"-{run_id}" in os.path.basename(run) for run in runs), (runs, run_id)
    for run in runs:
        assert os.path.getsize(os.path.join(run, f"run-{run_id}.wandb")) > 0


def test_wandb_disabled_writes_nothing(tmp_path):
    workdir = str(tmp_path)
    with writers.create_writer(
        make_config("disabled"), workdir, is_main_process=True, total_steps=5, initial_step=0
    ) as writer:
        writer.write_scalars(1, TRAIN)
    assert sorted(os.listdir(workdir)) == [writers.METRICS_FILENAME]


def test_non_main_process_writes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    writer = writers.create_writer(
        make_config("offline"), workdir, is_main_process=False, total_steps=5, initial_step=0
    )
    assert isinstance(writer, writers.NoOpWriter)
    for step in range(1, 6):
        writer.advance(step)
        writer.write_scalars(step, {**TRAIN, **VAL})
    writer.log_text("hello")
    writer.close()
    assert not os.path.exists(workdir)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as the bar needs."""

    def isatty(self):
        return True


def test_console_prints_one_line_per_evaluation():
    stream = _Terminal()
    console = writers.ConsoleWriter(
        total_steps=100, initial_step=0, show_progress=True, images_per_step=32, stream=stream
    )
    for step in range(1, 101):
        console.advance(step)
        if step % 50 == 0:
            console.write_scalars(step, TRAIN)
    console.write_scalars(100, VAL)
    console.log_text("checkpoint saved")
    console.close()
    lines = [line for line in stream.getvalue().replace("\r", "\n").split("\n") if line.strip()]
    summaries = [line for line in lines if line.startswith("step 100 |")]
    assert len(summaries) == 1
    assert summaries[0] == (
        "step 100 | epoch 0.50 | train loss 2.5000 top-1 err 75.00% top-5 err 50.00% "
        "| val loss 2.2500 top-1 err 62.50% top-5 err 37.50% | lr 0.01"
    )
    assert "checkpoint saved" in lines
    assert any("100/100" in line and "img/s=123.4" in line for line in lines)


def test_console_without_progress_bar_prints_every_write():
    stream = io.StringIO()
    console = writers.ConsoleWriter(
        total_steps=10, initial_step=0, show_progress=False, stream=stream
    )
    console.write_scalars(5, {"train/loss": 2.0})
    console.write_scalars(10, VAL)
    lines = stream.getvalue().strip().split("\n")
    assert lines == [
        "step 5 | train/loss=2.0000",
        "step 10 | train loss 2.0000 | val loss 2.2500 top-1 err 62.50% top-5 err 37.50%",
    ]


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_path = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert writers.resolve_wandb_mode("auto") == "offline"  # no key anywhere
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc_path.chmod(0o600)
    assert writers.resolve_wandb_mode("auto") == "online"
    netrc_path.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    assert writers.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert writers.resolve_wandb_mode("auto") == "disabled"
    assert writers.resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="config.wandb.mode"):
        writers.check_config(ml_collections.ConfigDict({"mode": "onlien"}))


def test_console_off_a_terminal_prints_plain_lines_not_bar_frames():
    stream = io.StringIO()  # a file or a SLURM log: not a terminal
    console = writers.ConsoleWriter(
        total_steps=100, initial_step=0, show_progress=True, images_per_step=32, stream=stream
    )
    for step in range(1, 101):
        console.advance(step)
        if step % 50 == 0:
            console.write_scalars(step, {"train/loss": 2.0})
    console.close()
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == ["step 50 | train/loss=2.0000",
                                              "step 100 | train/loss=2.0000"]


def test_a_run_ended_early_closes_the_bar_complete_before_the_final_report():
    stream = _Terminal()
    console = writers.ConsoleWriter(total_steps=100, initial_step=0, show_progress=True,
                                    stream=stream)
    for step in range(1, 81):  # the plateau rule stops the run at step 80 of 100
        console.advance(step)
    console.log_text("Stopping at step 80: validation stalled after the last learning-rate cut.")
    console.end_at(80)
    console.log_text("Finished at step 80; last validation: ...")
    console.close()
    screen = [line.split("\r")[-1] for line in stream.getvalue().split("\n") if line.strip()]
    assert screen[-1] == "Finished at step 80; last validation: ..."
    assert "100%" in screen[-2] and "80/80" in screen[-2], screen


def test_wandb_start_up_lines_are_not_glued_onto_the_bar(tmp_path):
    """A real terminal (a pty) and a real offline wandb run: wandb's start-up lines come
    before the bar is first drawn, each on a line of its own."""
    script = (
        "import sys; from configs import base; from vgg_jax.training import writers; "
        "config = base.get_config(); config.wandb.mode = 'offline'; "
        "writer = writers.create_writer(config, sys.argv[1], is_main_process=True, "
        "total_steps=10); [writer.advance(step) for step in range(1, 11)]; writer.close()")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_SERVICE")}
    env.update(WANDB_MODE="offline", JAX_PLATFORMS="cpu")
    controller, terminal = pty.openpty()
    # An 80-column terminal (a new pty has none, and the bar would shrink to nothing).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0, output.decode()[-2000:]
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())  # without colours
    starts = [index for index in range(len(text)) if text.startswith("wandb:", index)]
    assert starts, text
    assert all(index == 0 or text[index - 1] == "\n" for index in starts), text
    assert "10/10" in text


def test_a_log_record_written_while_the_bar_is_shown_starts_on_a_line_of_its_own(monkeypatch):
    stream = _Terminal()
    # absl's handler on the root logger, as in a run; before flag parsing it writes to
    # sys.stderr, which is where the bar goes too.
    monkeypatch.setattr(sys, "stderr", stream)
    handler = absl_logging.ABSLHandler(absl_logging.PythonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        console = writers.ConsoleWriter(total_steps=10, initial_step=0, show_progress=True)
        console.advance(3)
        absl_logging.warning("written while the bar is shown")
        console.advance(10)
        console.close()
        absl_logging.warning("written after the bar closed")
    finally:
        logging.getLogger().removeHandler(handler)
    # What a terminal shows: each line as left by its last carriage return (without absl's
    # one-off notice that flags are not parsed yet, written before the first record).
    output = stream.getvalue().replace("WARNING: Logging before flag parsing goes to stderr.\n", "")
    screen = [line.split("\r")[-1].rstrip() for line in output.split("\n")]
    assert screen[0].startswith("W") and screen[0].endswith("] written while the bar is shown"), (
        screen)
    assert "10/10" in screen[1]
    assert screen[2].endswith("] written after the bar closed")
    assert "handle" not in handler.__dict__  # the handler is left as it was
