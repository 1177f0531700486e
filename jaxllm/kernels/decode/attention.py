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

from jaxllm.kernels.decode.swiglu import rms_scale
from jaxllm.kernels.launch import triton_params

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
        start = j * block
        k = k_ref[pl.ds(start, block), :]  # [block, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [R, block]
        allowed = (kpos_ref[pl.ds(start, block)] <= qpos) & (kseg_ref[pl.ds(start, block)] != 0)  # [block]
        s = jnp.where(allowed[None, :] & mine[:, None], s * (scale * LOG2E), -jnp.inf)
        return _accumulate(carry, s, v_ref, start)

    d = q.shape[-1]
    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    _finish(o_ref, lax.fori_loop(0, n_blocks, body, init), None if group is None else mine)


def _accumulate(carry, s: jax.Array, v_ref, start: jax.Array):
    """One key block of the online softmax (base 2): carry (acc [R, D], max [R], sum [R]) float32; s [R, block]
    scaled scores, -inf where masked; the block's values are v_ref[start : start + block]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    v = v_ref[pl.ds(start, s.shape[1]), :]
    acc = acc * alpha[:, None] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)


def _normalised(carry) -> jax.Array:
    """The online softmax's accumulator divided by its sum, float32 [R, D] (zeros for a row with no allowed key)."""
    acc, _, l = carry
    return acc / jnp.where(l == 0.0, 1.0, l)[:, None]


def _finish(o_ref, carry, mine: jax.Array | None) -> None:
    """Normalise the online softmax's accumulator (zeros for a row with no allowed key) into o_ref; with mine,
    store only those rows (the row's other KV heads' programs store the rest)."""
    out = _normalised(carry).astype(o_ref.dtype)
    if mine is None:
        o_ref[...] = out
    else:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (masked store; interpret too)

        pltriton.store(o_ref, out, mask=mine[:, None])


def _launch(d: int, s: int, block: int | None, warps: int, stages: int | None, interpret: bool) -> tuple[int, dict]:
    """(key block, pallas_call launch kwargs) for head dim d and a cache of s columns; None picks the defaults of
    the H200 sweep (docs/benchmarks.md): 64-column blocks and 2 stages for d <= 64, 32 and 3 above."""
    small = d <= 64
    return block_size(s, block or (64 if small else 32)), triton_params(interpret, warps, stages or (2 if small else 3))


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
    block, params = _launch(d, s, block, warps, stages, interpret)
    # With 16-64 query heads (a power of two) each program reads the row's whole q and stores its own heads'
    # rows, so no padding or slicing kernels run around it; otherwise its heads are padded to ROWS rows.
    whole_row = not pad and h in (16, 32, 64)
    if whole_row:
        qg, spec, group = q.reshape(b, h, d), pl.BlockSpec((None, h, d), lambda bi, hi: (bi, 0, 0)), g
    else:
        qg = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))  # [B, K, ROWS, D]
        spec, group = pl.BlockSpec((None, None, ROWS, d), lambda bi, hi: (bi, hi, 0, 0)), None
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


# ---------------------------------------------------------------------------------------------------------
# One decode step of a layer's attention in one kernel: RoPE on the new query and key, the new key and value
# written into the cache (in place), and attention over the cache plus the new token.


def step_unsupported_reason(qkv_shape: tuple[int, ...], n_heads: int, cache_shape: tuple[int, ...],
                            gpu: bool = True, norm_width: int | None = None) -> str | None:
    """Why `decode_step` can't take a fused projection qkv [B, H+2K, D] against a cache [B, S, K, D] (None when
    it can): up to ROWS query heads per KV head; on a GPU head dims 64, 128, 256 (interpret mode: any even);
    norm_width: the width of norm_x when given (needs a power-of-two factor >= 16)."""
    b, rows, d = qkv_shape
    kh = cache_shape[2]
    if rows != n_heads + 2 * kh or n_heads % kh or n_heads // kh > ROWS:
        return f"{n_heads} query heads over {kh} KV heads in {rows} projected rows (up to {ROWS} per KV head)"
    if gpu and d not in (64, 128, 256):
        return f"head_dim {d} (the fused decode step takes 64, 128, 256)"
    if d % 2:
        return f"head_dim {d} is odd (RoPE rotates halves)"
    if block_size(cache_shape[1]) is None:
        return f"cache length {cache_shape[1]} is not a multiple of 16"
    if norm_width is not None and norm_width & -norm_width < 16:
        return f"d_model {norm_width} has no power-of-two factor >= 16 (the in-kernel RMSNorm scale)"
    return None


def _rotate(ref, cos, sin, lead: tuple) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of ref[*lead, :] in float32, as its two halves in ref's dtype (models/rope.rope)."""
    half = cos.shape[-1]
    a = ref[(*lead, pl.ds(0, half))].astype(jnp.float32)
    b = ref[(*lead, pl.ds(half, half))].astype(jnp.float32)
    return (a * cos - b * sin).astype(ref.dtype), (b * cos + a * sin).astype(ref.dtype)


def _step_queries(q_ref, cos: jax.Array, sin: jax.Array, group: int, whole: bool):
    """This program's RoPE'd query rows as two halves [R, D/2] (tensor-core tiles) and the mask [R] of the rows
    that are its KV head's query heads. whole: q_ref holds exactly the row's H query heads (16, 32 or 64), read
    at once; else q_ref holds the row's whole projection and the KV head's `group` query heads are gathered
    one by one into the top rows of a ROWS-row tile (zeros below), so any head count works."""
    if whole:
        qa, qb = _rotate(q_ref, cos[None, :], sin[None, :], (slice(None),))  # [H, D/2] each
        heads = lax.broadcasted_iota(jnp.int32, (qa.shape[0],), 0)
        return qa, qb, lax.div(heads, group) == pl.program_id(1)
    rows = lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0)
    qa = qb = jnp.zeros((ROWS, cos.shape[-1]), q_ref.dtype)
    for i in range(group):
        a, b = _rotate(q_ref, cos, sin, (pl.program_id(1) * group + i,))  # [D/2] each
        qa, qb = jnp.where(rows == i, a[None, :], qa), jnp.where(rows == i, b[None, :], qb)
    return qa, qb, rows[:, 0] < group


def _store_rows(o_ref, carry, first: jax.Array, count: int) -> None:
    """Normalise the accumulator like `_finish` and store its top `count` rows as o_ref rows first to
    first + count - 1 (a row at a time: any count, not only powers of two)."""
    out = _normalised(carry)  # [ROWS, D] float32
    rows = lax.broadcasted_iota(jnp.int32, (out.shape[0], 1), 0)
    for i in range(count):
        o_ref[first + i, :] = jnp.max(jnp.where(rows == i, out, -jnp.inf), axis=0).astype(o_ref.dtype)


def _step_kernel(q_ref, k_new_ref, v_new_ref, cos_ref, sin_ref, k_ref, v_ref, qpos_ref, kpos_ref, kseg_ref,
                 index_ref, *refs, scale: float, block: int, group: int, whole: bool, eps: float | None):
    """One (row, KV head). q_ref: the row's query heads (whole) or its whole projection, before RoPE (see
    `_step_queries`); k_new_ref, v_new_ref [D]: this KV head's new key (before RoPE) and value; k_ref/v_ref and
    k_out_ref/v_out_ref: the same cache slab [S, D]. Columns before `index` are read; column `index` is
    written; the new key enters the softmax from registers. refs: (x_ref [D_model] when eps is not None, o_ref,
    k_out_ref, v_out_ref); with x_ref the projection is of the un-normed x and is scaled here by its RMSNorm
    factor (in the RoPE tables: RoPE is linear)."""
    o_ref, k_out_ref, v_out_ref = refs[-3:]
    half = cos_ref.shape[-1]
    cos, sin = cos_ref[...], sin_ref[...]  # [D/2] float32
    v_new = v_new_ref[...]  # [D]
    if eps is not None:
        r = rms_scale(refs[0], eps)
        cos, sin, v_new = cos * r, sin * r, (v_new.astype(jnp.float32) * r).astype(v_new.dtype)
    qa, qb, mine = _step_queries(q_ref, cos, sin, group, whole)  # [R, D/2], [R, D/2], [R]
    ka, kb = _rotate(k_new_ref, cos, sin, ())  # [D/2] each
    index = jnp.sum(index_ref[...])
    k_out_ref[index, pl.ds(0, half)] = ka
    k_out_ref[index, pl.ds(half, half)] = kb
    v_out_ref[index, :] = v_new

    qpos = qpos_ref[...]  # [1]
    f32 = jnp.float32
    s_new = (jnp.sum(qa.astype(f32) * ka.astype(f32)[None, :], axis=1)
             + jnp.sum(qb.astype(f32) * kb.astype(f32)[None, :], axis=1)) * (scale * LOG2E)  # [R]
    dims = (((1,), (1,)), ((), ()))

    def body(j, carry):
        start = j * block
        cols = start + lax.broadcasted_iota(jnp.int32, (block,), 0)
        s = (lax.dot_general(qa, k_ref[pl.ds(start, block), pl.ds(0, half)], dims, preferred_element_type=f32)
             + lax.dot_general(qb, k_ref[pl.ds(start, block), pl.ds(half, half)], dims, preferred_element_type=f32))
        allowed = ((kpos_ref[pl.ds(start, block)] <= qpos) & (kseg_ref[pl.ds(start, block)] != 0)
                   & (cols < index))  # [block]; column index and later hold no key yet (the new one is in m, l)
        s = jnp.where(allowed[None, :] & mine[:, None], s * (scale * LOG2E), -jnp.inf)
        return _accumulate(carry, s, v_ref, start)

    # The softmax starts from the new key alone (weight 1 at max s_new) on this KV head's rows.
    own = jnp.where(mine, 1.0, 0.0)
    init = (own[:, None] * v_new.astype(f32)[None, :], jnp.where(mine, s_new, -jnp.inf), own)
    carry = lax.fori_loop(0, lax.div(index + (block - 1), block), body, init)
    if whole:
        _finish(o_ref, carry, mine)
    else:
        _store_rows(o_ref, carry, pl.program_id(1) * group, group)


def decode_step(qkv: jax.Array, n_heads: int, cos: jax.Array, sin: jax.Array, cache_k: jax.Array,
                cache_v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array, kv_segment_ids: jax.Array,
                index: jax.Array, *, norm_x: jax.Array | None = None, eps: float = 1e-5,
                interpret: bool | None = None, block: int | None = None, warps: int = 2, stages: int | None = None,
                pad: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's attention for one new token per row, from the fused q/k/v projection, in one kernel.

    qkv: [B, H+2K, D], the projection before RoPE (rows: H query heads, K keys, K values); cos, sin: [B, D/2]
    float32 RoPE tables of the new tokens' positions (models/rope.rope_tables); cache_k, cache_v: [B, S, K, D]
    (S a multiple of 16), updated in place at column `index` (a scalar int: the columns before it are the
    cache so far); q_positions: [B, 1]; kv_positions, kv_segment_ids: [B, S] as in `decode_attention`.
    Returns (attention [B, H, D], cache_k, cache_v). Equals models/rope.rope on q and k, then
    dynamic_update_slice into the cache, then `decode_attention` with length index + 1 — with the three
    small kernels around the attention gone. norm_x: [B, D_model], the un-normed layer input when qkv is its
    projection through RMSNorm-folded weights (models/decode.fold_norms): the kernel scales the projection by
    rsqrt(mean(norm_x^2) + eps) per row, so no RMSNorm kernel runs before the matmul. Launch settings as
    `decode_attention`. With 16, 32 or 64 query heads each program reads the row's whole query; otherwise (or
    pad=True) it gathers its KV head's query heads into a padded tile (`_step_queries`).
    """
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    reason = step_unsupported_reason(qkv.shape, n_heads, cache_k.shape, gpu=not interpret,
                                     norm_width=None if norm_x is None else norm_x.shape[-1])
    if reason is not None:
        raise ValueError(f"decode_step can't take qkv {qkv.shape}, cache {cache_k.shape}: {reason}")
    b, _, d = qkv.shape
    s, kh = cache_k.shape[1], cache_k.shape[2]
    block, params = _launch(d, s, block, warps, stages, interpret)
    row = lambda bi, hi: (bi, 0)  # noqa: E731
    whole = not pad and n_heads in (16, 32, 64)
    q_rows = n_heads if whole else n_heads + 2 * kh  # the query heads, or the whole projection to gather from
    o_spec = pl.BlockSpec((None, n_heads, d), lambda bi, hi: (bi, 0, 0))
    cache_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi: (bi, 0, hi, 0))
    out, cache_k, cache_v = pl.pallas_call(
        functools.partial(_step_kernel, scale=d**-0.5, block=block, group=n_heads // kh, whole=whole,
                          eps=None if norm_x is None else eps),
        grid=(b, kh),
        in_specs=[
            pl.BlockSpec((None, q_rows, d), lambda bi, hi: (bi, 0, 0)),
            pl.BlockSpec((None, None, d), lambda bi, hi: (bi, n_heads + hi, 0)),
            pl.BlockSpec((None, None, d), lambda bi, hi: (bi, n_heads + kh + hi, 0)),
            pl.BlockSpec((None, d // 2), row),
            pl.BlockSpec((None, d // 2), row),
            cache_spec,
            cache_spec,
            pl.BlockSpec((None, 1), row),
            pl.BlockSpec((None, s), row),
            pl.BlockSpec((None, s), row),
            pl.BlockSpec((1,), lambda bi, hi: (0,)),
            *([] if norm_x is None else [pl.BlockSpec((None, norm_x.shape[-1]), row)]),
        ],
        out_specs=[o_spec, cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct((b, n_heads, d), qkv.dtype), jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                   jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)],
        input_output_aliases={5: 1, 6: 2},
        name="jaxllm_decode_step",
        **params,
    )(qkv, qkv, qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), cache_k, cache_v,
      q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
      jnp.reshape(index, (1,)).astype(jnp.int32), *([] if norm_x is None else [norm_x]))
    return out, cache_k, cache_v
