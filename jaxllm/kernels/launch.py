"""pallas_call launch arguments shared by our Triton-lowered GPU kernels."""

from __future__ import annotations


def triton_params(interpret: bool, warps: int, stages: int) -> dict:
    """pallas_call keyword arguments: interpret mode (the CPU tests), or the Triton launch settings on a GPU."""
    if interpret:
        return {"interpret": True}
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (GPU only)

    return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
