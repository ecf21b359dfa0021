"""Dense peak TFLOP/s of known accelerators, and MFU against them."""

from __future__ import annotations

# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's data sheets, (bf16, tf32).
# fp32 convolutions and matmuls run as TF32 on these GPUs under JAX's default precision.
# Matched by substring of device.device_kind, first match wins (specific names first).
KNOWN_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.4, 494.7),  # SXM; a large bf16 matmul measured ~790 on these machines
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
)
_HALF_DTYPES = ("bfloat16", "float16")


def known_peak_tflops(device_kind: str, dtype_name: str) -> float | None:
    """Dense peak TFLOP/s of one device for `dtype_name` from the table, or None.

    Args:
      device_kind: jax's device.device_kind, e.g. "NVIDIA H100 80GB HBM3".
      dtype_name: the compute dtype; bfloat16/float16 read the bf16 column, anything
        else the TF32 one.

    Returns:
      The first KNOWN_PEAK_TFLOPS entry whose name is in `device_kind`, or None.
    """
    for name, bf16, tf32 in KNOWN_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype_name in _HALF_DTYPES else tf32
    return None


def peak_for(platform: str, device_kind: str, dtype_name: str, given: float) -> float | None:
    """The peak MFU is measured against: `given` if set, else the table (never for CPUs).

    Args:
      platform: jax's device.platform ("gpu", "tpu", "cpu").
      device_kind: jax's device.device_kind.
      dtype_name: the compute dtype's name.
      given: a peak from the command line; 0 = none.

    Returns:
      TFLOP/s per device, or None when unknown (MFU is then n/a).
    """
    if given:
        return given
    if platform == "cpu":
        return None
    return known_peak_tflops(device_kind, dtype_name)


def mfu(tflops_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak TFLOP/s per device, None without a peak."""
    return tflops_per_device / peak if peak else None
