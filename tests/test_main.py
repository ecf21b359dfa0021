"""main.py end to end in real subprocesses: the quickstart path, resume after SIGKILL,
preemption by SIGTERM, and the divergence guard."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vgg_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny quickstart: width/16 net A, three short epochs (66 steps) of the real digits pipeline.
SMALL_RUN = [
    "--config.model.width_divisor=16",
    "--config.model.fc_features=32",
    "--config.train.num_epochs=3",
    "--config.train.batch_size=64",
    "--config.train.log_every_steps=5",
    "--config.train.checkpoint_every_steps=5",
    "--config.progress_bar=False",
]


def _command(workdir, cache_dir, *extra):
    return [sys.executable, "main.py", "--config=configs/quickstart.py",
            f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}", *SMALL_RUN, *extra]


def _env():
    # One CPU device per process here: the data-parallel path is tested in test_train.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", WANDB_MODE="offline", WANDB_SILENT="true")


def _run(args, timeout=300):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=_env())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    """One uninterrupted run, shared by the tests that compare against it."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _run(_command(workdir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def _final_params(workdir):
    variables, _ = checkpoint.load_variables(workdir, "latest")
    return variables["params"]


def _latest_step(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return -1
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps, default=-1)


def test_quickstart_pipeline_end_to_end(reference_run, cache_dir):
    workdir, result = reference_run
    # The digits were written once as an ImageNet-style JPEG folder.
    digits = os.path.join(cache_dir, "digits")
    assert sorted(os.listdir(os.path.join(digits, "train"))) == [str(c) for c in range(10)]
    assert sorted(os.listdir(os.path.join(digits, "val"))) == [str(c) for c in range(10)]
    # Per-epoch lines with train/val loss and top-1/top-5 error.
    assert "step 44 | epoch 2.00 | train loss" in result.stdout + result.stderr
    assert "Finished at step 66; last validation: top-1 error" in result.stdout + result.stderr
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evaluations = [r for r in records if "val/top1_error" in r]
    assert len(evaluations) == 3
    for name in ("val/loss", "val/top1_error", "val/top5_error", "epoch"):
        assert all(np.isfinite(r[name]) for r in evaluations)
    trained = [r for r in records if "train/loss" in r]
    for name in ("train/loss", "train/top1_error", "train/top5_error", "lr",
                 "train/images_per_sec", "train/grad_norm"):
        assert all(np.isfinite(r[name]) for r in trained), name
    assert evaluations[-1]["val/count"] == 360  # every validation digit counted once
    assert evaluations[-1]["val/top1_error"] < 0.9  # it learned something in 3 epochs
    assert _latest_step(workdir) == 66
    assert os.listdir(os.path.join(workdir, "wandb"))


def _live_processes_of_session(session_id):
    """PIDs of the live (non-zombie) processes in a session: a run and all it started."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.append(int(pid))
    return found


def test_sigkill_then_resume_is_bit_identical(reference_run, cache_dir, tmp_path):
    reference_dir, _ = reference_run
    workdir = str(tmp_path / "killed")
    # Its own session, so that every process the run starts (grain workers, the
    # multiprocessing resource tracker) can be found after the kill.
    process = subprocess.Popen(_command(workdir, cache_dir), cwd=ROOT, env=_env(),
                               start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _latest_step(workdir) < 10 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _latest_step(workdir)
    assert 10 <= killed_at < 66, f"the run was not killed mid-way (latest step {killed_at})"
    # The workers notice their parent's death within a second and exit; then the resource
    # tracker frees their shared memory and exits too.
    deadline = time.time() + 10
    while _live_processes_of_session(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    stranded = _live_processes_of_session(process.pid)
    for pid in stranded:  # so a failure does not strand them for the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert not stranded, f"processes of the killed run still alive: {stranded}"

    result = _run(_command(workdir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from step" in result.stderr
    # The killed run's records after the checkpoint were redone, and are logged once.
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == sorted(set(train_steps))
    for resumed, reference in zip(jax.tree.leaves(_final_params(workdir)),
                                  jax.tree.leaves(_final_params(reference_dir))):
        np.testing.assert_array_equal(resumed, reference)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_saves_and_exits_cleanly(cache_dir, tmp_path, signal_name):
    workdir = str(tmp_path / "preempted")
    # Checkpoints only at epoch ends, so a save mid-epoch can only come from the signal.
    command = _command(workdir, cache_dir, "--config.train.checkpoint_every_steps=1000")
    # Its own process group, signalled whole: Ctrl-C in a terminal reaches the grain
    # workers too.
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while (not os.path.exists(metrics) or os.path.getsize(metrics) == 0) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert f"{signal_name}: saved step" in stderr
    assert "Traceback" not in stderr and "leaked shared_memory" not in stderr, stderr[-3000:]
    stopped_at = _latest_step(workdir)
    assert 0 < stopped_at < 66 and stopped_at not in (22, 44), stopped_at
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from step {stopped_at}" in result.stderr
    assert _latest_step(workdir) == 66


def test_divergence_stops_with_a_clear_message(cache_dir, tmp_path):
    workdir = str(tmp_path / "diverged")
    result = _run(_command(workdir, cache_dir, "--config.train.learning_rate=1e12"))
    assert result.returncode != 0
    assert "Non-finite loss or gradient norm" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing non-finite was ever written.
    directory = os.path.join(workdir, "checkpoints")
    for step in (os.listdir(directory) if os.path.isdir(directory) else []):
        if step.isdigit():
            params, _ = checkpoint.load_variables(workdir, int(step))
            assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_plateau_stop_ends_the_run_and_a_restart_keeps_it_ended(cache_dir, tmp_path):
    workdir = str(tmp_path / "stalled")
    # No cut allowed, and the second evaluation cannot halve the first one's error: it stalls.
    command = _command(workdir, cache_dir, "--config.train.plateau_max_reductions=0",
                       "--config.train.plateau_patience=1", "--config.train.plateau_threshold=0.5")
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stopping at step 44: validation stalled after the last learning-rate cut" in (
        result.stdout + result.stderr)
    assert _latest_step(workdir) == 44
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resumed from step 44" in again.stderr
    assert _latest_step(workdir) == 44
