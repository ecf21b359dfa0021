"""Imports torchvision's pretrained VGG weights (vgg11/13/16/19 = nets A/B/D/E, and
their batch-norm twins vgg11_bn ... vgg19_bn) as a checkpoint.

The key-by-key mapping lives in vgg_jax.weights.torchvision_format (both directions).

Its preprocessing differs from the paper's: pixels are scaled to [0, 1] and normalised by
ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); on our 0-255 scale
that is mean_rgb = 255 * mean, std_rgb = 255 * std, which the converted config carries.
torchvision reports its accuracy with resize-256 / centre-crop-224, i.e. our single-crop
protocol at Q = 256.

  python -m vgg_jax.convert vgg16-397923af.pth --version=D --out=runs/torchvision_vgg16
  python main.py --config=configs/vgg_d.py --workdir=runs/torchvision_vgg16 --mode=eval \
      --config.eval.protocol=single_crop --config.data.data_dir=$HOME/tensorflow_datasets
  python main.py --config=configs/finetune.py --workdir=runs/finetune \
      --config.init_from=runs/torchvision_vgg16 --config.data.data_dir=/path/to/images
  python -m vgg_jax.convert --workdir=runs/vgg_d --out=vgg16.pth     # and back

The written checkpoint carries a full run config: the recipe of --config (default
configs/base.py of this checkout) with the net's shape and torchvision's preprocessing.

The .pth is read with torch.load(weights_only=True), which refuses arbitrary pickled
objects. A .npz of the same keys works without torch.
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

from vgg_jax.data import imagenet
from vgg_jax.weights.torchvision_format import (  # noqa: F401  (this module's Python API)
    TORCHVISION_NAMES,
    feature_indices,
    from_torchvision,
    infer_model_options,
    to_torchvision,
    torchvision_name,
    torchvision_version,
)

# torchvision's evaluation resize (shorter side) before the 224 centre crop.
TORCHVISION_RESIZE = 256


def converted_config(
    version: str, options: Mapping[str, int], base_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """A run config describing converted torchvision weights and their preprocessing.

    Args:
      version: our version key ("A", "B", "D", "E").
      options: from `infer_model_options`.
      base_config: the recipe the other fields come from (configs/base.py's).

    Returns:
      A copy of `base_config` with the model options, torchvision's normalisation on the
      0-255 scale, and S = Q = 256 (its resize-256 protocol).
    """
    config = ml_collections.ConfigDict(base_config.to_dict())
    config.model.version = torchvision_version(version)
    config.model.num_classes = int(options["num_classes"])
    config.model.width_divisor = int(options["width_divisor"])
    config.model.fc_features = int(options["fc_features"])
    config.model.batch_norm = bool(options["batch_norm"])
    config.data.image_size = int(options["image_size"])
    config.data.mean_rgb = tuple(255.0 * m for m in imagenet.TORCHVISION_MEAN)
    config.data.std_rgb = tuple(255.0 * s for s in imagenet.TORCHVISION_STD)
    config.data.train_scale_min = config.data.train_scale_max = TORCHVISION_RESIZE
    return config


def load_state_dict(path: str) -> dict[str, Any]:
    """Reads a .pth (torch.load, weights_only=True) or a .npz of torchvision keys.

    Args:
      path: the weight file; a name ending in .npz is read with numpy, anything else with
        torch.

    Returns:
      The state dict: key -> torch tensor (.pth) or numpy array (.npz).

    Raises:
      SystemExit: if the file is not .npz and PyTorch is not installed.
    """
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"Reading {path} needs PyTorch: `pip install torch` (CPU wheels suffice), or "
            "save the state dict as .npz with numpy.") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_file(
    path: str, version: str, out: str, base_config: ml_collections.ConfigDict
) -> str:
    """Converts a torchvision weight file into a params checkpoint under `out`.

    Args:
      path: the torchvision state dict (.pth) or a .npz of its keys.
      version: "A", "B", "D", "E" or vgg11/13/16/19 or vgg11_bn ... vgg19_bn.
      out: the directory (workdir) to write the weights and their run config into.
      base_config: the recipe of the written run config (see `converted_config`).

    Returns:
      The workdir written (what `checkpoint.save_variables` returns).

    Raises:
      ValueError: if the state dict does not match the version (see `from_torchvision`).
    """
    from vgg_jax.training import checkpoint

    state_dict = load_state_dict(path)
    key = torchvision_version(version)
    variables = from_torchvision(state_dict, version)
    options = infer_model_options(state_dict, key)
    return checkpoint.save_variables(out, variables, converted_config(key, options, base_config))


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict as a .pth (torch.save of tensors) or, for a .npz name, with numpy.

    Args:
      state_dict: key -> numpy array, e.g. from `to_torchvision`.
      path: the file to write; a name ending in .npz is written with numpy.

    Raises:
      SystemExit: if the file is not .npz and PyTorch is not installed.
    """
    if path.endswith(".npz"):
        np.savez(path, **state_dict)
        return
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"Writing {path} needs PyTorch: `pip install torch` (CPU wheels suffice), or "
            "write a .npz (numpy) of the same keys.") from e
    # Copies: torch.from_numpy refuses read-only arrays (device_get's) for writing.
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def export_file(path: str, out: str, step: int | str | None = None) -> str:
    """Writes a checkpoint's net as a torchvision state dict (the inverse of `convert_file`).

    Args:
      path: a workdir (or weights directory) holding a net A, B, D or E.
      out: the .pth (or .npz) file to write.
      step: the checkpoint step: a number, "best", "latest" or None (best if any).

    Returns:
      How to use it from PyTorch: the constructor that loads it and the input
      normalisation of the net's run, in torchvision's 0-1 terms.

    Raises:
      ValueError: if the path holds no checkpoint, or a net torchvision does not have.
    """
    from vgg_jax.training import checkpoint

    variables, config, chosen = checkpoint.load_checkpoint(path, step)
    batch_norm = bool(config.model.get("batch_norm", False))
    name = torchvision_name(config.model.version, batch_norm)
    save_state_dict(to_torchvision(variables, name), out)
    m, d = config.model, config.data
    if (m.width_divisor, m.fc_features, d.image_size) == (1, 4096, 224):
        load = (f"torchvision.models.{name}(num_classes={m.num_classes})"
                f".load_state_dict(torch.load({out!r}), strict=True)")
    else:
        load = (f"a narrowed {name} (width / {m.width_divisor}, FC {m.fc_features}, "
                f"{d.image_size}x{d.image_size} crops) that torchvision's constructor cannot "
                "build; the keys follow its layout")
    mean = tuple(round(v / 255.0, 6) for v in d.mean_rgb)
    std = tuple(round(v / 255.0, 6) for v in d.get("std_rgb", (1.0, 1.0, 1.0)))
    return (f"{name} from step {chosen}: {load}; inputs after ToTensor(): "
            f"Normalize(mean={mean}, std={std})")


_BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "base.py")


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_string("version", None,
                        "A, B, D or E (or vgg11 ... vgg19, vgg11_bn ... vgg19_bn) of the weight "
                        "file to import.")
    flags.DEFINE_string("workdir", None, "A run to export as a torchvision state dict.")
    flags.DEFINE_string("step", None, "With --workdir: best, latest or a step number.")
    flags.DEFINE_string("out", None, "Directory (workdir) to write; with --workdir, the .pth "
                        "(or .npz) file to write.")
    config_flags.DEFINE_config_file(
        "config", _BASE_CONFIG, "The recipe an imported checkpoint's run config starts from.")


def main(argv: Sequence[str]) -> None:
    """Command line, both ways:

    python -m vgg_jax.convert WEIGHTS --version=V --out=DIR       torchvision -> checkpoint
    python -m vgg_jax.convert --workdir=DIR [--step=S] --out=FILE.pth   checkpoint -> torch
    """
    f, positional = flags.FLAGS, list(argv[1:])
    if not f.out:
        sys.exit("Pass --out: the directory to write (or, with --workdir, the .pth file).")
    if f.workdir:
        if positional or f.version:
            sys.exit("--workdir exports a checkpoint; it takes no weight file or --version.")
        try:
            usage = export_file(f.workdir, f.out, f.step)
        except ValueError as e:
            sys.exit(f"Conversion failed: {e}")
        print(f"Wrote {f.out}: {usage}")
        return
    if len(positional) != 1 or not f.version:
        sys.exit("Pass one weight file and --version (or --workdir to export a checkpoint).")
    weights = positional[0]
    if not os.path.isfile(weights):
        sys.exit(f"{weights} is not a file.")
    from vgg_jax.training import checkpoint

    existing = checkpoint.checkpoint_dir(f.out)
    if os.path.isdir(existing) and os.listdir(existing):
        sys.exit(f"{existing} already holds checkpoints; pass a new --out directory "
                 "(converted weights would mix with that run's steps).")
    try:
        out = convert_file(weights, f.version, f.out, f.config)
    except ValueError as e:
        sys.exit(f"Conversion failed: {e}")
    for line in next_steps(out, f.version):
        print(line)


def next_steps(out: str, version: str) -> list[str]:
    """What to do with converted weights: the commands, runnable as printed.

    Args:
      out: the workdir written.
      version: the --version given.

    Returns:
      Lines: where the weights are, the evaluation command (torchvision's protocol, the
      centre crop at Q = 256, on a TFDS imagenet2012 build in TFDS's default directory),
      the image-folder variant and the fine-tuning command.
    """
    key = torchvision_version(version).lower()
    return [
        f"Wrote {out}. Evaluate it on ImageNet's validation set (torchvision's centre crop):",
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
