"""RMS-normed SwiGLU activation for decoding, in one Pallas kernel.

With the MLP's RMSNorm weight folded into the gate/up matrix (models/decode.fold_norms), the layer computes
gate|up = x @ (g * W) from the un-normed residual stream x, and the norm's per-row scale r = rsqrt(mean(x^2) +
eps) moves after the matmul: silu(r * gate) * (r * up). That is the same math as the norm, a matmul and silu,
with one kernel fewer per layer: the RMSNorm kernel is gone, this kernel takes the place of XLA's silu * up
fusion (XLA can't fuse the row reduction into that elementwise fusion). Decode steps are a chain of ~150 small
kernels, each with a fixed cost of ~1.5-2 us on an H100/H200, so a kernel fewer per layer is worth having.
Runs through Pallas' Triton lowering on a GPU and with `interpret=True` anywhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.kernels.launch import triton_params


def _pow2_chunk(n: int, largest: int) -> int:
    """The largest power of two <= largest dividing n."""
    return min(n & -n, largest)


def rms_scale(x_ref, eps: float, largest: int = 2048) -> jax.Array:
    """In a kernel: rsqrt(mean(x^2) + eps) in float32 over the last axis of x_ref ([..., D] -> [...]).
    Read in power-of-two chunks of up to `largest` (Triton's block sizes), so D only needs a power-of-two
    factor >= 16."""
    d = x_ref.shape[-1]
    chunk = _pow2_chunk(d, largest)
    total = None
    for i in range(d // chunk):
        part = x_ref[(slice(None),) * (x_ref.ndim - 1) + (pl.ds(i * chunk, chunk),)].astype(jnp.float32)
        part = jnp.sum(part * part, axis=-1)
        total = part if total is None else total + part
    return lax.rsqrt(total / d + eps)


def row_block(rows: int, largest: int) -> int:
    """Rows per program: the largest power of two <= largest dividing rows."""
    return _pow2_chunk(rows, largest)


def unsupported_reason(rows: int, d_model: int, d_ff: int) -> str | None:
    """Why `normed_swiglu` can't take x [rows, d_model] with gate|up [rows, 2 * d_ff] (None when it can)."""
    if d_model & -d_model < 16:
        return f"d_model {d_model} has no power-of-two factor >= 16"
    if d_ff & -d_ff < 16:
        return f"d_ff {d_ff} has no power-of-two factor >= 16"
    return None


def reference(x: jax.Array, gate_up: jax.Array, eps: float) -> jax.Array:
    """The jnp oracle: silu(r * gate) * (r * up) with r = rsqrt(mean(x^2) + eps) per row, float32 math, in
    gate_up's dtype. x: [..., D]; gate_up: [..., 2F] (gate columns, then up columns) -> [..., F]."""
    x32 = x.astype(jnp.float32)
    r = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    gate, up = jnp.split(gate_up.astype(jnp.float32) * r, 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(gate_up.dtype)


def _kernel(x_ref, gate_ref, up_ref, o_ref, *, eps: float, chunk: int):
    r = rms_scale(x_ref, eps, chunk)[:, None]  # [R, 1]
    gate = gate_ref[...].astype(jnp.float32) * r
    up = up_ref[...].astype(jnp.float32) * r
    o_ref[...] = (gate * up / (1.0 + jnp.exp(-gate))).astype(o_ref.dtype)


def normed_swiglu(x: jax.Array, gate_up: jax.Array, eps: float, *, interpret: bool | None = None,
                  rows: int = 1, cols: int = 512, chunk: int = 2048, warps: int = 4) -> jax.Array:
    """`reference` in one kernel. x: [M, D] (the un-normed residual stream); gate_up: [M, 2F] -> [M, F] in
    gate_up's dtype. One program per block of rows and `cols` output columns (a power of two; smaller when F
    is not a multiple of it); each program computes its rows' scale from x itself. The defaults (1 row, 512
    columns, 4 warps) were the fastest for the 1b decode shape in an H200 sweep (docs/benchmarks.md)."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    (m, d), f = x.shape, gate_up.shape[-1] // 2
    reason = unsupported_reason(m, d, f)
    if reason is not None or gate_up.shape != (m, 2 * f):
        raise ValueError(f"normed_swiglu can't take x {x.shape}, gate_up {gate_up.shape}: "
                         f"{reason or 'want gate_up [M, 2F] with the rows of x'}")
    rows, cols = row_block(m, rows), _pow2_chunk(f, cols)
    params = triton_params(interpret, warps, 1)
    blocks = f // cols
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, chunk=chunk),
        grid=(m // rows, blocks),
        in_specs=[pl.BlockSpec((rows, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((rows, cols), lambda i, j: (i, j)),
                  pl.BlockSpec((rows, cols), lambda i, j: (i, j + blocks))],
        out_specs=pl.BlockSpec((rows, cols), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, f), gate_up.dtype),
        name="jaxllm_normed_swiglu",
        **params,
    )(x, gate_up, gate_up)
