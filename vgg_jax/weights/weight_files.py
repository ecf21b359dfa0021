"""VGG state dicts as files: .safetensors, .npz and .pth, read and written.

  .safetensors  read with safetensors into numpy (no torch); any key layout (timm's or
                torchvision's); the header alone gives the shapes (nothing else is read)
  .npz          numpy's archive of torchvision's keys (no torch)
  .pth/.pt/.bin torch.load(weights_only=True), which refuses arbitrary pickled objects

A file exported from one of our runs records the run's config (its net, preprocessing and
training scales), so that importing it back is faithful: in the safetensors header's
metadata (timm and torch ignore it) and, in an .npz, as one extra member, RUN_CONFIG_KEY.
A .pth holds torchvision's keys alone (torchvision loads it with strict=True), so it
cannot carry it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors
import safetensors.numpy

# Where an export records its run's config: a safetensors metadata key, an .npz member.
RUN_CONFIG_KEY = "vgg_jax.run_config"
SAFETENSORS_SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"
# PyTorch pickles: torchvision's .pth, and the .pt/.bin names trainers and the hub use.
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
STATE_DICT_SUFFIXES = (SAFETENSORS_SUFFIX, NPZ_SUFFIX, *TORCH_SUFFIXES)


class StateDictFile(NamedTuple):
    """What a weight file holds.

    Attributes:
      state_dict: key -> numpy array (torch tensor for a .pth; jax.ShapeDtypeStruct when
        only the shapes were read).
      run_config: the config of the run that exported it (a JSON dict), or None.
    """

    state_dict: dict[str, Any]
    run_config: dict[str, Any] | None


def _import_torch(path: str, action: str):
    try:
        import torch  # Optional and heavy: only .pth files need it.
    except ImportError as e:
        raise SystemExit(
            f"{action} {path} needs PyTorch: `pip install torch` (CPU wheels suffice), or use "
            ".safetensors or .npz, which need no torch.") from e
    return torch


def read(path: str, *, shapes_only: bool = False) -> StateDictFile:
    """Reads a weight file.

    Args:
      path: a .safetensors, .npz or .pth/.pt/.bin file.
      shapes_only: for a .safetensors, read the header only (jax.ShapeDtypeStruct values);
        other formats are read whole either way.

    Returns:
      A StateDictFile.

    Raises:
      ValueError: for another suffix, or a file that is not what its suffix says.
      SystemExit: for a .pth when PyTorch is not installed.
    """
    if path.endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path, shapes_only)
    if path.endswith(NPZ_SUFFIX):
        try:
            with np.load(path, allow_pickle=False) as data:
                state_dict = {k: data[k] for k in data.files if k != RUN_CONFIG_KEY}
                run_config = (json.loads(str(data[RUN_CONFIG_KEY]))
                              if RUN_CONFIG_KEY in data.files else None)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable .npz archive ({error}).") from None
        return StateDictFile(state_dict, run_config)
    if path.endswith(TORCH_SUFFIXES):
        torch = _import_torch(path, "Reading")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad pickle
            raise ValueError(f"{path} is not a state dict torch can read with "
                             f"weights_only=True ({type(error).__name__}: {error}).") from None
        return StateDictFile(dict(loaded), None)
    raise ValueError(f"{path}: unknown weight file type; use one of "
                     f"{', '.join(STATE_DICT_SUFFIXES)} (or .caffemodel).")


def _read_safetensors(path: str, shapes_only: bool) -> StateDictFile:
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            if shapes_only:
                state_dict = {}
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensor = f.get_slice(key)
                    state_dict[key] = jax.ShapeDtypeStruct(
                        tuple(tensor.get_shape()), _dtype(tensor.get_dtype()))
        if not shapes_only:
            state_dict = safetensors.numpy.load_file(path)
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from None
    config = metadata.get(RUN_CONFIG_KEY)
    return StateDictFile(state_dict, json.loads(config) if config else None)


def _dtype(name: str) -> np.dtype:
    # safetensors names dtypes "F32", "F16", "I64", ...; weights are float, counters int.
    kinds = {"F": "float", "I": "int", "U": "uint"}
    kind = kinds.get(name[0])
    return np.dtype(f"{kind}{name[1:]}") if kind and name[1:].isdigit() else np.dtype(np.float32)


def write(state_dict: Mapping[str, np.ndarray], path: str,
          run_config: Mapping[str, Any] | None = None) -> None:
    """Writes a state dict, with the exporting run's config where the format can hold it.

    Args:
      state_dict: key -> numpy array.
      path: .safetensors, .npz, or anything else for torch.save (.pth).
      run_config: the run's config as a JSON dict; recorded in a .safetensors or .npz.

    Raises:
      SystemExit: for a .pth when PyTorch is not installed.
    """
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    config = json.dumps(dict(run_config)) if run_config is not None else None
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if path.endswith(SAFETENSORS_SUFFIX):
        safetensors.numpy.save_file(arrays, path, metadata={RUN_CONFIG_KEY: config}
                                    if config else None)
    elif path.endswith(NPZ_SUFFIX):
        extra = {RUN_CONFIG_KEY: np.array(config)} if config else {}
        np.savez(path, **arrays, **extra)
    else:
        torch = _import_torch(path, "Writing")
        # Copies: torch.from_numpy refuses read-only arrays (device_get's) for writing.
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, path)
