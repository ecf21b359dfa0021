"""Imports torchvision's pretrained VGG weights (vgg11/13/16/19 = nets A/B/D/E, and
their batch-norm twins vgg11_bn ... vgg19_bn) as a checkpoint.

The key-by-key mapping lives in vgg_jax.torchvision_weights (both directions).

Its preprocessing differs from the paper's: pixels are scaled to [0, 1] and normalised by
ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); on our 0-255 scale
that is mean_rgb = 255 * mean, std_rgb = 255 * std, which the converted config carries.
torchvision reports its accuracy with resize-256 / centre-crop-224, i.e. our single-crop
protocol at Q = 256.

  python -m vgg_jax.convert vgg16-397923af.pth --version D --out runs/torchvision_vgg16
  python main.py --config=configs/vgg_d.py --workdir=runs/torchvision_vgg16 --mode=eval \
      --config.eval.protocol=single_crop --config.data.data_dir=$HOME/tensorflow_datasets
  python main.py --config=configs/finetune.py --workdir=runs/finetune \
      --config.init_from=runs/torchvision_vgg16 --config.data.data_dir=/path/to/images

The .pth is read with torch.load(weights_only=True), which refuses arbitrary pickled
objects. A .npz of the same keys works without torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from vgg_jax.torchvision_weights import (  # noqa: F401  (this module's Python API)
    TORCHVISION_NAMES,
    feature_indices,
    from_torchvision,
    infer_model_options,
    to_torchvision,
    torchvision_name,
    torchvision_version,
)

# torchvision's preprocessing on a 0-1 scale (its ImageNet weights' documentation).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# torchvision's evaluation resize (shorter side) before the 224 centre crop.
TORCHVISION_RESIZE = 256


def converted_config(version: str, options: Mapping[str, int]) -> ml_collections.ConfigDict:
    """A run config describing converted torchvision weights and their preprocessing.

    Args:
      version: our version key ("A", "B", "D", "E").
      options: from `infer_model_options`.

    Returns:
      The base recipe with the model options, torchvision's normalisation on the 0-255
      scale, and S = Q = 256 (its resize-256 protocol).
    """
    from configs import base

    config = base.get_config()
    config.model.version = torchvision_version(version)
    config.model.num_classes = int(options["num_classes"])
    config.model.width_divisor = int(options["width_divisor"])
    config.model.fc_features = int(options["fc_features"])
    config.model.batch_norm = bool(options["batch_norm"])
    config.data.image_size = int(options["image_size"])
    config.data.mean_rgb = tuple(255.0 * m for m in TORCHVISION_MEAN)
    config.data.std_rgb = tuple(255.0 * s for s in TORCHVISION_STD)
    config.data.train_scale_min = config.data.train_scale_max = TORCHVISION_RESIZE
    config.data.eval_scale = TORCHVISION_RESIZE
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


def convert_file(path: str, version: str, out: str) -> str:
    """Converts a torchvision weight file into a params checkpoint under `out`.

    Args:
      path: the torchvision state dict (.pth) or a .npz of its keys.
      version: "A", "B", "D", "E" or vgg11/13/16/19 or vgg11_bn ... vgg19_bn.
      out: the directory (workdir) to write the weights and their run config into.

    Returns:
      The workdir written (what `checkpoint.save_variables` returns).

    Raises:
      ValueError: if the state dict does not match the version (see `from_torchvision`).
    """
    from vgg_jax import checkpoint

    state_dict = load_state_dict(path)
    key = torchvision_version(version)
    variables = from_torchvision(state_dict, version)
    options = infer_model_options(state_dict, key)
    return checkpoint.save_variables(out, variables, converted_config(key, options))


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
    from vgg_jax import checkpoint

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


def main(argv: list[str] | None = None) -> None:
    """Command line, both ways:

    python -m vgg_jax.convert WEIGHTS --version V --out DIR   torchvision -> checkpoint
    python -m vgg_jax.convert --workdir DIR [--step S] --out FILE.pth   checkpoint -> torch
    """
    parser = argparse.ArgumentParser(
        prog="python -m vgg_jax.convert",
        description="Convert torchvision VGG weights (vgg11 ... vgg19, vgg11_bn ... vgg19_bn) "
                    "to a vgg-jax checkpoint, or (--workdir) a checkpoint to a torchvision "
                    "state dict.")
    parser.add_argument("weights", nargs="?",
                        help="torchvision state dict (.pth) or .npz of its keys")
    parser.add_argument("--version",
                        help="A, B, D or E (or vgg11 ... vgg19, vgg11_bn ... vgg19_bn)")
    parser.add_argument("--workdir", help="a run to export as a torchvision state dict")
    parser.add_argument("--step", help="with --workdir: best, latest or a step number")
    parser.add_argument("--out", required=True,
                        help="directory (workdir) to write; with --workdir the .pth to write")
    args = parser.parse_args(argv)
    if args.workdir:
        if args.weights or args.version:
            parser.error("--workdir exports a checkpoint; it takes no weight file or --version.")
        try:
            usage = export_file(args.workdir, args.out, args.step)
        except ValueError as e:
            sys.exit(f"Conversion failed: {e}")
        print(f"Wrote {args.out}: {usage}")
        return
    if not args.weights or not args.version:
        parser.error("pass a weight file and --version (or --workdir to export a checkpoint).")
    if not os.path.isfile(args.weights):
        parser.error(f"{args.weights} is not a file.")
    from vgg_jax import checkpoint

    existing = checkpoint.checkpoint_dir(args.out)
    if os.path.isdir(existing) and os.listdir(existing):
        parser.error(f"{existing} already holds checkpoints; pass a new --out directory "
                     "(converted weights would mix with that run's steps).")
    try:
        out = convert_file(args.weights, args.version, args.out)
    except ValueError as e:
        sys.exit(f"Conversion failed: {e}")
    for line in next_steps(out, args.version):
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
    main()
