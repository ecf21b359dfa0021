"""Two real processes on localhost (jax.distributed, CPU collectives) train like one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vgg_jax.weights import run_checkpoint

# How long a process that must stop at once may take (start-up included).
_PROMPT_EXIT_S = 25

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [
    sys.executable, "main.py", "--config=configs/quickstart.py",
    "--config.model.width_divisor=16", "--config.model.fc_features=32",
    # Dropout draws its mask per position of the global batch, and two processes order
    # the batch differently (process 0's share first), so compare without it.
    "--config.model.dropout_rate=0.0",
    # Five large steps: float summation order differs between the layouts, and early
    # training amplifies rounding, so a long run would drift apart by more than rounding.
    "--config.train.num_epochs=1", "--config.train.batch_size=256",
    "--config.eval.batch_size=64", "--config.train.log_every_steps=1",
    "--config.data.num_workers=0", "--config.progress_bar=False",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", WANDB_MODE="offline", WANDB_SILENT="true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs_within(processes, timeout):
    """(stdout, stderr) of each process, which must end within `timeout` seconds; killed
    and reaped in any case."""
    try:
        return [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _start_pair(args, own_args=((), ())):
    """Starts `args` (+ `own_args[i]` on process i) as processes 0 and 1 of a two-process
    jax.distributed job."""
    port = _free_port()
    return [
        subprocess.Popen(
            args + list(own_args[index]) + [
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={index}"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(2)
    ]


def _launch_pair(args, timeout=300):
    """Runs a two-process job to the end; both processes must succeed."""
    workers = _start_pair(args)
    outputs = [worker.communicate(timeout=timeout) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "process 1 of 2" in outputs[1][1]
    return outputs


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One single-process training run, the reference for both tests."""
    root = tmp_path_factory.mktemp("multihost")
    cache = f"--config.data.cache_dir={root / 'cache'}"
    result = subprocess.run(RUN + [cache, f"--workdir={root / 'single'}"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, cache


def test_two_processes_train_like_one(single_run):
    root, cache = single_run
    _launch_pair(RUN + [cache, f"--workdir={root / 'multi'}"])

    single_vars, _, _ = run_checkpoint.load_checkpoint(str(root / "single"), "latest")
    multi_vars, _, _ = run_checkpoint.load_checkpoint(str(root / "multi"), "latest")
    for a, b in zip(jax.tree.leaves(single_vars["params"]), jax.tree.leaves(multi_vars["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Only process 0 writes metrics; the same losses, and every validation image once.
    single_log, multi_log = (
        [json.loads(line) for line in open(root / name / "metrics.jsonl")]
        for name in ("single", "multi"))
    assert [r["step"] for r in multi_log] == [r["step"] for r in single_log]
    for a, b in zip(single_log, multi_log):
        for key in ("train/loss", "val/loss", "val/top1_error"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert multi_log[-1]["val/count"] == 360


def test_two_process_evaluation_counts_every_image_once(single_run):
    root, cache = single_run
    evaluate = RUN + [cache, f"--workdir={root / 'single'}", "--mode=eval",
                      "--config.eval.protocol=dense+multi_crop", "--config.eval.scales=(32,40)"]
    results = root / "single" / "eval_results.json"
    one = subprocess.run(evaluate, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one = json.loads(results.read_text())["rows"]
    results.unlink()
    _launch_pair(evaluate)
    rows_two = json.loads(results.read_text())["rows"]
    assert len(rows_two) == len(rows_one) >= 3
    for a, b in zip(rows_one, rows_two):
        assert a["images"] == b["images"] == 360
        assert (a["protocol"], a["test_scales"]) == (b["protocol"], b["test_scales"])
        np.testing.assert_allclose(a["top1_error"], b["top1_error"], atol=1e-6)
        np.testing.assert_allclose(a["top5_error"], b["top5_error"], atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(single_run):
    root, cache = single_run
    workdir = root / "preempted"
    args = [arg for arg in RUN
            if not arg.startswith(("--config.train.num_epochs", "--config.train.batch_size"))] + [
        cache, f"--workdir={workdir}", "--config.train.num_epochs=2",
        "--config.train.batch_size=64", "--config.train.checkpoint_every_steps=1000"]
    workers = _start_pair(args)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    # The scheduler's notice may reach only one host; jax's preemption service tells the other.
    workers[1].send_signal(signal.SIGTERM)
    outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    # The common step that jax's preemption service picks may be an epoch's end (22),
    # where the run saves anyway; the run stops there all the same, on both processes.
    assert saved and saved[-1] < 44, saved
    for _, stderr in outputs:
        assert f"Preemption notice: every process stops at step {saved[-1]}." in stderr

    outputs = _launch_pair(args)
    for _, stderr in outputs:
        assert f"Resumed from step {saved[-1]}" in stderr
    final = max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert final == 44


def _empty_image_folder(data):
    """A ten-class folder data set of empty files (the layout check reads no image)."""
    for split in ("train", "val"):
        for label in range(10):
            (data / split / str(label)).mkdir(parents=True)
            (data / split / str(label) / "0.jpg").touch()
    return data


def test_a_config_error_on_one_process_stops_every_process_at_once(tmp_path):
    # The data folder exists on process 0's host only: process 1's check fails, and
    # process 0 must stop with its sentence, not wait for it in jax.distributed's start.
    data = _empty_image_folder(tmp_path / "images")
    missing = tmp_path / "not_mounted"
    workers = _start_pair(
        [sys.executable, "main.py", "--config=configs/quickstart.py",
         f"--workdir={tmp_path / 'run'}", "--config.data.source=folder",
         "--config.train.batch_size=2", "--config.progress_bar=False"],
        own_args=([f"--config.data.data_dir={data}"], [f"--config.data.data_dir={missing}"]))
    # Well within the 300 s that jax.distributed.initialize waits for a missing process.
    outputs = _outputs_within(workers, _PROMPT_EXIT_S)
    errors = [stderr.strip().splitlines()[-1] for _, stderr in outputs]
    assert errors[1].startswith("Config error on process 1 of 2: ") and str(missing) in errors[1]
    assert errors[0] == errors[1]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 1
        assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_a_second_job_on_a_busy_workdir_fails_at_once_on_every_process(tmp_path):
    # A one-process run holds the workdir: process 0's lock file is held, process 1's is
    # not, and process 1 must still fail at once with process 0's sentence, not go on.
    workdir = str(tmp_path / "busy")
    data = _empty_image_folder(tmp_path / "images")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vgg_jax.runtime import workdir_lock; "
         "lock = workdir_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
         workdir], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert holder.stdout.readline().strip() == "held"
        workers = _start_pair([
            sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
            "--config.data.source=folder", f"--config.data.data_dir={data}",
            "--config.train.batch_size=2", "--config.progress_bar=False"])
        # Well within the 30 s that a process left waiting in a collective would take.
        outputs = _outputs_within(workers, _PROMPT_EXIT_S)
    finally:
        for process in [holder, *workers]:
            process.kill()
            process.wait()
    errors = [stderr.strip().splitlines()[-1] for _, stderr in outputs]
    assert errors[0].startswith(f"Workdir error: The workdir {workdir} is in use by another "
                                f"training run (host {socket.gethostname()}, PID {holder.pid},")
    assert errors[1] == errors[0]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 1
        assert "Traceback" not in stderr


# Process 0's writers, then the first collective of training (where the others wait for it).
WRITERS_THEN_A_STEP = """
import sys
from jax.experimental import multihost_utils
from configs import base
from vgg_jax.runtime import parallel
from vgg_jax.training import writers
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[2:])
parallel.initialize_distributed(
    flags["coordinator_address"], int(flags["num_processes"]), int(flags["process_id"]))
config = base.get_config()
config.wandb.mode = "disabled"
try:
    writers.create_writer(config, sys.argv[1], is_main_process=flags["process_id"] == "0",
                          total_steps=10, initial_step=2)
except Exception as error:
    sys.exit(f"{type(error).__name__}: {error}")
multihost_utils.sync_global_devices("first step")
print("trained")
"""


def test_when_process_0_cannot_start_its_writers_every_process_stops_at_once(tmp_path):
    # A metrics file damaged in its middle: process 0 refuses to resume writing into it.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "train/lo\n{"step": 3}\n')
    workers = _start_pair([sys.executable, "-c", WRITERS_THEN_A_STEP, str(tmp_path)])
    # Well within the 30 s that a process left waiting in a collective would take.
    outputs = _outputs_within(workers, _PROMPT_EXIT_S)
    errors = [stderr.strip().splitlines()[-1] for _, stderr in outputs]
    assert errors[0].startswith("ValueError: ") and "line 2: not valid JSON" in errors[0]
    assert errors[1] == (f"PeerProcessError: Process 0 could not start its metrics writers "
                         f"({errors[0]}); see its log.")
    assert [worker.returncode for worker in workers] == [1, 1]
