"""Weights in, weights out: any pretrained VGG as a checkpoint, and a run as a weight file.

In: any weights spec of vgg_jax.weights.specs (vgg16, hf-hub:ORG/NAME[@REVISION], a
.safetensors, .npz, .pth or .caffemodel file) becomes a checkpoint directory, with the
weights' own preprocessing (torchvision's and timm's ImageNet mean and std, the Caffe
nets' mean pixel, an exported run's own config) and training scales:

  python -m vgg_jax.convert vgg16 --out=runs/tv_vgg16                  # from the hub
  python -m vgg_jax.convert vgg16-397923af.pth --out=runs/tv_vgg16     # torchvision's file
  python main.py --config=configs/vgg_d.py --workdir=runs/tv_vgg16 --mode=eval \
      --config.eval.protocol=single_crop --config.data.data_dir=$HOME/tensorflow_datasets

(evaluation, prediction and fine-tuning also take the spec itself, with no conversion.)
Out: a run's checkpoint as a state dict,

  python -m vgg_jax.convert --workdir=runs/vgg_d --out=vgg16.safetensors   # timm's layout
  python -m vgg_jax.convert --workdir=runs/vgg_d --out=vgg16.pth           # torchvision's
  python -m vgg_jax.convert --workdir=runs/vgg_d --out=vgg16.npz           # its keys, numpy

.safetensors and .npz record the run's config (net, mean, std, scales), so importing them
back is faithful; a .pth holds torchvision's keys alone. The .pth is read with
torch.load(weights_only=True), which refuses arbitrary pickled objects; .safetensors and
.npz need no torch.

The written checkpoint carries a full run config: the recipe of --config (default
configs/base.py of this checkout) with the weights' net, preprocessing and scales.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vgg_jax.runtime import console
from vgg_jax.weights import run_checkpoint, specs, timm_format, weight_files
from vgg_jax.weights.torchvision_format import (  # noqa: F401  (this module's Python API)
    TORCHVISION_NAMES,
    feature_indices,
    from_torchvision,
    infer_model_options,
    parse_version,
    to_torchvision,
    torchvision_name,
    torchvision_version,
)

# The fields that describe weights (their net, preprocessing and scales); an imported
# checkpoint's config takes them from the weights and every other field from the recipe.
WEIGHTS_FIELDS = (
    "model.version", "model.num_classes", "model.width_divisor", "model.fc_features",
    "model.batch_norm", "data.image_size", "data.mean_rgb", "data.std_rgb",
    "data.train_scale_min", "data.train_scale_max",
)


def converted_config(weights_config: ml_collections.ConfigDict,
                     base_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of imported weights: the recipe, with the weights' own fields.

    Args:
      weights_config: the config `specs.load` gave the weights (their description, or
        the run config an export recorded).
      base_config: the recipe the other fields come from (configs/base.py's).

    Returns:
      A copy of `base_config` with WEIGHTS_FIELDS from `weights_config`.
    """
    config = ml_collections.ConfigDict(base_config.to_dict())
    for path in WEIGHTS_FIELDS:
        section, field = path.split(".")
        value = weights_config[section].get(field)
        if value is not None:
            config[section][field] = tuple(value) if isinstance(value, list) else value
    return config


def load_state_dict(path: str) -> dict[str, Any]:
    """Reads a weight file's state dict (see vgg_jax.weights.weight_files.read).

    Args:
      path: a .safetensors, .npz or .pth/.pt/.bin file.

    Returns:
      key -> numpy array (torch tensor for a .pth).
    """
    return weight_files.read(path).state_dict


def convert_file(spec: str, out: str, base_config: ml_collections.ConfigDict,
                 version: str | None = None) -> str:
    """Imports weights as a weights-only checkpoint under `out`.

    Args:
      spec: any weights spec but a run (a file, a hub model, a shorthand).
      out: the directory (workdir) to write the weights and their run config into.
      base_config: the recipe of the written run config (see `converted_config`).
      version: the net the weights must be ("A", "vgg16_bn", ...); None: whatever they are.

    Returns:
      The workdir written (what `run_checkpoint.save_variables` returns).

    Raises:
      ValueError: for weights that cannot be loaded, or are not `version`.
    """
    loaded = specs.load(spec)
    if version:
        _check_version(spec, loaded.config, version)
    config = converted_config(loaded.config, base_config)
    return run_checkpoint.save_variables(out, loaded.variables, config)


def _check_version(spec: str, config: ml_collections.ConfigDict, version: str) -> None:
    key, batch_norm = parse_version(version)
    found = torchvision_name(config.model.version, bool(config.model.batch_norm))
    if key != config.model.version or batch_norm not in (None, bool(config.model.batch_norm)):
        raise ValueError(
            f"{spec} holds a {found} (net {config.model.version}"
            f"{', with batch norm' if config.model.batch_norm else ''}) but --version={version}"
            f" was asked for; pass --version={found}, or leave --version out.")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict (see vgg_jax.weights.weight_files.write), with no run config.

    Args:
      state_dict: key -> numpy array, e.g. from `to_torchvision`.
      path: the file to write (.safetensors, .npz, or .pth for anything else).
    """
    weight_files.write(state_dict, path)


def export_file(path: str, out: str, step: int | str | None = None) -> str:
    """Writes a checkpoint's net as a state dict file (the inverse of `convert_file`).

    .safetensors gets timm's layout (timm's VGG loads it), .pth and .npz torchvision's;
    .safetensors and .npz also record the run's config, so that importing them back
    gives the run's own preprocessing and scales.

    Args:
      path: a workdir (or weights directory) holding a net A, B, D or E.
      out: the file to write.
      step: the checkpoint step: a number, "best", "latest" or None (best if any).

    Returns:
      How to use it from PyTorch: the constructor that loads it and the input
      normalisation of the net's run, in torchvision's 0-1 terms.

    Raises:
      ValueError: if the path holds no checkpoint, or a net torchvision does not have.
    """
    variables, config, chosen = run_checkpoint.load_checkpoint(path, step)
    batch_norm = bool(config.model.get("batch_norm", False))
    name = torchvision_name(config.model.version, batch_norm)
    state_dict = to_torchvision(variables, name)
    timm = out.endswith(weight_files.SAFETENSORS_SUFFIX)
    if timm:
        last_channels = int(np.shape(variables["params"]["fc6"]["kernel"])[2])
        state_dict = timm_format.to_timm(state_dict, last_channels)
    records = out.endswith((weight_files.SAFETENSORS_SUFFIX, weight_files.NPZ_SUFFIX))
    weight_files.write(state_dict, out, run_checkpoint.config_to_json(config) if records else None)
    return _usage(name, out, config, chosen, timm, records)


def _usage(name: str, out: str, config, step: int, timm: bool, records: bool) -> str:
    m, d = config.model, config.data
    full_size = (m.width_divisor, m.fc_features, d.image_size) == (1, 4096, 224)
    if not full_size:
        load = (f"a narrowed {name} (width / {m.width_divisor}, FC {m.fc_features}, "
                f"{d.image_size}x{d.image_size} crops) that torchvision's and timm's "
                "constructors cannot build; the keys follow the layout")
    elif timm:
        load = (f"timm.create_model({name!r}, num_classes={m.num_classes}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file={out!r}))")
    else:
        load = (f"torchvision.models.{name}(num_classes={m.num_classes})"
                f".load_state_dict(torch.load({out!r}), strict=True)")
    mean = tuple(round(v / 255.0, 6) for v in d.mean_rgb)
    std = tuple(round(v / 255.0, 6) for v in d.get("std_rgb", (1.0, 1.0, 1.0)))
    kept = ("; the run's config (mean, std, scales) is recorded in the file" if records else
            "; a .pth holds the keys alone: importing it back assumes torchvision's "
            "preprocessing (write .safetensors or .npz to keep the run's)")
    return (f"{name} from step {step}: {load}; inputs after ToTensor(): "
            f"Normalize(mean={mean}, std={std}){kept}")


_BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "base.py")


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_string("version", None,
                        "Optional: the net the imported weights must be (A, B, D, E, vgg11 ... "
                        "vgg19, vgg11_bn ... vgg19_bn); by default whatever they are.")
    flags.DEFINE_string("workdir", None, "A run to export as a torchvision state dict.")
    flags.DEFINE_string("step", None, "With --workdir: best, latest or a step number.")
    flags.DEFINE_string("out", None, "Directory (workdir) to write; with --workdir, the file "
                        "to write: .safetensors (timm's layout), .pth or .npz (torchvision's).")
    config_flags.DEFINE_config_file(
        "config", _BASE_CONFIG, "The recipe an imported checkpoint's run config starts from.")


def main(argv: Sequence[str]) -> None:
    """Command line, both ways:

    python -m vgg_jax.convert WEIGHTS [--version=V] --out=DIR          weights -> checkpoint
    python -m vgg_jax.convert --workdir=DIR [--step=S] --out=FILE      checkpoint -> file
    """
    console.quiet_library_logs()
    f, positional = flags.FLAGS, list(argv[1:])
    if not f.out:
        sys.exit("Pass --out: the directory to write (or, with --workdir, the file).")
    if f.workdir:
        if positional or f.version:
            sys.exit("--workdir exports a checkpoint; it takes no weights or --version.")
        try:
            usage = export_file(f.workdir, f.out, f.step)
        except ValueError as e:
            sys.exit(f"Conversion failed: {e}")
        print(f"Wrote {f.out}: {usage}")
        return
    if len(positional) != 1:
        sys.exit("Pass the weights to import (a file, vgg16, hf-hub:ORG/NAME), or --workdir "
                 "to export a checkpoint.")
    weights = positional[0]
    existing = run_checkpoint.checkpoint_dir(f.out)
    if os.path.isdir(existing) and os.listdir(existing):
        sys.exit(f"{existing} already holds checkpoints; pass a new --out directory "
                 "(converted weights would mix with that run's steps).")
    try:
        if specs.parse(weights).kind == specs.RUN:
            sys.exit(f"{weights} is a run's directory, already a checkpoint; use it as it is "
                     "(or export it with --workdir).")
        out = convert_file(weights, f.out, f.config, f.version)
    except ValueError as e:
        sys.exit(f"Conversion failed: {e}")
    for line in next_steps(out, run_checkpoint.load_checkpoint(out, shapes_only=True).config):
        print(line)


def next_steps(out: str, config: ml_collections.ConfigDict) -> list[str]:
    """What to do with converted weights: the commands, runnable as printed.

    Args:
      out: the workdir written.
      config: its run config.

    Returns:
      Lines: where the weights are, the evaluation command (the single centre crop at the
      weights' own test scale, on a TFDS imagenet2012 build in TFDS's default directory),
      the image-folder variant and the fine-tuning command.
    """
    key = str(config.model.version).lower()
    return [
        f"Wrote {out}. Evaluate it on ImageNet's validation set (one centre crop):",
        f"  python main.py --config=configs/vgg_{key}.py --workdir={out} --mode=eval "
        "--config.eval.protocol=single_crop --config.data.data_dir=$HOME/tensorflow_datasets",
        "  (an image folder instead: --config.data.source=folder "
        "--config.data.data_dir=/path/to/imagenet, holding val/<class>/*.JPEG)",
        "Fine-tune it on your own images (train/<class>/*, val/<class>/*):",
        f"  python main.py --config=configs/finetune.py --workdir=runs/finetune "
        f"--config.init_from={out} --config.data.data_dir=/path/to/images",
    ]


if __name__ == "__main__":
    define_flags()
    app.run(main)
