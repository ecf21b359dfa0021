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
        import torch
        import torch.nn as nn
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
    letter, divisor = spec["version"], spec["width_divisor"]
    layers = [v if v == "M" else max(v // divisor, 1) for v in tv.cfgs[letter]]
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
    model = model.to(device, memory_format=torch.channels_last).train()
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

    compiled_note = "eager"
    loss_impl = forward_loss
    if spec["compile"]:
        loss_impl = torch.compile(forward_loss)
        compiled_note = "torch.compile"

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_impl(images, labels)
        loss.backward()
        optimizer.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

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
        loss_impl, compiled_note = forward_loss, "eager (torch.compile failed)"
        step(images, labels)
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(spec["warmup"]):
        step(images, labels)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step(images, labels)
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "torch_version": torch.__version__,
        "model": tv.__name__ + "." + (
            spec["torchvision_name"] if standard else f"VGG(cfg {letter})"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mode": compiled_note,
        "precision": "bfloat16 autocast" if bf16 else "float32",
        "first_step_s": first_step_s,
        "step_s_median": median,
        "images_per_s": batch / median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
