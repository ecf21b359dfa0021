"""vgg-jax entry point: flags -> a validated config -> train or evaluate.

  python main.py                                        # offline quickstart (digits)
  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d \
      --config.data.data_dir=/data/tensorflow_datasets --config.train.batch_size=128
  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d --mode=eval \
      --config.eval.protocol=dense --config.eval.scales=256,384,512
  python main.py --config=configs/vgg_d.py --mode=eval --weights=vgg16 \
      --config.eval.protocol=single_crop          # pretrained weights, no training

Every config field can be overridden with --config.<section>.<field>=<value>.
"""

import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vgg_jax import config_checks
from vgg_jax.evaluation import run
from vgg_jax.localisation import run as localisation_run
from vgg_jax.models import is_box_regressor
from vgg_jax.runtime import console, parallel, stop_signals, workdir_lock
from vgg_jax.training import loop, progress, warm_start
from vgg_jax.weights import specs

_HERE = os.path.dirname(os.path.abspath(__file__))

def _error_text(error: BaseException) -> str:
    """The last line of a flag or config failure's message (the rest is its traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "quickstart.py")
# Our own look at the config flags first (a missing file or variant, an unknown field, a
# misspelt --config), so that the sentence names what was typed: ml_collections applies
# the overrides of the default file while it is defined below, and says less.
_MISTAKE = config_checks.command_line_mistake(sys.argv, _DEFAULT_CONFIG)
if _MISTAKE:
    sys.exit(f"Config error: {_MISTAKE}")
try:
    # Loads the default file right away; the command line's overrides apply when parsed.
    config_flags.DEFINE_config_file(
        config_checks.CONFIG_FLAG, _DEFAULT_CONFIG,
        "Config file (configs/vgg_a.py ... configs/vgg_e.py, configs/quickstart.py); "
        "a ':arg' suffix selects a variant, e.g. configs/vgg_d.py:256-512.",
        lock_config=True,
    )
except Exception as error:  # the default file itself does not load
    sys.exit(f"Config error: {_error_text(error)}")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and logs; default runs/<config name>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_STEP = flags.DEFINE_string(
    "step", None, "--mode=eval: checkpoint step to evaluate (a number, 'best' or 'latest').")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "--mode=eval: the net to evaluate instead of the workdir's checkpoint: "
    "any weights spec (vgg16 ... vgg19_bn, hf-hub:ORG/NAME[@REVISION], a .safetensors, .npz, "
    ".pth or .caffemodel file, a run's DIR[@STEP]); results go to --workdir, by default "
    "runs/eval_<name>. A spec given as --workdir is evaluated the same way.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (default: auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Multi-host: number of processes (default: auto-detect).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "Multi-host: index of this process (default: auto-detect).")


def _weights() -> str | None:
    """--mode=eval's weights other than the workdir's checkpoint: --weights, or a spec that
    --workdir names in place of a run (vgg16, a weight file, hf-hub:ORG/NAME)."""
    if _WEIGHTS.value or _MODE.value != "eval" or not _WORKDIR.value:
        return _WEIGHTS.value
    try:
        is_run = specs.parse(_WORKDIR.value).kind == specs.RUN
    except ValueError:  # no such path: the evaluation says so
        return None
    return None if is_run else _WORKDIR.value


def _workdir() -> str:
    """Where results go: --workdir (unless it names weights), else runs/<config name>, or
    runs/eval_<name> for an evaluation of weights."""
    weights = _weights()
    if _WORKDIR.value and _WORKDIR.value != weights:
        return _WORKDIR.value
    if weights:
        return os.path.join("runs", "eval_" + specs.short_name(weights))
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    stem = os.path.splitext(os.path.basename(name.split(":")[0]))[0]
    return os.path.join("runs", stem)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a failure reported in one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:  # e.g. a value of the wrong type
        sys.exit(f"Config error: {_error_text(error)}")


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
        return None, _error_text(error)


def _config_mistake(config) -> str:
    """The config's first mistake but the batch split (which needs the devices), or ""."""
    try:
        # Fields the config leaves to the checkpoint it starts from, and that checkpoint's
        # preprocessing unless the command line sets it.
        if _WEIGHTS.value:
            _check_weights(_WEIGHTS.value)
        evaluated = (_weights() or _workdir()) if _MODE.value == "eval" else None
        for line in warm_start.resolve_config(config, _command_line_fields(sys.argv), evaluated):
            logging.info(line)
        config_checks.validate_config(config, check_data=_MODE.value == "train")
    except config_checks.ConfigError as error:
        return str(error)
    return ""


def _check_weights(weights: str) -> None:
    """--weights: evaluation only, and a spec that names something (nothing is loaded)."""
    if _MODE.value != "eval":
        raise config_checks.ConfigError(
            "--weights names the net to evaluate (--mode=eval); to train from weights, "
            f"pass --config.init_from={weights}.")
    try:
        specs.parse(weights, _STEP.value)
    except ValueError as error:
        raise config_checks.ConfigError(f"--weights={weights}: {error}") from None


def _agreed_config_error(config, mistake: str) -> str:
    """The job's first config error in one line, the same on every process ("" if none).

    Runs once jax.distributed has joined the processes: a process whose check failed (a
    data folder missing on its host alone, an override given to it alone) has still
    joined, so the others stop here with its sentence instead of waiting for it until
    jax's start-up timeout ends them with an unrelated error.
    """
    if not mistake and config is not None and _MODE.value == "train":
        try:
            progress.check_batch_split(config.train, jax.device_count(), jax.process_count())
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
    console.quiet_library_logs()
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
    workdir = _workdir()
    try:
        logging.info("%s on %d device(s) in %d process(es); workdir %s.",
                     _MODE.value, jax.device_count(), jax.process_count(), workdir)
        if _MODE.value == "train":
            loop.train_and_evaluate(config, workdir)
        elif is_box_regressor(config):  # a box net: the paper's localisation protocols
            localisation_run.run_localisation(config, workdir, step=_STEP.value)
        else:
            run.run_evaluation(config, workdir, step=_STEP.value, weights=_weights())
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
