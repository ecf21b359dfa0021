"""The console lines of each part of the speed benchmark."""

from __future__ import annotations

from typing import Any

_GIB = 1024**3
_MIB = 1024**2
# Byte counts from this size up print in GiB.
_GIB_FROM = 0.1 * _GIB
_BOUND_TEXT = {
    "step": "the step (the input side keeps up)",
    "data": "the input pipeline (the loop waits for batches to be made)",
    "transfer": "the host-to-device transfer (the loop waits for copies)",
    "input": "the input side (grain's prefetch: data and transfer not told apart)",
}


def fmt_bytes(n: float | None) -> str:
    """"1.23 GiB" / "45.6 MiB", or "n/a"."""
    if n is None:
        return "n/a"
    return f"{n / _GIB:.2f} GiB" if n >= _GIB_FROM else f"{n / _MIB:.1f} MiB"


def fmt_rate(x: float | None, digits: int = 1) -> str:
    """A rate with thousands separators, or "n/a"."""
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def step_lines(r: dict[str, Any], on_cpu: bool) -> list[str]:
    """The step's lines.

    Args:
      r: the "step" figures (`step.step_figures`).
      on_cpu: whether the device is a CPU (explains a missing MFU).

    Returns:
      Lines to print.
    """
    lines = [
        f"precision         : {r['precision']} compute, float32 parameters",
        f"compile           : {r['compile_s']:.2f} s (+ {r['trace_s']:.2f} s trace/lower)",
        f"step (median)     : {1e3 * r['step_s_median']:.2f} ms over {r['steps_timed']} steps "
        f"(min {1e3 * r['step_s_min']:.2f}, max {1e3 * r['step_s_max']:.2f}); back to back "
        f"{1e3 * r['step_s_back_to_back']:.2f} ms/step",
        f"images/s          : {fmt_rate(r['images_per_s'])} "
        f"(back to back {fmt_rate(r['images_per_s_back_to_back'])})",
    ]
    xla = r["xla_flops_per_image"]
    lines.append(f"FLOPs per image   : {r['train_flops_per_image'] / 1e9:.4g} GFLOP = 6 x "
                 f"{r['forward_macs_per_image'] / 1e9:.4g} GMAC forward"
                 + (f" (XLA cost analysis: {xla / 1e9:.4g} GFLOP)" if xla else ""))
    lines.append(f"achieved          : {r['tflops']:.4g} TFLOP/s "
                 f"({r['tflops_per_device']:.4g} per device)")
    if r["mfu"] is not None:
        lines.append(f"MFU               : {100 * r['mfu']:.1f}% of "
                     f"{r['peak_tflops_per_device']:g} TFLOP/s dense peak per device")
    else:
        why = "CPU" if on_cpu else "device not in the peak table"
        lines.append(f"MFU               : n/a ({why}; pass --peak_tflops)")
    plan = r["xla_memory_plan"]
    plan_text = ""
    if plan:
        plan_text = (f"; XLA plan per device: arguments {fmt_bytes(plan['argument_bytes'])}, "
                     f"temporaries {fmt_bytes(plan['temp_bytes'])}")
    peak = r["peak_memory_bytes"]
    lines.append(f"peak memory       : {fmt_bytes(peak)}"
                 + (" (no memory_stats on this device)" if peak is None else
                    f" (device peak, of a {fmt_bytes(r['memory_limit_bytes'])} limit)")
                 + plan_text)
    return lines


def loop_lines(r: dict[str, Any]) -> list[str]:
    """The loop's lines, one block per feeder.

    Args:
      r: the "loop" figures (`loop.measure_loop`).

    Returns:
      Lines to print.
    """
    lines = []
    for f in r["feeders"].values():
        lines += [
            f"loop [{f['feeder']}, depth {f['depth']}]: {fmt_rate(f['images_per_s'])} images/s "
            f"= {100 * f['fraction_of_synthetic']:.1f}% of the synthetic-data rate over "
            f"{f['steps']} steps ({r['num_workers']} grain workers, start-up "
            f"{f['startup_s']:.1f} s)",
            f"  time split      : blocked on data {_fmt_s(f['blocked_on_data_s'])}, on "
            f"transfer {_fmt_s(f['blocked_on_transfer_s'])} (on input in all "
            f"{f['blocked_on_input_s']:.2f} s, {100 * f['blocked_fraction']:.0f}%), on the "
            f"step {f['on_step_s']:.2f} s of {f['wall_s']:.2f} s; the steps alone take "
            f"{f['step_time_at_synthetic_rate_s']:.2f} s on synthetic data",
            f"  bound by        : {_BOUND_TEXT[f['bound_by']]}",
        ]
    return lines


def with_ratio(torch_results: dict[str, Any], jax_rate: float | None) -> dict[str, Any]:
    """The PyTorch figures with `jax_over_torch` (our images/s over torch's) when both exist.

    Args:
      torch_results: what `torch_compare.run_torch` returns.
      jax_rate: images/s of the JAX step, or None when it was not timed.

    Returns:
      A new dict.
    """
    if jax_rate is None or "images_per_s" not in torch_results:
        return dict(torch_results)
    return dict(torch_results, jax_over_torch=jax_rate / torch_results["images_per_s"])


def torch_lines(r: dict[str, Any], jax_rate: float | None) -> list[str]:
    """The PyTorch lines and the JAX / PyTorch speed ratio.

    Args:
      r: what `torch_compare.run_torch` returns.
      jax_rate: images/s of the JAX step (None: not timed in this run, no ratio).

    Returns:
      Lines to print.
    """
    if "skipped" in r:
        return [f"PyTorch comparison: skipped, {r['skipped']}."]
    ratio = [] if jax_rate is None else [
        f"JAX / PyTorch     : {jax_rate / r['images_per_s']:.2f}x"]
    return [
        f"PyTorch           : {r['model']} {r['torch_version']} on {r['device']}, "
        f"{r['precision']}, {r['mode']}, channels_last",
        f"PyTorch step      : {1e3 * r['step_s_median']:.2f} ms median, "
        f"{fmt_rate(r['images_per_s'])} images/s, first step (compile) "
        f"{r['first_step_s']:.1f} s, peak memory {fmt_bytes(r['peak_memory_bytes'])}",
        *ratio,
    ]


def estimate_lines(r: dict[str, Any]) -> list[str]:
    """The largest-batch estimate's line (`max_batch.estimate_max_batch`)."""
    return [f"max batch estimate: XLA plans {fmt_bytes(r['fixed_bytes'])} + "
            f"{fmt_bytes(r['bytes_per_example'])} per example per device; "
            f"{fmt_bytes(r['memory_bytes'])} of device memory hold "
            f"{r['estimate_per_device']} per device"]


def max_batch_lines(r: dict[str, Any] | None) -> list[str]:
    """The largest-batch lines (None: skipped on CPU)."""
    if r is None:
        return ["max batch         : skipped on CPU (host memory is not a device limit)"]
    if not r["complete"]:
        failing = r["first_failing"]
        return [f"max batch         : >= {r['max_batch_per_device']} per device (the time "
                "budget ended the search"
                + (f"; {failing} did not fit)" if failing is not None else ")")]
    if r["limit_reached"]:
        return [f"max batch         : >= {r['max_batch_per_device']} per device (the search "
                "limit)"]
    return [f"max batch         : {r['max_batch_per_device']} per device (multiple of "
            f"{r['granularity']}; {r['first_failing']} does not fit), with "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={r['mem_fraction']} of device memory for JAX"]
