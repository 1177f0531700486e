"""Pallas decode attention: one new query per row against a KV cache, in one kernel per layer.

The XLA path for a decode step is a batched matmul per einsum plus mask, max, exp, sum and divide kernels,
and it reads every cache column. Here one program per (row, KV head) streams that head's keys and values
once, for the cache columns written so far only (`length`), with the mask (positions and segment ids) and an
online softmax in float32 (base 2) in registers. Both products run on the tensor cores, which need 16 query rows:
with 16, 32 or 64 query heads each program reads the row's whole query [H, D] and masks out (and does not store)
the rows of other KV heads' query heads; with other head counts the G query heads of a KV head are zero-padded to
16 rows (a pad and a slice kernel around the call). Either way K/V are never repeated (GQA). Runs through
Pallas' Triton lowering on a GPU and with `interpret=True` anywhere (the CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
ROWS = 16  # query rows per program (the G heads of one KV head, zero-padded): the smallest tensor-core tile


def block_size(s: int, largest: int = 64) -> int | None:
    """The key block for a cache of s columns: the largest power of two <= largest dividing s, at least 16
    (None: s is not a multiple of 16)."""
    return next((b for b in (256, 128, 64, 32, 16) if b <= largest and s % b == 0), None)


def unsupported_reason(q: jax.Array, k: jax.Array, gpu: bool = True) -> str | None:
    """Why the decode kernel can't take q [B, 1, H, D] against a cache k [B, S, K, D] (None when it can).

    gpu=False: in interpret mode, where any head dim runs."""
    b, t, h, d = q.shape
    if t != 1:
        return f"{t} new tokens per row (the decode kernel takes 1)"
    if h % k.shape[2] or h // k.shape[2] > ROWS:
        return f"{h} query heads over {k.shape[2]} KV heads (the decode kernel takes up to {ROWS} per KV head)"
    if gpu and d not in (64, 128, 256):
        return f"head_dim {d} (the decode kernel takes 64, 128, 256)"
    if block_size(k.shape[1]) is None:
        return f"cache length {k.shape[1]} is not a multiple of 16"
    return None


def _kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, kseg_ref, len_ref, o_ref, *, scale: float, block: int,
            group: int | None = None):
    """One (row, KV head): q [R, D] against keys/values [S, D] up to column len; writes o [R, D].

    group None: q holds this KV head's query heads, zero-padded to R rows. group G: q holds all R query heads
    of the row; only rows hi*G .. hi*G+G-1 (this KV head's) are computed and stored."""
    q = q_ref[...]  # [R, D]
    qpos = qpos_ref[...]  # [1]
    n_blocks = lax.div(jnp.sum(len_ref[...]) + (block - 1), block)
    rows = q.shape[0]
    mine = jnp.full((rows,), True)
    if group is not None:
        mine = lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), group) == pl.program_id(1)

    def body(j, carry):
        acc, m, l = carry
        start = j * block
        k = k_ref[pl.ds(start, block), :]  # [block, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [R, block]
        allowed = (kpos_ref[pl.ds(start, block)] <= qpos) & (kseg_ref[pl.ds(start, block)] != 0)  # [block]
        s = jnp.where(allowed[None, :] & mine[:, None], s * (scale * LOG2E), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        v = v_ref[pl.ds(start, block), :]
        acc = acc * alpha[:, None] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    d = q.shape[-1]
    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, l = lax.fori_loop(0, n_blocks, body, init)
    out = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    if group is None:
        o_ref[...] = out
    else:  # the row's other KV heads' programs store the other rows of this block
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (masked store; interpret too)

        pltriton.store(o_ref, out, mask=mine[:, None])


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                     kv_segment_ids: jax.Array, length: jax.Array, *, interpret: bool | None = None,
                     block: int | None = None, warps: int = 2, stages: int | None = None,
                     pad: bool = False) -> jax.Array:
    """Attention of one new token per row over a KV cache.

    q: [B, 1, H, D]; k, v: [B, S, K, D] (S a multiple of 16); q_positions: [B, 1]; kv_positions,
    kv_segment_ids: [B, S] (segment 0 = padding); length: scalar int, the cache columns written so far
    (columns from length on are not read). Key s is attended when kv_positions[s] <= q_position and its segment
    id is not 0. Returns [B, 1, H, D] in q's dtype; a row with no allowed key gets zeros. block (the largest
    key block), warps and stages are the Triton launch settings; None picks the fastest of the H200 sweep in
    docs/benchmarks.md (scripts/bench_decode_attention.py): 64-column blocks and 2 stages for head dim 64,
    32-column blocks and 3 stages above. pad=True forces the padded-rows layout (for comparisons).
    """
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    reason = unsupported_reason(q, k, gpu=not interpret)
    if reason is not None:
        raise ValueError(f"decode_attention can't take q {q.shape}, k {k.shape}: {reason}")
    b, _, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    small = d <= 64
    block = block_size(s, block or (64 if small else 32))
    stages = stages or (2 if small else 3)
    # With 16-64 query heads (a power of two) each program reads the row's whole q and stores its own heads'
    # rows, so no padding or slicing kernels run around it; otherwise its heads are padded to ROWS rows.
    whole_row = not pad and h in (16, 32, 64)
    if whole_row:
        qg, spec, group = q.reshape(b, h, d), pl.BlockSpec((None, h, d), lambda bi, hi: (bi, 0, 0)), g
    else:
        qg = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))  # [B, K, ROWS, D]
        spec, group = pl.BlockSpec((None, None, ROWS, d), lambda bi, hi: (bi, hi, 0, 0)), None
    params = {"interpret": True}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (GPU only)

        params = {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
    row = lambda bi, hi: (bi, 0)  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, scale=d**-0.5, block=block, group=group),
        grid=(b, kh),
        in_specs=[
            spec,
            pl.BlockSpec((None, s, None, d), lambda bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, s, None, d), lambda bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, 1), row),
            pl.BlockSpec((None, s), row),
            pl.BlockSpec((None, s), row),
            pl.BlockSpec((1,), lambda bi, hi: (0,)),
        ],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        name="jaxllm_decode_attention",
        **params,
    )(qg, k, v, q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
      jnp.reshape(length, (1,)).astype(jnp.int32))
    return out.reshape(b, 1, h, d) if whole_row else out[:, :, :g].reshape(b, 1, h, d)
