"""vgg-jax entry point: flags -> a validated config -> train or evaluate.

  python main.py                                        # offline quickstart (digits)
  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d \
      --config.data.data_dir=/data/tensorflow_datasets --config.train.batch_size=128
  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d --mode=eval \
      --config.eval.protocol=dense --config.eval.scales=256,384,512

Every config field can be overridden with --config.<section>.<field>=<value>.
"""

import logging as std_logging
import os
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vgg_jax import config_checks
from vgg_jax.config_checks import renamed_field_message
from vgg_jax.evaluation import run
from vgg_jax.localisation import run as localisation_run
from vgg_jax.models import is_box_regressor
from vgg_jax.runtime import parallel, stop_signals, workdir_lock
from vgg_jax.training import loop, warm_start

_HERE = os.path.dirname(os.path.abspath(__file__))

def _last_line(error: BaseException) -> str:
    """The innermost message of a config loading failure, without its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])  # the message, not its class


def _config_error_text(error: BaseException) -> str:
    text = str(error)
    for field in re.findall(r"'(?:config\.)?([\w.]+)'|\"(\w+)\"", text):
        message = renamed_field_message(field[0] or field[1])
        if message:  # a field an older version had
            return message
    unknown = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if unknown:
        return (f"a --config override names the field {unknown.group(2)!r}, which the config "
                f"does not have; did you mean {unknown.group(1)!r}?")
    if isinstance(error, AttributeError):
        return f"a --config override names a field the config does not have ({_last_line(error)})."
    return _last_line(error)


try:
    # Parses the default file with the command line's --config.* overrides right away.
    config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "quickstart.py"),
        "Config file (configs/vgg_a.py ... configs/vgg_e.py, configs/quickstart.py); "
        "a ':arg' suffix selects a variant, e.g. configs/vgg_d.py:256-512.",
        lock_config=True,
    )
except Exception as error:  # an override the config cannot take
    sys.exit(f"Config error: {_config_error_text(error)}")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and logs; default runs/<config name>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_STEP = flags.DEFINE_string(
    "step", None, "--mode=eval: checkpoint step to evaluate (a number, 'best' or 'latest').")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (default: auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Multi-host: number of processes (default: auto-detect).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "Multi-host: index of this process (default: auto-detect).")


def _default_workdir() -> str:
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    stem = os.path.splitext(os.path.basename(name.split(":")[0]))[0]
    return os.path.join("runs", stem)


# Libraries whose INFO logs (one line per checkpoint phase) would bury the progress output.
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/jax/")
# orbax warnings that describe what evaluation does on purpose: it opens checkpoints read
# only (never cleaning up a running job's directory) and restores the parameters alone.
_EXPECTED_ORBAX_WARNINGS = (
    "read_only=True", "Given directory is read only", "was found in the checkpoint, but could "
    "not be restored")


def _quiet_library_info(record) -> bool:
    """Keeps warnings from everyone but INFO lines only from our own code (at -v 0)."""
    if logging.get_verbosity() > logging.INFO:
        return True
    if record.levelno >= std_logging.WARNING:
        return not ("/orbax/" in record.pathname and any(
            text in record.getMessage() for text in _EXPECTED_ORBAX_WARNINGS))
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config-file failures reported in one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    # An override of a field that a --config file lacks raises ml_collections' own lookup
    # error while its flag is parsed.
    except (flags.Error, AttributeError, KeyError) as error:
        sys.exit(f"Config error: {_config_error_text(error)}")


def _command_line_fields(argv: list[str]) -> set[str]:
    """The config fields given on the command line ("data.mean_rgb", ...)."""
    prefix = "--config."
    return {arg[len(prefix):].split("=")[0] for arg in argv if arg.startswith(prefix)}


def _load_config():
    """The config and "", or None and the loading failure's sentence."""
    # ml_collections applies the file and its overrides lazily, at this first access.
    try:
        config = flags.FLAGS.config
        config.keys()  # a file that failed to load raises only when first used
        return config, ""
    except Exception as error:  # any loading failure is the user's input
        return None, _config_error_text(error)


def _config_mistake(config) -> str:
    """The config's first mistake but the batch split (which needs the devices), or ""."""
    try:
        # Fields the config leaves to the checkpoint it starts from, and that checkpoint's
        # preprocessing unless the command line sets it.
        evaluated = (_WORKDIR.value or _default_workdir()) if _MODE.value == "eval" else None
        for line in warm_start.resolve_config(config, _command_line_fields(sys.argv), evaluated):
            logging.info(line)
        config_checks.validate_config(config, check_data=_MODE.value == "train")
    except config_checks.ConfigError as error:
        return str(error)
    return ""


def _agreed_config_error(config, mistake: str) -> str:
    """The job's first config error in one line, the same on every process ("" if none).

    Runs once jax.distributed has joined the processes: a process whose check failed (a
    data folder missing on its host alone, an override given to it alone) has still
    joined, so the others stop here with its sentence instead of waiting for it until
    jax's start-up timeout ends them with an unrelated error.
    """
    if not mistake and config is not None:
        try:
            loop.check_batch_split(config.train, jax.device_count(), jax.process_count())
        except config_checks.ConfigError as error:
            mistake = str(error)
    line = ""
    if mistake:
        # The hosts' files and command lines may differ, so name the one that failed.
        where = (f" on process {jax.process_index()} of {jax.process_count()}"
                 if jax.process_count() > 1 else "")
        line = f"Config error{where}: {mistake}"
    return parallel.first_failure("config", line)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value; "
                 "see --helpshort).")
    logging.get_absl_handler().addFilter(_quiet_library_info)
    config, mistake = _load_config()
    if not mistake:
        mistake = _config_mistake(config)
    if mistake and not parallel.joins_several_processes(_COORDINATOR.value, _NUM_PROCESSES.value):
        sys.exit(f"Config error: {mistake}")  # one process: before any work, no backend
    if _NUM_PROCESSES.value > 1 or _COORDINATOR.value:
        logging.info("Joining %s processes through coordinator %s ...",
                     _NUM_PROCESSES.value or "auto-detected", _COORDINATOR.value or "auto")
    try:
        parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as error:
        sys.exit(f"Multi-host error: {error}")
    config_error = _agreed_config_error(config, mistake)
    if config_error:
        sys.exit(config_error)
    workdir = _WORKDIR.value or _default_workdir()
    try:
        logging.info("%s on %d device(s) in %d process(es); workdir %s.",
                     _MODE.value, jax.device_count(), jax.process_count(), workdir)
        if _MODE.value == "train":
            loop.train_and_evaluate(config, workdir)
        elif is_box_regressor(config):  # a box net: the paper's localisation protocols
            localisation_run.run_localisation(config, workdir, step=_STEP.value)
        else:
            run.run_evaluation(config, workdir, step=_STEP.value)
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")
    except FloatingPointError as error:
        sys.exit(f"Training stopped: {error}")
    except workdir_lock.WorkdirError as error:
        sys.exit(f"Workdir error: {error}")
    except parallel.PeerProcessError as error:  # the failing process printed the details
        sys.exit(f"Error: {error}")
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal
        print("Interrupted.", file=sys.stderr)
        sys.exit(stop_signals.INTERRUPTED_EXIT_STATUS)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        # Bad input found once work started (a missing checkpoint, a wrong path, a layer
        # name): one line; the traceback is there for a bug report at --verbosity=1.
        logging.debug("".join(traceback.format_exception(error)))
        sys.exit(f"Error: {error} (for the traceback, rerun with --verbosity=1)")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
