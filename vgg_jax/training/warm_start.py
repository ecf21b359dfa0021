"""Starting a run from another net's weights: `config.init_from`.

Three uses, one mechanism:

- the paper's chain of nets: B-E start from a trained net A (its first four conv layers and
  its three FC layers, 3.1), and the S=384 and jittered nets from the S=256 one (every
  layer);
- fine-tuning on other images (configs/finetune.py): every layer of equal shape is copied,
  so a head with another class count (fc8) starts fresh;
- pretrained weights in either role: `init_from` takes any weights spec
  (vgg_jax.weights.specs): vgg16, hf-hub:ORG/NAME, a .safetensors/.npz/.pth/.caffemodel
  file, a run's DIR[@STEP].

What it promises: the layers copied and every layer skipped, with its reason, are logged;
a warm start that copies nothing stops the run; the source's preprocessing (mean and std)
is inherited unless the command line sets it; fields a config leaves unset (None) are
taken from the source's run (or the weights' description), so configs/finetune.py needs
no architecture flags.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax.config_values import ConfigError, string_list
from vgg_jax.data import sources
from vgg_jax.models import (
    BN_SUFFIX,
    canonical_version,
    create_model_from_config,
    select_layers,
)
from vgg_jax.weights import specs

# The paper's initialisation of the deeper nets from net A (3.1): A's first four conv
# layers and its three FC layers, named as in the deeper net.
PAPER_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
# The nets the paper started deeper nets from, and those it started from net A.
_PAPER_SOURCES = frozenset({"A", "A_LRN"})
_PAPER_TARGETS = frozenset({"B", "C", "D", "E"})
# Fields a config may leave None: taken from the source's run config.
INHERITABLE_FIELDS = (
    "model.version", "model.width_divisor", "model.fc_features", "model.batch_norm",
    "data.image_size", "data.train_scale_min", "data.train_scale_max",
)
# The input normalisation the source's weights were trained with.
PREPROCESSING_FIELDS = ("data.mean_rgb", "data.std_rgb")


class LayerCopy(NamedTuple):
    """What `copy_layers` did.

    Attributes:
      params: the new parameters.
      copied: parameter groups copied (a conv's batch norm follows its conv).
      skipped: layer -> why it keeps its fresh initialisation.
    """

    params: dict[str, Any]
    copied: list[str]
    skipped: dict[str, str]


def check_path(path: str) -> None:
    """Fails with the fix when `config.init_from` names no weights (nothing is loaded).

    Args:
      path: config.init_from, any weights spec (vgg_jax.weights.specs).

    Raises:
      ConfigError: for a path that does not exist or a spec of no known form.
    """
    try:
        specs.parse(path)
    except ValueError as error:
        raise ConfigError(f"config.init_from={path!r}: {error}") from None


def _load(path: str, shapes_only: bool = False):
    check_path(path)
    try:
        return specs.load(path, shapes_only=shapes_only)
    except ValueError as error:
        raise ConfigError(f"config.init_from={path!r}: {error}") from None


def source_config(path: str) -> ml_collections.ConfigDict:
    """The run config of the weights `init_from` names (no weight values are read).

    Args:
      path: a weights spec: a run's workdir, a weight file, a hub model.

    Returns:
      The config of the run that wrote the step `initialise` would load, or the weights'
      description (their net and preprocessing) for weights from elsewhere.

    Raises:
      ConfigError: if the spec names nothing loadable.
    """
    check_path(path)
    try:
        # The config alone: resolve_config runs before jax.distributed starts.
        return specs.load_config(path)
    except ValueError as error:
        raise ConfigError(f"config.init_from={path!r}: {error}") from None


def _get(config, path: str) -> Any:
    section, field = path.split(".")
    return config[section].get(field) if section in config else None


def resolve_config(config: ml_collections.ConfigDict, command_line: Collection[str] = (),
                   evaluated: str | None = None) -> list[str]:
    """Completes a config from its `init_from` source, in place, before any check or work.

    Unset (None) INHERITABLE_FIELDS take the source's values, and so do the
    PREPROCESSING_FIELDS unless `command_line` names them: weights only compute what they
    learned on inputs normalised as in their training. An unset model.num_classes becomes
    the data set's class count.

    Args:
      config: the run config (its values may change; its structure does not).
      command_line: fields set on the command line ("data.mean_rgb", ...), which win.
      evaluated: --mode=eval's workdir: without init_from, unset fields come from its
        checkpoint (evaluation takes the net from there anyway).

    Returns:
      Lines to log, saying what was taken from where.

    Raises:
      ConfigError: for a missing or unusable source, or a None field with no source.
    """
    lines = []
    unset = [path for path in INHERITABLE_FIELDS if _get(config, path) is None]
    origin = config.init_from or (evaluated if unset else None)
    if origin:
        source = source_config(origin)
        for path in unset:
            value = _get(source, path)
            if value is None:
                raise ConfigError(f"config.{path} is unset and the run in {origin!r} does not "
                                  f"record it; pass --config.{path}.")
            _set(config, path, value)
        if unset:
            lines.append(f"From {origin}: " + ", ".join(
                f"{path}={_get(config, path)!r}" for path in unset) + ".")
        if config.init_from:
            lines.append(_inherit_preprocessing(config, source, command_line))
    elif unset:
        raise ConfigError(
            f"config.{unset[0]} is unset: this config takes the net from the checkpoint it "
            "starts from; pass --config.init_from=<workdir or converted weights>.")
    if evaluated is None and not config.init_from and string_list(
            config.train.get("frozen_layers", ())):
        raise ConfigError(
            "config.train.frozen_layers is set without config.init_from, so the frozen layers "
            "would keep their random initialisation; pass --config.init_from=<workdir>.")
    if config.model.get("num_classes") is None:
        try:
            config.model.num_classes = sources.num_classes(config.data)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        lines.append(f"model.num_classes={config.model.num_classes}, the data set's classes.")
    return lines


def _set(config, path: str, value: Any) -> None:
    section, field = path.split(".")
    config[section][field] = tuple(value) if isinstance(value, list) else value


def _inherit_preprocessing(config, source, command_line: Collection[str]) -> str:
    own = [path for path in PREPROCESSING_FIELDS if path in command_line]
    theirs = {path: tuple(_get(source, path) or (1.0, 1.0, 1.0)) for path in PREPROCESSING_FIELDS}
    for path in PREPROCESSING_FIELDS:
        if path not in own:
            _set(config, path, theirs[path])
    rounded = lambda values: tuple(round(float(v), 4) for v in values)
    values = ", ".join(f"{path.split('.')[1]}={rounded(_get(config, path))}"
                       for path in PREPROCESSING_FIELDS)
    if own:
        trained = ", ".join(f"{path.split('.')[1]}={rounded(theirs[path])}" for path in own)
        return (f"Preprocessing {values}: {', '.join(own)} from the command line (the weights "
                f"of {config.init_from} were trained with {trained}).")
    return (f"Preprocessing {values}, inherited from {config.init_from} (its weights were "
            "trained with it); --config.data.mean_rgb / std_rgb override it.")


def default_layers(source_version: str, version: str) -> tuple[str, ...]:
    """The layers copied when config.init_from_layers is empty.

    Args:
      source_version: the source net's configuration.
      version: this net's.

    Returns:
      PAPER_LAYERS from net A into a deeper net (the paper's choice); () otherwise,
      meaning every layer of equal shape.
    """
    source, target = canonical_version(source_version), canonical_version(version)
    return PAPER_LAYERS if source in _PAPER_SOURCES and target in _PAPER_TARGETS else ()


def _shapes(tree) -> Any:
    return jax.tree.map(np.shape, tree)


def _mismatch(name: str, source_group, group) -> str:
    if name == "fc8":
        return (f"new head: {np.shape(source_group['bias'])[0]} classes in the source, "
                f"{np.shape(group['bias'])[0]} here")
    return f"shapes differ: {_shapes(source_group)} in the source, {_shapes(group)} here"


def copy_layers(params, source_params, layers: Iterable[str] = (), *,
                        source_version: str = "", version: str = "") -> LayerCopy:
    """Copies layers from another net's parameters; says why each other layer is not copied.

    A conv layer's batch norm ("conv1_1_bn") goes with it.

    Args:
      params: this net's freshly initialised parameters.
      source_params: the source net's parameters.
      layers: the layer names to copy; empty = `default_layers(source_version, version)`,
        i.e. the paper's layers from net A into a deeper net, else every layer present in
        both with equal shapes.
      source_version, version: the two nets' configurations (for the default).

    Returns:
      A LayerCopy: new params, the groups copied, and layer -> reason for every layer of
      this net not copied.

    Raises:
      ConfigError: if one net has batch norm and the other not, or a named layer is
        missing from either net or its shapes differ.
    """
    copied, skipped = plan_copy(params, source_params, layers,
                                    source_version=source_version, version=version)
    new_params = dict(params)
    for group in copied:
        new_params[group] = jax.tree.map(lambda new, old: jnp.asarray(old, new.dtype),
                                         params[group], source_params[group])
    return LayerCopy(new_params, copied, skipped)


def plan_copy(params, source_params, layers: Iterable[str] = (), *,
                  source_version: str = "", version: str = ""
                  ) -> tuple[list[str], dict[str, str]]:
    """What `copy_layers` would copy, from the two nets' shapes alone.

    Args:
      params: this net's parameters, or only their shapes (anything with .shape leaves).
      source_params: the source net's, the same.
      layers, source_version, version: as for `copy_layers`.

    Returns:
      (the groups to copy, layer -> why it is not copied, for every other layer).

    Raises:
      ConfigError: as `copy_layers`.
    """
    with_bn = lambda tree: any(name.endswith(BN_SUFFIX) for name in tree)
    if with_bn(source_params) != with_bn(params):
        raise ConfigError(
            f"config.init_from is a net {'with' if with_bn(source_params) else 'without'} "
            f"batch norm and this one is not; pass --config.model.batch_norm="
            f"{with_bn(source_params)} to match it.")
    layers = list(layers)
    explicit = bool(layers)
    paper = () if explicit or not (source_version and version) else default_layers(
        source_version, version)
    for name in layers:
        if name not in params or name not in source_params:
            raise ConfigError(
                f"config.init_from_layers names {name!r}, which is not a layer of both nets; "
                f"layers: {sorted(params)}.")
        if _shapes(source_params[name]) != _shapes(params[name]):
            raise ConfigError(
                f"Layer {name!r} has shapes {_shapes(source_params[name])} in "
                f"config.init_from but {_shapes(params[name])} here; remove it from "
                "config.init_from_layers.")
    copied, skipped = [], {}
    for name in (n for n in params if not n.endswith(BN_SUFFIX)):
        if name not in source_params:
            skipped[name] = "not in the source net"
        elif _shapes(source_params[name]) != _shapes(params[name]):
            skipped[name] = _mismatch(name, source_params[name], params[name])
        elif explicit and name not in layers:
            skipped[name] = "not in config.init_from_layers"
        elif paper and name not in paper:
            skipped[name] = (f"equal shapes, but not one of the paper's layers from net "
                             f"{canonical_version(source_version)} (config.init_from_layers "
                             "chooses others)")
        else:
            copied += [name] + [name + BN_SUFFIX] * (name + BN_SUFFIX in params)
    return copied, skipped


def initialise(config: ml_collections.ConfigDict, params, batch_stats
               ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Loads config.init_from and copies its layers into a fresh net (host arrays).

    Args:
      config: the run config (init_from, init_from_layers, model.version).
      params: the fresh parameters.
      batch_stats: the fresh batch-norm statistics ({} without batch norm).

    Returns:
      (params, batch_stats, lines to log): the copied batch norms bring their running
      statistics.

    Raises:
      ConfigError: for an unreadable source, a layer choice that cannot work, or a
        warm start that would copy nothing.
    """
    loaded = _load(config.init_from)
    source, source_run = loaded.variables, loaded.config
    copy = copy_layers(
        params, source["params"], string_list(config.init_from_layers),
        source_version=source_run.model.version, version=config.model.version)
    _require_useful_copy(config, source_run, copy.copied, copy.skipped)
    new_stats = {name: source["batch_stats"][name] if name in copy.copied else value
                 for name, value in batch_stats.items()}
    lines = [f"Initialised from {config.init_from} (step {loaded.step}): copied "
             f"{', '.join(copy.copied)}."]
    lines += [f"Not copied: {name}, {reason}." for name, reason in copy.skipped.items()]
    return copy.params, new_stats, lines


def check_warm_start(config: ml_collections.ConfigDict) -> None:
    """Refuses, before any work, what `initialise` would refuse: it compares this net's
    parameter shapes (traced, not computed) with the source's (its checkpoint's metadata;
    no weight is read).

    Args:
      config: the run config (init_from set).

    Raises:
      ConfigError: as `initialise`.
    """
    source = _load(config.init_from, shapes_only=True)
    model = create_model_from_config(config)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    copied, skipped = plan_copy(
        shapes["params"], source.variables["params"], string_list(config.init_from_layers),
        source_version=source.config.model.version, version=config.model.version)
    _require_useful_copy(config, source.config, copied, skipped)


def _require_useful_copy(config, source_run, copied: list[str],
                             skipped: Mapping[str, str]) -> None:
    """A warm start must copy something, and every frozen layer."""
    if not copied:
        raise ConfigError(
            f"config.init_from={config.init_from!r} ({_describe(source_run)}) shares no layer "
            f"with this net ({_describe(config)}): {_first_reason(skipped)}; build "
            "the same net (configs/finetune.py takes it from the source) or start from "
            "another checkpoint.")
    frozen = select_layers(string_list(config.train.get("frozen_layers", ())),
                           config.model.version)
    fresh = [name for name in frozen if name in skipped]
    if fresh:
        raise ConfigError(
            f"config.train.frozen_layers freezes {', '.join(fresh)}, which config.init_from "
            f"does not provide ({fresh[0]}: {skipped[fresh[0]]}), so it would stay at "
            "its random initialisation; leave it out of config.train.frozen_layers.")


def _describe(config) -> str:
    m, d = config.model, config.data
    return (f"net {m.version}{' with batch norm' if m.get('batch_norm') else ''}, width / "
            f"{m.width_divisor}, FC {m.fc_features}, {d.image_size}x{d.image_size} crops, "
            f"{m.num_classes} classes")


def _first_reason(skipped: Mapping[str, str]) -> str:
    name = next(iter(skipped), None)
    return f"{name}: {skipped[name]}" if name else "it has no layers"
