"""A real training run of VGG-D on an image folder: validation, a checkpoint, a SIGTERM
and a resume, timed inside the real loop (main.py, as a user runs it).

The run starts `main.py`, waits until metrics.jsonl shows `stop_at` steps, sends SIGTERM
(the loop saves the step it is at and exits), then starts the same command again, which
resumes from that checkpoint and finishes. Steps/s come from the loop's own
`train/images_per_sec` records (each a log interval, synced on the metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vgg_jax import metric_names as names

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_METRICS = "metrics.jsonl"
_CHECKPOINTS = "checkpoints"
# How often (s) the run's metrics file is read while waiting for the step to stop at.
_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class TrainRunSettings:
    """The run's shape.

    Attributes:
      batch_size: global batch.
      train_images: images in the folder's train/ split.
      num_classes: class folders of the image folder.
      epochs: epochs of the whole run (steps = epochs x train images // batch).
      eval_every_epochs: validation (and its checkpoint) cadence.
      log_every_steps: metrics cadence (the SIGTERM is sent after a log).
      stop_at: the SIGTERM goes out once this many steps are logged.
      num_workers: grain worker processes.
      overrides: more --config.* flags (tiny runs narrow the net).
    """

    batch_size: int
    train_images: int
    num_classes: int
    epochs: int
    eval_every_epochs: int
    log_every_steps: int
    stop_at: int
    num_workers: int
    overrides: tuple[str, ...] = ()


def command(folder: str, workdir: str, s: TrainRunSettings) -> list[str]:
    """The main.py command line of the run."""
    return [
        sys.executable, os.path.join(_REPO, "main.py"), "--config=configs/vgg_d.py",
        f"--workdir={workdir}", "--config.data.source=folder",
        f"--config.data.data_dir={folder}", "--config.data.eval_split=val",
        f"--config.model.num_classes={s.num_classes}",
        f"--config.train.batch_size={s.batch_size}",
        f"--config.eval.batch_size={s.batch_size}",
        f"--config.train.num_epochs={s.epochs}",
        f"--config.train.eval_every_epochs={s.eval_every_epochs}",
        f"--config.train.log_every_steps={s.log_every_steps}",
        f"--config.data.num_workers={s.num_workers}", "--config.wandb.mode=disabled",
        "--config.progress_bar=False", *s.overrides,
    ]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (none yet: [])."""
    path = os.path.join(workdir, _METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def saved_steps(workdir: str) -> list[int]:
    """The checkpoint steps on disk."""
    folder = os.path.join(workdir, _CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _logged_step(workdir: str) -> int:
    steps = [r[names.STEP] for r in read_metrics(workdir) if names.TRAIN_LOSS in r]
    return max(steps, default=0)


class Child:
    """A child process in a session of its own (a kill reaches its grain workers too),
    whose output a thread copies line by line to `log`."""

    def __init__(self, cmd: list[str], log: Callable[[str], None], env=None):
        log("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd))
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True, env=env)
        self._pump = threading.Thread(target=self._copy, args=(log,), daemon=True)
        self._pump.start()

    def _copy(self, log: Callable[[str], None]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            log(self.lines[-1])

    def finish(self, deadline: float, log: Callable[[str], None]) -> int | None:
        """Waits for the exit; kills the process group at `deadline`.

        Returns:
          The exit code, or None if it was killed.
        """
        try:
            code = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            log("time budget spent: process killed")
            code = None
        self._pump.join()
        return code


def _watch(child: Child, workdir: str, deadline: float, log: Callable[[str], None],
           records_before: int = 0, stop_at: int | None = None) -> tuple[float | None, int | None]:
    """Follows a running process's metrics until it exits (or sends SIGTERM at `stop_at`).

    Args:
      child: the process.
      workdir: its run directory.
      deadline: time.monotonic() after which it is no longer watched.
      log: where the SIGTERM line goes.
      records_before: metrics records written by earlier processes.
      stop_at: send SIGTERM once this step is logged (None: never).

    Returns:
      (seconds from the start until its first train record, None if none came; the
      logged step that triggered the SIGTERM, None if none was sent).
    """
    start, first_log = time.monotonic(), None
    while child.process.poll() is None and time.monotonic() < deadline:
        records = read_metrics(workdir)[records_before:]
        if first_log is None and any(names.TRAIN_LOSS in r for r in records):
            first_log = time.monotonic() - start
        logged = _logged_step(workdir)
        if stop_at is not None and logged >= stop_at:
            log(f"train run: step {logged} logged, sending SIGTERM")
            child.process.send_signal(signal.SIGTERM)
            return first_log, logged
        time.sleep(_POLL_S)
    return first_log, None


def clean_rates(records: list[dict[str, Any]], restarts: tuple[int, ...] = ()) -> list[float]:
    """The loop's images/s of the log intervals that hold only training steps.

    Args:
      records: metrics.jsonl records, in file order.
      restarts: indices in `records` where a new process began writing.

    Returns:
      The train records' images/s, leaving out each process's first interval (start-up
      and compilation) and every interval that follows a validation.
    """
    values, skip = [], True
    for i, record in enumerate(records):
        if i in restarts or names.VAL_TOP1_ERROR in record:
            skip = True
        if names.TRAIN_IMAGES_PER_SEC in record:
            if not skip:
                values.append(record[names.TRAIN_IMAGES_PER_SEC])
            skip = False
    return values


def rates(records: list[dict[str, Any]], batch_size: int,
          restarts: tuple[int, ...] = ()) -> dict[str, Any]:
    """Steps/s inside the loop from its train records (median, best, how many).

    Args:
      records: metrics.jsonl records, in file order.
      batch_size: the global batch.
      restarts: indices in `records` where a new process began writing.

    Returns:
      {"images_per_s_median", "images_per_s_max", "steps_per_s_median", "log_intervals"}
      over `clean_rates`.
    """
    values = clean_rates(records, restarts)
    if not values:
        return {"images_per_s_median": None, "images_per_s_max": None,
                "steps_per_s_median": None, "log_intervals": 0}
    median = statistics.median(values)
    return {"images_per_s_median": median, "images_per_s_max": max(values),
            "steps_per_s_median": median / batch_size, "log_intervals": len(values)}


def run(folder: str, workdir: str, s: TrainRunSettings, deadline: float,
        log: Callable[[str], None] = print,
        on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains, stops with SIGTERM, resumes and finishes; returns what each phase showed.

    Args:
      folder: the image folder (train/ and val/ with `s.num_classes` classes).
      workdir: the run's directory (fresh).
      s: the run's shape.
      deadline: time.monotonic() by which both processes must be done (else killed).
      log: where the processes' output lines go.
      on_progress: called with the figures of the first process once it has ended (so
        that they can be written before the second one starts).

    Returns:
      The "train_run" JSON (see docs/benchmarks.md).
    """
    cmd = command(folder, workdir, s)
    start = time.monotonic()
    first = Child(cmd, log)
    first_log_s, signalled_at = _watch(first, workdir, deadline, log, stop_at=s.stop_at)
    first_code = first.finish(deadline, log)
    after_first = saved_steps(workdir)
    first_records = len(read_metrics(workdir))
    first_s = time.monotonic() - start
    result = {
        "command": " ".join(cmd[1:]), "sigterm_after_step": signalled_at,
        "first_exit_code": first_code, "checkpoints_after_sigterm": after_first,
        "first_process_s": first_s, "first_log_s": [first_log_s],
    }
    if on_progress is not None:
        on_progress(dict(result, ok=False))
    second = Child(cmd, log)
    second_log_s, _ = _watch(second, workdir, deadline, log, records_before=first_records)
    second_code, lines = second.finish(deadline, log), second.lines
    records = read_metrics(workdir)
    train_steps = [r[names.STEP] for r in records if names.TRAIN_LOSS in r]
    val = [r for r in records if names.VAL_TOP1_ERROR in r]
    resumed = [line for line in lines if "Resumed from step" in line]
    final_step = max(saved_steps(workdir), default=None)
    total_steps = s.epochs * (s.train_images // s.batch_size)
    result.update({
        "first_log_s": [first_log_s, second_log_s],
        "resumed": bool(resumed), "resume_line": resumed[0] if resumed else None,
        "second_exit_code": second_code,
        "final_checkpoint_step": final_step,
        "total_steps": total_steps,
        "last_logged_step": max(train_steps, default=None),
        "validations": len(val),
        "last_validation": val[-1] if val else None,
        "wall_s": time.monotonic() - start,
        **rates(records, s.batch_size, (first_records,)),
        "ok": (first_code == 0 and bool(after_first) and bool(resumed) and second_code == 0
               and bool(val) and final_step == total_steps),
    })
    return result
