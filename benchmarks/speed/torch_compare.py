"""torchvision's VGG of the same configuration, timed in a child process.

torch is imported only in the child (benchmarks/torch_reference.py): loading its CUDA
libraries (cuDNN, cuBLAS) into this process could clash with the versions JAX's CUDA
plugin loads. It runs before JAX touches the accelerator, so neither framework's memory
pool squeezes the other.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from benchmarks import torch_reference
from vgg_jax.convert import TORCHVISION_NAMES
from vgg_jax.models import TOTAL_STRIDE, canonical_version


def torch_spec(config, steps: int, warmup: int, compile_model: bool,
               require_cuda: bool = False) -> dict[str, Any]:
    """The plain-value settings the child builds torchvision's net and step from.

    Args:
      config: the run config (after `settings.apply_shape`).
      steps: timed steps.
      warmup: untimed steps after the first (compiling) one.
      compile_model: use torch.compile (falls back to eager if it fails).
      require_cuda: time nothing unless torch sees a CUDA device.

    Returns:
      The spec `torch_reference.torch_train_step_benchmark` takes.
    """

    m, d, t = config.model, config.data, config.train
    version = canonical_version(m.version)
    return {
        "version": version, "torchvision_name": TORCHVISION_NAMES[version],
        "width_divisor": int(m.width_divisor),
        "fc_features": int(m.fc_features), "num_classes": int(m.num_classes),
        "dropout": float(m.dropout_rate), "image_size": int(d.image_size),
        "head_window": int(d.image_size) // TOTAL_STRIDE,
        "compute_dtype": str(m.compute_dtype), "batch": int(t.batch_size // t.grad_accum_steps),
        "lr": float(t.learning_rate), "momentum": float(t.momentum),
        "weight_decay": float(t.weight_decay), "mean_rgb": tuple(d.mean_rgb),
        "std_rgb": tuple(d.std_rgb), "steps": int(steps), "warmup": int(warmup),
        "compile": bool(compile_model), "require_cuda": bool(require_cuda),
    }


def run_torch(config, steps: int, warmup: int, compile_model: bool,
              require_cuda: bool = False) -> dict[str, Any]:
    """Times torchvision's VGG in a child process, if torchvision has the net.

    Args:
      config: the run config (after `settings.apply_shape`).
      steps: timed steps.
      warmup: untimed steps.
      compile_model: use torch.compile.
      require_cuda: skip at once, rather than time the CPU, when torch sees no GPU.

    Returns:
      The figures of `torch_reference.torch_train_step_benchmark`, or {"skipped": why}
      when torchvision has no such net (C, A-LRN), torch cannot be imported, or
      `require_cuda` is set and torch sees no CUDA device.
    """

    version = canonical_version(config.model.version)
    if version not in TORCHVISION_NAMES:
        return {"skipped": f"unsupported for VGG-{version} (torchvision has A, B, D, E = "
                           "vgg11/13/16/19; no C with 1x1 convolutions, no A-LRN)"}
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        # Pickled by reference: the child imports benchmarks.torch_reference through the
        # sys.path it inherits (the repository root is on it).
        result = pool.apply(torch_reference.torch_train_step_benchmark,
                            (torch_spec(config, steps, warmup, compile_model, require_cuda),))
        # A clean exit of the child (rather than the terminate() of leaving the block)
        # releases its semaphores, and frees its device memory before JAX starts.
        pool.close()
        pool.join()
    if "import_error" in result:
        return {"skipped": f"torch/torchvision not importable ({result['import_error']}); "
                           "install them in this environment to compare"}
    if "no_cuda" in result:
        return {"skipped": result["no_cuda"]}
    return result
