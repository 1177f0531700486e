"""Whether this process can run the Mosaic GPU attention kernels, and whether it asked for deterministic ops."""

from __future__ import annotations

import os

import jax


def cuda_runtime() -> int | None:
    """The CUDA runtime version jaxlib loaded (e.g. 12090), or None without a CUDA plugin."""
    try:
        from jax._src.lib import cuda_versions  # noqa: PLC0415 (absent on CPU-only installs)

        return int(cuda_versions.cuda_runtime_get_version())
    except Exception:  # noqa: BLE001 (no CUDA plugin: the caller treats None as unknown)
        return None


def unavailable_reason(causal: bool, interpret: bool) -> str | None:
    """Why no Mosaic GPU kernel can run here (None on a Hopper GPU with a CUDA runtime that compiles them)."""
    if interpret:
        return "interpret mode (the Mosaic GPU kernels run on Hopper GPUs only)"
    device = jax.devices()[0]
    if device.platform != "gpu" or not str(getattr(device, "compute_capability", "")).startswith("9."):
        return f"{device.device_kind} is not a Hopper GPU (compute capability 9.x; wgmma)"
    runtime = cuda_runtime()
    if causal and runtime is not None and 12080 <= runtime < 12091:
        return f"CUDA runtime {runtime}: ptxas 12.8-12.9.0 miscompiles the causal mask (upgrade to >= 12.9.1)"
    return None


def deterministic_requested() -> bool:
    """Whether XLA was asked for bitwise-reproducible GPU ops (XLA_FLAGS=--xla_gpu_deterministic_ops=true)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return any(f in ("--xla_gpu_deterministic_ops", "--xla_gpu_deterministic_ops=true",
                     "--xla_gpu_deterministic_ops=1") for f in flags)
