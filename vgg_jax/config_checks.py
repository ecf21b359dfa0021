"""Checks a run config before any work, so a mistake costs seconds, not a crashed job.

Each component owns the rules of its config section, beside the values it interprets
(`models.check_config`, `data.pipeline.check_config`, `optim.check_config`, ...);
`validate_config` only calls them, in the order of the config, and adds the one check
that reads files: that the data set exists and has the net's class count. Every failure
is one sentence that names the field and how to fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from collections.abc import Sequence

import ml_collections

from vgg_jax import preprocess
from vgg_jax.config_values import ConfigError, require
from vgg_jax.data import pipeline, sources
from vgg_jax.evaluation import protocols
from vgg_jax.localisation import training as localisation_training
from vgg_jax.models import check_config as check_model_config
from vgg_jax.models import check_frozen_layers
from vgg_jax.training import checkpoint, optim, progress, task, writers

__all__ = ["ConfigError", "command_line_mistake", "validate_config"]

def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int | None = None,
    process_count: int = 1, check_data: bool = True,
) -> None:
    """Raises ConfigError for the first field that cannot work.

    Args:
      config: the full run config.
      device_count: devices over all processes (the batch is split over them); None
        leaves `progress.check_batch_split` for later (main.py runs it once jax.distributed has
        joined the processes, which it need not wait for to find other mistakes).
      process_count: number of processes (each reads its share of every batch).
      check_data: also check that the data set exists (cheap; no image is decoded).

    Raises:
      ConfigError: with one sentence naming the field and the fix.
    """
    check_model_config(config.model, config.data.image_size)
    check_frozen_layers(config.train.get("frozen_layers", ()), config.model.version)
    pipeline.check_config(config.data)
    preprocess.check_config(config.data)
    progress.check_config(config.train)
    if device_count is not None:
        progress.check_batch_split(config.train, device_count, process_count)
    optim.check_config(config.train)
    checkpoint.check_config(config.checkpoint)
    writers.check_config(config.wandb)
    protocols.check_config(config.eval, config.data.image_size)
    task.check_config(config)  # classification or localisation (config.model.box_regression)
    if check_data:  # a training run
        _check_starting_point(config)
        localisation_training.check_data(config)  # canvases written, box files found
        _check_data_set(config)


def _check_starting_point(config: ml_collections.ConfigDict) -> None:
    """A fine-tuning stage (config.init_from_required, set by the ':384' and ':256-512'
    variants) starts from a trained net, or is told explicitly to train from scratch."""
    require(not config.get("init_from_required", False) or bool(config.init_from),
            "This config is one of the paper's fine-tuning stages (config.init_from_required="
            "True: S=384 starts from the trained S=256 net, S in [256,512] from the S=384 "
            "one, at learning rate 1e-3), so pass the run it continues as "
            "--config.init_from=<workdir>, or --config.init_from_required=False to train it "
            "from scratch.")


def _check_data_set(config: ml_collections.ConfigDict) -> None:
    """The data set can be read and has as many classes as the net has outputs."""
    try:
        sources.validate_source(config.data)
        data_classes = sources.num_classes(config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # One class trains to loss 0 and "100% accuracy" and learns nothing.
    require(data_classes >= 2,
            f"The training data ({_data_name(config.data)}) has {data_classes} class; a "
            "classifier needs two or more (one folder per class: train/<class>/*).")
    num_classes = config.model.num_classes
    require(data_classes == num_classes,
            f"config.model.num_classes={num_classes} but the data set has {data_classes} "
            f"classes; pass --config.model.num_classes={data_classes}.")


def _data_name(data_config) -> str:
    if data_config.source == "tfds":
        return f"TFDS {data_config.name}"
    if data_config.source == "folder":
        return os.path.join(str(data_config.data_dir), str(data_config.train_split))
    return str(data_config.source)


# The flag that names the config file, and the prefix of its fields' overrides.
CONFIG_FLAG = "config"


def command_line_mistake(argv: Sequence[str], default_config: str) -> str:
    """The first mistake in a command line's config flags, as one sentence, or "".

    Looks before absl and ml_collections parse the flags, so that the sentence names what
    the user typed: a --config file that is missing or fails to load, a ':variant' that
    the file does not take, an override of a field the config does not have (with the
    closest field), and a misspelt --config prefix. Values of the right fields are left to
    ml_collections, which parses and type-checks them.

    Args:
      argv: the command line, program name first.
      default_config: the config file used when --config is not given.

    Returns:
      The sentence, or "" when these checks find nothing.
    """
    flags_given = _flags_given(argv[1:])
    config_arg = next((value for name, value in reversed(flags_given) if name == CONFIG_FLAG),
                      default_config)
    config, mistake = _load_config_file(config_arg)
    if mistake:
        return mistake
    for name, _ in flags_given:
        head, _, rest = name.partition(".")
        if not rest:
            continue
        if head != CONFIG_FLAG:
            if difflib.get_close_matches(head, [CONFIG_FLAG]):
                return f"--{name} is not a flag; did you mean --{CONFIG_FLAG}.{rest}?"
            continue
        mistake = _missing_field(config, rest.split("."))
        if mistake:
            return mistake
    return ""


def _flags_given(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """(name, value) of each flag, written --name=value, --name value or --name."""
    found = []
    for index, arg in enumerate(args):
        if not arg.startswith("-") or arg == "--":
            continue
        name, equals, value = arg.lstrip("-").partition("=")
        if not equals:
            following = args[index + 1] if index + 1 < len(args) else None
            value = following if following and not following.startswith("-") else None
        found.append((name, value))
    return found


def _load_config_file(config_arg: str | None) -> tuple[ml_collections.ConfigDict | None, str]:
    """The config that `--config=FILE[:VARIANT]` names, or the sentence of why it cannot load."""
    path, _, variant = (config_arg or "").partition(":")
    if not os.path.isfile(path):
        return None, (f"--{CONFIG_FLAG}={config_arg}: there is no file {path!r}; pass one of "
                      "configs/ (e.g. --config=configs/vgg_d.py).")
    spec = importlib.util.spec_from_file_location("_config_under_check", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any failure of the user's file is reported in one line
        return None, f"--{CONFIG_FLAG}={path} does not load ({type(error).__name__}: {error})."
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        return None, f"--{CONFIG_FLAG}={path} defines no get_config(); is it a config file?"
    if variant and not inspect.signature(get_config).parameters:
        return None, (f"{path} has no variants, so ':{variant}' selects nothing; drop it "
                      "(configs with variants list them in their docstring, e.g. "
                      "configs/vgg_d.py:256-512).")
    try:
        return (get_config(variant) if variant else get_config()), ""
    except ValueError as error:  # the config's own sentence (e.g. an unknown variant)
        return None, str(error)


def _missing_field(config: ml_collections.ConfigDict, path: list[str]) -> str:
    """The sentence for an override of a field that `config` does not have, or ""."""
    node = config
    for depth, key in enumerate(path):
        if isinstance(node, ml_collections.ConfigDict) and key in node:
            node = node[key]
            continue
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        where = ".".join([CONFIG_FLAG, *path[:depth]])
        close = difflib.get_close_matches(key, fields, n=1)
        if close:
            return (f"a --config override names the field {key!r}, which the config does not "
                    f"have; did you mean {close[0]!r} (--{where}.{close[0]})?")
        listed = f"; its fields are {', '.join(sorted(fields))}" if fields else ""
        return (f"a --config override names the field {key!r}, which {where} does not "
                f"have{listed}.")
    return ""
