"""Exact top-k of each row of a [B, V] float32 array, and the row's log-sum-exp, in one Pallas kernel.

Top-k sampling needs, every decode step, the k largest logits of each row and (for the log-probs) the row's
log-sum-exp. XLA does that with reductions over the row, a sort of the chunk maxima, a gather and a second sort
(the whole draw: 48.8 us at [64, 32000], k=50, on an H200). Here one program per row:

1. streams the row as chunks of C columns, keeping each chunk's maximum and an online log-sum-exp;
2. finds the k-th largest chunk maximum by bisection over the bits of an order-preserving int32 key of the
   floats (up to 32 count passes over values in registers, no sort; it stops once exactly k keys lie at or
   above the bound), and picks exactly k chunks (ties: lowest index).
   The row's k largest values all lie in those chunks: a value outside them is below k chunk maxima;
3. gathers those k chunks' values and picks exactly k of them the same way (ties: lowest column);
4. writes the k values and their columns, in column order (not sorted), through a prefix sum of the selection.

The chunk ids picked in step 2 go through a small scratch output and a barrier (a CTA's global writes are
visible to its other threads after it). Runs through Pallas' Triton lowering on a GPU and with
`interpret=True` anywhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.kernels.launch import triton_params

INT_MIN = -(2**31)
MAX_CHUNKS = 16384  # chunk maxima held in registers (a 512k-token vocabulary)
MAX_CANDIDATES = 8192  # candidate values held in registers (top_k up to 255 with 32-column chunks)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def chunk_size(v: int) -> int:
    """The chunk width for a row of v values: the largest power of two <= 32 dividing v."""
    return min(v & -v, 32)


def unsupported_reason(v: int, k: int) -> str | None:
    """Why `top_k` can't take rows of v values with this k (None when it can)."""
    c = chunk_size(v)
    if c < 8:
        return f"vocabulary size {v} has no power-of-two factor >= 8 (the kernel's chunk width)"
    if not 1 <= k <= v:
        return f"top_k={k} is not in [1, {v}]"
    if _next_pow2(v // c) > MAX_CHUNKS:
        return f"vocabulary size {v} makes {v // c} chunks of {c} (the kernel holds up to {MAX_CHUNKS} maxima)"
    if _next_pow2(min(k, v // c) + 1) * c > MAX_CANDIDATES:
        return f"top_k={k} needs more than {MAX_CANDIDATES} candidates in registers"
    return None


def _keys(x: jax.Array, valid: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 values x (-0.0 equal to 0.0; invalid entries: INT_MIN, below every
    value)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.int32)
    return jnp.where(valid, jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits), INT_MIN)


def _kth_largest(keys: jax.Array, k: int) -> jax.Array:
    """The k-th largest of the int32 keys [A, B]: built bit by bit in offset-binary (unsigned) order, each bit
    kept when at least k keys are >= the candidate. It stops early once exactly k keys are >= the candidate
    (distinct values usually get there in about half of the 32 passes): the k-th largest is then their
    minimum. (A radix select counting 16 prefixes per pass, 8 passes, was slower on an H200: 44.8 vs 32.2 us
    per call; docs/benchmarks.md.)"""
    def body(state):
        bit, answer, _ = state
        candidate = answer | jnp.left_shift(jnp.int32(1), bit)  # bit 31: INT_MIN, the offset-binary top bit
        count = jnp.sum((keys >= (candidate ^ INT_MIN)).astype(jnp.int32))
        keep = count >= k
        return bit - 1, jnp.where(keep, candidate, answer), keep & (count == k)

    _, answer, exact = lax.while_loop(lambda s: (s[0] >= 0) & ~s[2], body, (jnp.int32(31), jnp.int32(0), False))
    floor = answer ^ INT_MIN
    return jnp.where(exact, jnp.min(jnp.where(keys >= floor, keys, jnp.iinfo(jnp.int32).max)), floor)


def _exclusive_cumsum(m: jax.Array) -> jax.Array:
    """Exclusive prefix sum of the int32 [A, B] in row-major order."""
    within = jnp.cumsum(m, axis=1)
    totals = jnp.sum(m, axis=1)
    return (jnp.cumsum(totals) - totals)[:, None] + within - m


def _select(keys: jax.Array, k: int, spare: int) -> tuple[jax.Array, jax.Array]:
    """(mask of exactly k largest keys [A, B] (ties at the k-th: first in row-major order), their slots 0..k-1
    in row-major order; `spare` elsewhere, a slot nothing reads, so masked scatters never collide)."""
    threshold = _kth_largest(keys, k)
    above = keys > threshold
    tied = (keys == threshold).astype(jnp.int32)
    need = k - jnp.sum(above.astype(jnp.int32))
    chosen = above | ((tied == 1) & (_exclusive_cumsum(tied) < need))
    return chosen, jnp.where(chosen, _exclusive_cumsum(chosen.astype(jnp.int32)), spare)


def _kernel(x_ref, values_ref, columns_ref, lse_ref, chunks_ref, *, k: int, rows: int, slices: int,
            scale: float, barrier: bool):
    """One row. x_ref: [NC, C] (the row as chunks); values_ref, columns_ref: [W], W > k a power of two, the
    first k written; chunks_ref: [W1], W1 > min(k, NC), scratch for the picked chunk ids; lse_ref: [1]."""
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (masked loads; interpret too)

    n_chunks, c = x_ref.shape
    slot_ids = lax.broadcasted_iota(jnp.int32, (slices, rows), 0)

    def stream(s, carry):
        maxima, m, total = carry
        chunk = s * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)  # [R, 1]
        x = pltriton.load(x_ref.at[pl.ds(s * rows, rows), :], mask=jnp.broadcast_to(chunk < n_chunks, (rows, c)),
                          other=-jnp.inf)  # [R, C]
        m_new = jnp.maximum(m, jnp.max(x) * scale)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        total = total * jnp.exp(m - m_use) + jnp.sum(jnp.exp(x * scale - m_use))
        return jnp.where(slot_ids == s, jnp.max(x, axis=1)[None, :], maxima), m_new, total

    init = (jnp.full((slices, rows), -jnp.inf, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0))
    maxima, m, total = lax.fori_loop(0, slices, stream, init)
    lse_ref[...] = jnp.full((1,), jnp.log(total) + jnp.where(m == -jnp.inf, 0.0, m))

    chunk_ids = slot_ids * rows + lax.broadcasted_iota(jnp.int32, (slices, rows), 1)  # [S, R]
    w = chunks_ref.shape[0]
    n_picked = min(k, n_chunks)  # chunks; when all are picked they still hold k values
    picked, slot = _select(_keys(maxima, chunk_ids < n_chunks), n_picked, w - 1)
    pltriton.store(chunks_ref.at[slot], chunk_ids, mask=picked)
    if barrier:  # every thread's chunk ids written before any thread reads them (interpret mode: sequential)
        pltriton.debug_barrier()
    real_row = lax.broadcasted_iota(jnp.int32, (w,), 0) < n_picked
    real = jnp.broadcast_to(real_row[:, None], (w, c))  # [W, C]
    ids = jnp.broadcast_to(jnp.where(real_row, chunks_ref[...], 0)[:, None], (w, c))  # [W, C]
    within = lax.broadcasted_iota(jnp.int32, (w, c), 1)
    x = pltriton.load(x_ref.at[ids, within], mask=real, other=-jnp.inf)  # [W, C]: the picked chunks
    columns = ids * c + within
    picked, slot = _select(_keys(x, real), k, values_ref.shape[0] - 1)
    pltriton.store(values_ref.at[slot], x, mask=picked)
    pltriton.store(columns_ref.at[slot], columns, mask=picked)


def top_k(x: jax.Array, k: int, *, scale: float = 1.0, interpret: bool | None = None, rows: int = 256,
          warps: int = 8, stages: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k largest values of each row of x [B, V] float32 and their columns, plus logsumexp(scale * x)
    per row: (values [B, k] float32, columns [B, k] int32, lse [B] float32).

    Exact: the same set as `jax.lax.top_k(x, k)`, ties at the k-th value broken by the lowest column; the k
    entries come in column order, not sorted. rows: chunks per streamed tile (a power of two); warps, stages:
    Triton launch settings. The defaults were the fastest of an H200 sweep at [64, 32000], k=50: 32 us per call
    (4 warps: 44.7; 64-chunk tiles: 36.6), where XLA's path in `sampling` (two sorts) took 48.8 for the whole
    draw; about 12 us of the 32 streamed the row, 9 picked the chunks, 12 picked the values. Stopping the
    bisections early took a later H200 from 24.5 to 20.3 us per call (docs/benchmarks.md).
    """
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    b, v = x.shape
    reason = unsupported_reason(v, k)
    if reason is not None:
        raise ValueError(f"top_k can't take x {x.shape} with k={k}: {reason}")
    c = chunk_size(v)
    n_chunks = v // c
    rows = min(rows, _next_pow2(n_chunks))
    slices = _next_pow2(n_chunks) // rows
    params = triton_params(interpret, warps, stages)
    w = _next_pow2(k + 1)  # > k: slot w - 1 takes the masked-off scatters
    w_chunks = _next_pow2(min(k, n_chunks) + 1)
    row = lambda i: (i, 0)  # noqa: E731
    values, columns, lse, _ = pl.pallas_call(
        functools.partial(_kernel, k=k, rows=rows, slices=slices, scale=scale, barrier=not interpret),
        grid=(b,),
        in_specs=[pl.BlockSpec((None, n_chunks, c), lambda i: (i, 0, 0))],
        out_specs=[pl.BlockSpec((None, w), row), pl.BlockSpec((None, w), row), pl.BlockSpec((None, 1), row),
                   pl.BlockSpec((None, w_chunks), row)],
        out_shape=[jax.ShapeDtypeStruct((b, w), jnp.float32), jax.ShapeDtypeStruct((b, w), jnp.int32),
                   jax.ShapeDtypeStruct((b, 1), jnp.float32), jax.ShapeDtypeStruct((b, w_chunks), jnp.int32)],
        name="jaxllm_top_k",
        **params,
    )(x.astype(jnp.float32).reshape(b, n_chunks, c))
    return values[:, :k], columns[:, :k], lse[:, 0]
