
"""main.py end to end in real subprocesses: the quickstart path, resume after SIGKILL,
preemption by SIGTERM, and the divergence guard."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vgg_jax.weights import run_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How long a killed run's workers and resource tracker may take to end (the watchdog polls
# every 0.5 s; a loaded machine is slower).
_ORPHANS_EXIT_S = 15
# How often a test reads the memory maps of a run it is about to kill.
_MAPS_EVERY_S = 0.1
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
    variables, _, _ = run_checkpoint.load_checkpoint(workdir, "latest")
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
    output = result.stdout + result.stderr
    # The silence of the first step's compilation is announced, before any step is logged.
    assert 0 <= output.find("Compiling the train step") < output.find("step 5 |"), output[-3000:]
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
    # No bound on what 3 epochs of a width/16 net learn (0.60-0.91 error over 8 seeds): the
    # error counts whole images of the 360, and the learning itself is test_train's.
    errors = 360 * np.array([r["val/top1_error"] for r in evaluations])
    np.testing.assert_allclose(errors, np.round(errors), atol=1e-6)
    assert all(0 <= e <= 360 for e in errors)
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


def _data_workers(pids):
    """The processes among `pids` that multiprocessing spawned (grain's data workers)."""
    workers = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(pid)
        except OSError:  # ended meanwhile
            continue
    return workers


def _shared_memory_mapped_by(pids):
    """The inodes of the /dev/shm entries that `pids` map: multiprocessing's semaphores
    (sem.mp-*, mapped under the temporary name glibc created them with), grain's batch
    blocks (psm_*), multiprocessing's heap arenas."""
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:  # ended meanwhile
            continue
        for line in lines:
            fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                inodes.add(int(fields[4]))
    return inodes


def _assert_nothing_of_the_run_is_left(session_id, shared_memory):
    """Waits for the processes of a killed run's session to end (the workers notice their
    parent's death within a second and exit; then the resource tracker frees what they
    held and exits too), kills any that do not, and checks that none of the /dev/shm
    entries the run mapped (by inode) is left."""
    deadline = time.time() + _ORPHANS_EXIT_S
    while _live_processes_of_session(session_id) and time.time() < deadline:
        time.sleep(0.2)
    stranded = _live_processes_of_session(session_id)
    for pid in stranded:  # so a failure does not strand them for the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert not stranded, f"processes of the killed run still alive: {stranded}"
    left = []
    for name in os.listdir("/dev/shm"):
        with contextlib.suppress(OSError):  # another program's entry, gone meanwhile
            if os.stat(f"/dev/shm/{name}").st_ino in shared_memory:
                left.append(name)
    assert not left, f"shared memory of the killed run left in /dev/shm: {left}"


def test_sigkill_then_resume_is_bit_identical(reference_run, cache_dir, tmp_path):
    reference_dir, _ = reference_run
    workdir = str(tmp_path / "killed")
    # Two workers (the stream is the same for any number); its own session, so that every
    # process the run starts (workers, the multiprocessing resource tracker) can be found
    # after the kill.
    command = _command(workdir, cache_dir, "--config.data.num_workers=2")
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, shared_memory = time.time() + 240, set()
    while _latest_step(workdir) < 10 and process.poll() is None and time.time() < deadline:
        shared_memory |= _shared_memory_mapped_by(_live_processes_of_session(process.pid))
        time.sleep(_MAPS_EVERY_S)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _latest_step(workdir)
    assert 10 <= killed_at < 66, f"the run was not killed mid-way (latest step {killed_at})"
    assert shared_memory, "no shared memory of the run was seen"
    _assert_nothing_of_the_run_is_left(process.pid, shared_memory)

    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from step" in result.stderr
    # The killed run's records after the checkpoint were redone, and are logged once.
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == sorted(set(train_steps))
    for resumed, reference in zip(jax.tree.leaves(_final_params(workdir)),
                                  jax.tree.leaves(_final_params(reference_dir))):
        np.testing.assert_array_equal(resumed, reference)


@pytest.mark.parametrize("workers_started", [1, 2])
def test_no_process_or_shared_memory_outlives_a_trainer_killed_as_a_worker_starts(
        cache_dir, tmp_path, workers_started):
    # The moment a spawned worker exists it is still importing its modules (seconds), and
    # only then runs its init function and the watchdog: a trainer killed in between must
    # not leave it behind, re-parented, waiting on its queue for ever.
    workdir = str(tmp_path / "killed_at_start")
    process = subprocess.Popen(
        _command(workdir, cache_dir, "--config.data.num_workers=2",
                 "--config.wandb.mode=disabled"),
        cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline, shared_memory, workers, looked = time.time() + 240, set(), [], 0.0
    while len(workers) < workers_started and process.poll() is None and time.time() < deadline:
        pids = _live_processes_of_session(process.pid)
        workers = _data_workers(pids)
        if len(workers) >= workers_started or time.time() > looked + _MAPS_EVERY_S:
            shared_memory |= _shared_memory_mapped_by(pids)
            looked = time.time()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(workers) == workers_started, "the run ended before its workers started"
    assert shared_memory, "no shared memory of the run was seen"
    _assert_nothing_of_the_run_is_left(process.pid, shared_memory)


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
    if signal_name == "SIGINT":
        return  # the resume from a signal's save is the same for both: checked once
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
            params, _, _ = run_checkpoint.load_checkpoint(workdir, int(step))
            assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_plateau_stop_ends_the_run_and_a_restart_keeps_it_ended(cache_dir, tmp_path):
    workdir = str(tmp_path / "stalled")
    # No cut allowed, and the second evaluation would have to take 99% off the first one's
    # error to count as an improvement: it stalls, however the first two epochs went.
    command = _command(workdir, cache_dir, "--config.train.plateau_max_reductions=0",
                       "--config.train.plateau_patience=1", "--config.train.plateau_threshold=0.99")
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stopping at step 44: validation stalled after the last learning-rate cut" in (
        result.stdout + result.stderr)
    assert _latest_step(workdir) == 44
    # Rerun with more epochs: it says at once why it does not go on, restoring nothing.
    again = _run(command + ["--config.train.num_epochs=5"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert ("The plateau rule stopped this run at step 44 (validation stalled with no "
            "learning-rate cut left, 0 made: the paper's end of training), so a larger "
            "config.train.num_epochs does not continue it") in again.stderr
    assert "Finished at step 44; last validation: top-1 error" in again.stderr
    assert "Resumed from step" not in again.stderr
    assert _latest_step(workdir) == 44


def test_a_finished_run_says_so_at_once_and_other_settings_stop_a_rerun_moving_nothing(
        reference_run, cache_dir, tmp_path):
    reference_dir, _ = reference_run
    workdir = str(tmp_path / "rerun")
    shutil.copytree(reference_dir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    steps, metrics = sorted(os.listdir(checkpoints)), open(metrics_file).read()
    # The same command again: the run is over; it says so without restoring anything.
    again = _run(_command(workdir, cache_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Finished at step 66; last validation: top-1 error" in again.stderr
    assert "Resumed from step" not in again.stderr
    # More epochs with clipping switched on: the optimiser keeps other arrays, so the
    # checkpoints cannot continue under it. They are sound: nothing is moved, and the run
    # stops before any work, naming the setting.
    changed = _run(_command(workdir, cache_dir, "--config.train.num_epochs=4",
                            "--config.train.grad_clip_norm=1.0"))
    assert changed.returncode == 1
    last_line = changed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"Config error: {workdir} holds a run saved with other "
                                "settings, config.train.grad_clip_norm=1.0 (saved: 0.0), "
                                "which change the arrays it keeps"), last_line
    assert "Traceback" not in changed.stderr and "does not restore" not in changed.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints.damaged"))
    assert sorted(os.listdir(checkpoints)) == steps
    assert open(metrics_file).read() == metrics


def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_broken_checkpoints_are_moved_aside_and_the_newest_intact_step_resumes(
        reference_run, cache_dir, tmp_path):
    reference_dir, _ = reference_run
    workdir = str(tmp_path / "damaged")
    shutil.copytree(reference_dir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    damaged = os.path.join(workdir, "checkpoints.damaged")
    assert {65, 66} <= {int(name) for name in os.listdir(checkpoints) if name.isdigit()}

    # Step 66 without orbax's commit metadata (a copy cut short): orbax counted the step,
    # so the run resumed from 65 and then failed for ever to save 66 again.
    os.remove(os.path.join(checkpoints, "66", run_checkpoint.COMPLETE_MARKER))
    result = _run(_command(workdir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoint step 66 was never finished" in result.stderr
    assert "Resumed from step 65" in result.stderr
    assert _latest_step(workdir) == 66

    # Then a data file of step 66's parameters cut short (a full disk, a bad copy).
    with open(_largest_file(os.path.join(checkpoints, "66", "params")), "r+b") as f:
        f.truncate(100)
    result = _run(_command(workdir, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoint step 66 does not restore (" in result.stderr
    assert f"moved it to {os.path.join(damaged, '66.1')}" in result.stderr
    assert "Resumed from step 65" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Nothing deleted: both broken copies moved aside, and step 66 saved again.
    assert sorted(os.listdir(damaged)) == ["66", "66.1"]
    assert _latest_step(workdir) == 66
    for resumed, reference in zip(jax.tree.leaves(_final_params(workdir)),
                                  jax.tree.leaves(_final_params(reference_dir))):
        np.testing.assert_array_equal(resumed, reference)


def test_a_second_run_into_a_busy_workdir_fails_at_once_naming_the_holder(cache_dir, tmp_path):
    workdir = str(tmp_path / "busy")
    # The holder: a real process holding the workdir's lock as a training run does.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vgg_jax.runtime import workdir_lock; "
         "lock = workdir_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
         workdir], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _run(_command(workdir, cache_dir))
        assert result.returncode == 1
        assert "is in use by another training run" in result.stderr
        assert f"PID {holder.pid}," in result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # no work done
    finally:
        # A killed holder leaves no stale lock: the kernel dropped it with the process.
        holder.kill()
        holder.wait()
    from vgg_jax.runtime import workdir_lock

    workdir_lock.acquire(workdir).release()


def _make_unwritable(directory):
    """An immutable directory (even root cannot write into it), or one without write
    permission where chattr is not allowed; returns the undo command."""
    if subprocess.run(["chattr", "+i", directory], capture_output=True).returncode == 0:
        return ["chattr", "-i", directory]
    if os.geteuid() == 0:
        pytest.skip("needs chattr +i or a non-root user to make a directory unwritable")
    os.chmod(directory, 0o555)
    return ["chmod", "755", directory]


def test_an_unwritable_workdir_fails_in_one_sentence_before_any_work(cache_dir, tmp_path):
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    undo = _make_unwritable(str(workdir))
    try:
        result = _run(_command(str(workdir), cache_dir))
    finally:
        subprocess.run(undo, check=True)
    assert result.returncode == 1
    assert f"Workdir error: Cannot write to the workdir {workdir}" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(workdir) == []


def test_a_second_ctrl_c_exits_at_once_quietly_with_status_130(cache_dir, tmp_path):
    workdir = str(tmp_path / "interrupted")
    process = subprocess.Popen(_command(workdir, cache_dir), cwd=ROOT, env=_env(),
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while (not os.path.exists(metrics) or os.path.getsize(metrics) == 0) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stderr = []
    for line in process.stderr:  # the first Ctrl-C is acknowledged; then press it again
        stderr.append(line)
        if line.startswith("Ctrl-C: saving after this step"):
            os.killpg(process.pid, signal.SIGINT)
            break
    stderr.append(process.stderr.read())
    process.wait(timeout=60)
    stderr = "".join(stderr)
    assert process.returncode == 130, stderr[-3000:]
    assert "Ctrl-C again: stopped without saving." in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    # What the run held in shared memory was freed by it, not by the resource tracker
    # after it (which reports it as leaked).
    assert "leaked" not in stderr, stderr[-3000:]
    deadline = time.time() + 10
    while _live_processes_of_session(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _live_processes_of_session(process.pid)
