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
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "quickstart.py"),
    "Config file (configs/vgg_a.py ... configs/vgg_e.py, configs/quickstart.py); "
    "a ':arg' suffix selects a variant, e.g. configs/vgg_d.py:256-512.",
    lock_config=True,
)
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


def _quiet_library_info(record) -> bool:
    """Keeps warnings from everyone but INFO lines only from our own code (at -v 0)."""
    if record.levelno >= std_logging.WARNING or logging.get_verbosity() > logging.INFO:
        return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_quiet_library_info)
    # Imported after flag parsing so that `--help` and config errors stay fast.
    import jax

    from vgg_jax import config_checks, parallel

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = flags.FLAGS.config
    workdir = _WORKDIR.value or _default_workdir()
    try:
        config_checks.validate_config(
            config, device_count=jax.device_count(), process_count=jax.process_count(),
            check_data=_MODE.value == "train",
        )
    except config_checks.ConfigError as error:
        sys.exit(f"Config error: {error}")

    logging.info("%s on %d device(s) in %d process(es); workdir %s.",
                 _MODE.value, jax.device_count(), jax.process_count(), workdir)
    if _MODE.value == "train":
        from vgg_jax import train

        try:
            train.train_and_evaluate(config, workdir)
        except FloatingPointError as error:
            sys.exit(f"Training stopped: {error}")
    else:
        from vgg_jax import evaluate

        evaluate.run_evaluation(config, workdir, step=_STEP.value)


if __name__ == "__main__":
    app.run(main)
