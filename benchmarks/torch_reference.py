"""The PyTorch reference of benchmarks/train_step.py --compare_torch: torchvision's VGG.

Times torchvision's VGG of the same configuration (A, B, D, E = vgg11/13/16/19; narrowed
nets use torchvision's VGG class with scaled channels and a matching head) with bf16
autocast, channels_last, torch.compile, cudnn.benchmark and a fused/foreach SGD step with
momentum and weight decay.

`torch_train_step_benchmark` runs in a `spawn` child process of train_step.py, which
unpickles it as `benchmarks.torch_reference.torch_train_step_benchmark`: the child gets the
parent's sys.path, where train_step.py has put the repository root. This module must not
import jax or vgg_jax (which imports jax): jax loads its CUDA plugin's libraries at import,
and they could clash with the ones torch loads; everything the child needs from vgg_jax
comes in the spec, computed in the parent.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

# torchvision's VGG classifier: FC6 reads a 512 x 7 x 7 map (its AdaptiveAvgPool2d((7, 7)))
# and FC6/FC7 have 4096 units. Nets of another width or crop get a rebuilt head.
TORCHVISION_HEAD_WINDOW = 7
TORCHVISION_FC_FEATURES = 4096


def torch_train_step_benchmark(spec: dict[str, Any]) -> dict[str, Any]:
    """Times torchvision's VGG training step; runs in a child process (see module doc).

    Args:
      spec: the net, batch, optimiser and timing settings as plain values that pickle
        into the child (built by `benchmarks.speed.torch_compare.torch_spec`): version,
        torchvision_name, width_divisor, fc_features, num_classes, dropout, image_size, head_window,
        compute_dtype, batch, lr, momentum, weight_decay, mean_rgb, std_rgb, steps,
        warmup, compile, require_cuda.

    Returns:
      The figures, or {"import_error": message} when torch or torchvision cannot be
      imported, or {"no_cuda": message} when `require_cuda` is set and torch sees no GPU.
    """
    try:
        # torch is optional and heavy, and this child process must not load jax's CUDA
        # libraries beside it (module doc): imported here, in the child only.
        import torch
        from torchvision.models import vgg as tv
    except Exception as error:  # ImportError, or a torchvision built for another torch
        return {"import_error": f"{type(error).__name__}: {error}"}

    cuda = torch.cuda.is_available()
    if spec.get("require_cuda") and not cuda:
        # A GPU run must not time torch on the host's CPU for minutes: say why, at once.
        return {"no_cuda": f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
                           "sees no CUDA device"}
    device = torch.device("cuda" if cuda else "cpu")
    dtype = spec["compute_dtype"]
    bf16 = dtype == "bfloat16" or (dtype == "auto" and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
        # JAX runs fp32 convolutions/matmuls as TF32 on GPU by default; so does this.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, standard = _torchvision_vgg(spec, device)
    timing = _time_train_step(model, spec, device, bf16)
    return {
        "torch_version": torch.__version__,
        "model": tv.__name__ + "." + (
            spec["torchvision_name"] if standard else f"VGG(cfg {spec['version']})"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bfloat16 autocast" if bf16 else "float32",
        **timing,
    }


def _torchvision_vgg(spec: dict[str, Any], device: Any) -> tuple[Any, bool]:
    """torchvision's VGG of the spec's configuration, in training mode and channels_last on
    `device`; and whether it is torchvision's own standard net (else the head is rebuilt)."""
    import torch  # optional and heavy; see torch_train_step_benchmark
    import torch.nn as nn
    from torchvision.models import vgg as tv

    divisor = spec["width_divisor"]
    layers = [v if v == "M" else max(v // divisor, 1) for v in tv.cfgs[spec["version"]]]
    model = tv.VGG(tv.make_layers(layers), num_classes=spec["num_classes"],
                   dropout=spec["dropout"])
    window = spec["head_window"]
    standard = (divisor == 1 and spec["fc_features"] == TORCHVISION_FC_FEATURES
                and window == TORCHVISION_HEAD_WINDOW)
    if not standard:
        # torchvision's head assumes 512 x 7 x 7 inputs and 4096 features: rebuild it
        # for this width and crop (no adaptive pooling: the map already has FC6's size).
        channels, fc = layers[-2], spec["fc_features"]
        model.avgpool = nn.Identity()
        model.classifier = nn.Sequential(
            nn.Linear(channels * window * window, fc), nn.ReLU(True), nn.Dropout(spec["dropout"]),
            nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(spec["dropout"]),
            nn.Linear(fc, spec["num_classes"]))
    return model.to(device, memory_format=torch.channels_last).train(), standard


def _time_train_step(model: Any, spec: dict[str, Any], device: Any,
                     bf16: bool) -> dict[str, Any]:
    """Compiles (or not) and times the SGD step of `model` on a synthetic uint8 batch:
    the first step, then the median of `spec["steps"]` after `spec["warmup"]`."""
    import torch  # optional and heavy; see torch_train_step_benchmark
    import torch.nn as nn

    cuda = device.type == "cuda"
    optimizer_options = {"fused": True} if cuda else {"foreach": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                                weight_decay=spec["weight_decay"], **optimizer_options)
    mean = torch.tensor(spec["mean_rgb"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std_rgb"], device=device).view(1, 3, 1, 1)
    loss_fn = nn.CrossEntropyLoss()

    def forward_loss(images_u8, labels):
        # uint8 NHWC, as our pipeline ships it; permuted it is a channels_last NCHW view.
        x = (images_u8.permute(0, 3, 1, 2).float() - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        return loss_fn(logits.float(), labels)

    loss_impl, mode = forward_loss, "eager"
    if spec["compile"]:
        loss_impl, mode = torch.compile(forward_loss), "torch.compile"

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_impl(images, labels)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss

    batch, size = spec["batch"], spec["image_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                           generator=generator).to(device)
    labels = torch.randint(0, spec["num_classes"], (batch,), generator=generator).to(device)
    start = time.perf_counter()
    try:
        step(images, labels)
    except Exception as error:  # inductor needs a working compiler toolchain
        if not spec["compile"]:
            raise
        print(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
              "timing eager PyTorch instead.", flush=True)
        loss_impl, mode = forward_loss, "eager (torch.compile failed)"
        step(images, labels)
    first_step_s = time.perf_counter() - start
    for _ in range(spec["warmup"]):
        step(images, labels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step(images, labels)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"mode": mode, "first_step_s": first_step_s, "step_s_median": median,
            "images_per_s": batch / median,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
