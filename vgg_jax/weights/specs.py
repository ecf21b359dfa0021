"""A net from a spec: one string names any weights vgg-jax can load.

  vgg11 ... vgg19, vgg11_bn ... vgg19_bn   torchvision's ImageNet weights from the hub
                                           (hf-hub:timm/<name>.tv_in1k)
  hf-hub:ORG/NAME[@REVISION]               a hub repo's model.safetensors (timm's or
                                           torchvision's keys) and timm's config.json
  x.safetensors, x.npz, x.pth (.pt, .bin)  a state dict file (weight_files)
  x.caffemodel                             the authors' Caffe release (caffe_format)
  DIR[@STEP]                               one of our runs (or converted weights): its best
                                           checkpoint, or STEP (a number, best, latest)

Every foreign format is read into torchvision's key layout, turned into our variables by
`torchvision_format.from_torchvision`, and described by a run config carrying its
preprocessing (`net_config`); a file exported from one of our runs brings its run's own
config back. The result has the shape of `run_checkpoint.load_checkpoint`'s, so evaluation,
prediction and fine-tuning take any spec where they took a workdir. A shorthand wins over
a directory of the same name: write ./vgg16 for the directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vgg_jax.models import canonical_version, create_model_from_config
from vgg_jax.weights import (
    caffe_format,
    hub,
    net_config,
    run_checkpoint,
    timm_format,
    torchvision_format,
    weight_files,
)

CAFFE_SUFFIX = ".caffemodel"
WEIGHT_FILE_SUFFIXES = (*weight_files.STATE_DICT_SUFFIXES, CAFFE_SUFFIX)
# The authors' released nets (D and E, 2014) were trained with scale jittering, S in
# [256, 512] (the paper's 3.1 and Table 5), so their single test scale is Q = 384.
CAFFE_TRAIN_SCALES = (256, 512)
# Run-config fields that must agree between a file's keys and the run config it records.
_DESCRIBED_FIELDS = ("model.num_classes", "model.width_divisor", "model.fc_features",
                     "model.batch_norm", "data.image_size")

RUN, HUB, FILE = "run", "hub", "file"
# What `_load` reads of the weights: their values, their shapes, or only their config.
_VALUES, _SHAPES, _CONFIG = "values", "shapes", "config"


class Spec(NamedTuple):
    """A parsed spec.

    Attributes:
      kind: RUN (a workdir), HUB or FILE.
      location: the directory, the file, or the hub spec's text.
      step: for a run: a step number, "best", "latest" or None (best if any, else latest).
      hub_spec: for HUB, the repo and revision.
    """

    kind: str
    location: str
    step: str | None = None
    hub_spec: hub.HubSpec | None = None


def parse(spec: str, step: int | str | None = None) -> Spec:
    """Reads a spec without loading anything (a hub spec is not looked up).

    Args:
      spec: see the module docstring.
      step: a run's step, instead of a DIR@STEP suffix.

    Returns:
      The Spec.

    Raises:
      ValueError: for a path that does not exist, a step given for weights that are not a
        run, or a spec of no known form; one sentence listing the forms.
    """
    spec = str(spec).strip()
    found = hub.parse(spec)
    if found is not None:
        _no_step(spec, step)
        return Spec(HUB, str(found), hub_spec=found)
    path = os.path.expanduser(spec)
    if path.endswith(WEIGHT_FILE_SUFFIXES):
        if not os.path.isfile(path):
            raise ValueError(f"Weight file {spec} does not exist.")
        _no_step(spec, step)
        return Spec(FILE, path)
    directory, at, suffix = path.rpartition("@")
    if not os.path.isdir(path) and at and os.path.isdir(directory):
        if step is not None:
            raise ValueError(f"{spec} names a step and step={step!r} names another; give one.")
        return Spec(RUN, directory, suffix)
    if os.path.isdir(path):
        return Spec(RUN, path, None if step is None else str(step))
    forms = (f"a run's directory (DIR or DIR@STEP), a {', '.join(WEIGHT_FILE_SUFFIXES)} file, "
             f"hf-hub:ORG/NAME[@REVISION] or one of {', '.join(hub.SHORTHANDS)}")
    if os.path.exists(path):
        raise ValueError(f"{spec} is a file of no weight format vgg-jax reads; pass {forms}.")
    raise ValueError(f"Checkpoint path {spec} does not exist; pass {forms}.")


def _no_step(spec: str, step) -> None:
    if step is not None:
        raise ValueError(f"A step ({step}) applies to a run's workdir, not to {spec}.")


def short_name(spec: str) -> str:
    """A short name for a spec, for tables and default directories.

    Args:
      spec: any spec.

    Returns:
      "vgg16.tv_in1k" for vgg16 or hf-hub:timm/vgg16.tv_in1k, "x" for x.npz, the
      directory's name for a run.
    """
    found = hub.parse(spec)
    if found is not None:
        return found.repo_id.split("/")[-1]
    path = os.path.expanduser(spec)
    if not os.path.exists(path) and "@" in path:  # DIR@STEP
        path = path.rpartition("@")[0]
    path = os.path.normpath(path)
    stem, suffix = os.path.splitext(os.path.basename(path))
    return stem if suffix in WEIGHT_FILE_SUFFIXES else os.path.basename(path)


def load(spec: str, step: int | str | None = None, *,
         shapes_only: bool = False) -> run_checkpoint.LoadedCheckpoint:
    """Loads the net a spec names.

    Args:
      spec: see the module docstring.
      step: a run's checkpoint step (number, "best", "latest"); None: DIR@STEP's, or the
        best if any was evaluated, else the latest.
      shapes_only: the variables as jax.ShapeDtypeStruct leaves (a run's metadata, a
        safetensors header; nothing else is read that can be skipped).

    Returns:
      run_checkpoint.LoadedCheckpoint(variables, run config, step): for weights other than a
      run, the config of `net_config.describe` (or the run config an export recorded) and
      step 0.

    Raises:
      ValueError: one sentence for a spec that cannot be loaded (see `parse`, `hub.fetch`,
        `weight_files.read`, `torchvision_format.from_torchvision`).
    """
    return _load(spec, step, _SHAPES if shapes_only else _VALUES)


def load_config(spec: str, step: int | str | None = None) -> ml_collections.ConfigDict:
    """The run config of the weights a spec names, without their values or shapes.

    Touches no jax backend (the net is not traced), so it may run before
    jax.distributed starts (main.py completes a config from its init_from this way).

    Args:
      spec, step: as for `load`.

    Returns:
      The run config `load` would return.

    Raises:
      ValueError: as `load`.
    """
    return _load(spec, step, _CONFIG).config


def _load(spec: str, step: int | str | None, what: str) -> run_checkpoint.LoadedCheckpoint:
    parsed = parse(spec, step)
    if parsed.kind == RUN:
        return run_checkpoint.load_checkpoint(parsed.location, parsed.step,
                                          shapes_only=what == _SHAPES,
                                          config_only=what == _CONFIG)
    if parsed.kind == HUB:
        fetched = hub.fetch(parsed.hub_spec)
        read = weight_files.read(fetched.weights_path, shapes_only=what != _VALUES)
        preprocessing = net_config.from_timm_config(fetched.config)
        return from_state_dict(read.state_dict, preprocessing, read.run_config, what=what,
                               origin=str(parsed.hub_spec))
    if parsed.location.endswith(CAFFE_SUFFIX):
        return _load_caffe(parsed.location, what)
    read = weight_files.read(parsed.location, shapes_only=what != _VALUES)
    return from_state_dict(read.state_dict, net_config.TORCHVISION, read.run_config,
                           what=what, origin=parsed.location)


def _load_caffe(path: str, what: str) -> run_checkpoint.LoadedCheckpoint:
    weights = caffe_format.read_caffemodel(path)
    preprocessing = net_config.Preprocessing(
        tuple(weights.mean_rgb), tuple(weights.std_rgb), CAFFE_TRAIN_SCALES,
        "the authors' Caffe release (mean pixel subtracted)")
    return from_state_dict(weights.state_dict, preprocessing, None, what=what, origin=path,
                           version=weights.version)


def from_state_dict(state_dict: Mapping[str, Any], preprocessing: net_config.Preprocessing,
                    run_config: Mapping[str, Any] | None = None, *, what: str = _VALUES,
                    origin: str = "the state dict",
                    version: str | None = None) -> run_checkpoint.LoadedCheckpoint:
    """Our variables and run config from a state dict in timm's or torchvision's layout.

    Args:
      state_dict: key -> array (torch tensor, or jax.ShapeDtypeStruct with shapes_only).
      preprocessing: the weights' preprocessing, used unless `run_config` is given.
      run_config: the config an export of one of our runs recorded, or None.
      what: "values" (the variables), "shapes" (jax.ShapeDtypeStruct leaves, traced from
        the config) or "config" (no variables: None).
      origin: the weights' name, for messages.
      version: the net's configuration; None: from the conv count.

    Returns:
      run_checkpoint.LoadedCheckpoint(variables, config, 0).

    Raises:
      ValueError: for keys of no VGG, or a recorded config the keys contradict.
    """
    sd = torchvision_format.clean_keys(state_dict)
    if timm_format.is_timm_layout(sd):
        sd = timm_format.from_timm(sd)
    version = version or torchvision_format.infer_version(sd)
    options = torchvision_format.infer_model_options(sd, version)
    config = net_config.describe(version, options, preprocessing)
    if run_config is not None:
        config = _recorded(run_config, config, origin)
    if what == _CONFIG:
        variables = None
    elif what == _SHAPES:
        variables = variable_shapes(config)
    else:
        variables = torchvision_format.from_torchvision(
            sd, version, batch_norm=options["batch_norm"])
    return run_checkpoint.LoadedCheckpoint(variables, config, 0)


def _recorded(run_config: Mapping[str, Any], described: ml_collections.ConfigDict,
              origin: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(run_config))
    for path in _DESCRIBED_FIELDS:
        section, field = path.split(".")
        recorded = config[section].get(field) if section in config else None
        if recorded != described[section][field]:
            raise ValueError(
                f"{origin} records a run with {path}={recorded!r}, but its weights have "
                f"{described[section][field]!r}; the file was changed after the export.")
    if canonical_version(config.model.version) != described.model.version:
        raise ValueError(f"{origin} records net {config.model.version}, but its weights are "
                         f"net {described.model.version}'s.")
    return config


def variable_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The variables' shapes of the net a run config describes (traced, not computed).

    Args:
      config: a run config (its model section and data.image_size).

    Returns:
      {"params"[, "batch_stats"]} of jax.ShapeDtypeStruct leaves.
    """
    model = create_model_from_config(config)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
