"""Flash-attention backward for Hopper GPUs in Pallas Mosaic GPU: dQ, dK and dV in one pass.

Each CTA owns 128 key rows of one KV head: two compute warpgroups hold 64 key rows each, and a third streams
the query blocks (q, dO, log-sum-exp, delta) of the G query heads that see those keys through a ring of
shared-memory slots by TMA. Per 64-query block a compute warpgroup runs, with P^T and dS^T in registers:

    s^T = K Q^T, dP^T = V dO^T        (one wgmma batch)
    P^T = exp2(s^T * scale * log2 e - lse), dS^T = P^T (dP^T - delta)
    dV += P^T dO, dK += dS^T Q       (accumulated in registers over all query blocks)
    dQ[:, half] = dS K[:, half]      (dS^T of both warpgroups shared through shared memory)

Each warpgroup computes one half of dQ's columns over all 128 keys, so a CTA adds one [64, D] float32 partial
per query block into a float32 dQ in HBM, by TMA reduce-add. That sum's order depends on CTA timing: dQ is
not bitwise reproducible run to run (pallas_gpu picks the two-kernel Triton backward when determinism is asked
for). Causal CTAs skip the query blocks that see none of their keys and mask only the blocks crossing the
diagonal; without a mask each CTA starts at its own query block and wraps around, so the CTAs of one head
don't add into the same dQ block at once (as the causal diagonal staggers them). With segment ids (packed
documents, 0 = padding) a CTA visits only the query blocks that may share a document with its keys, and masks
none where one document fills both the query block and the key tile (`tiles.segment_ranges`, computed by XLA
before the kernel).

Inputs follow pallas_gpu's conventions: padded q, dO [B, Tp, H, D], k, v [B, Sp, K, D], and the forward's
base-2 log-sum-exp [B, H, Tp] (+inf for a row with no allowed key, whose probabilities are then 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxllm.kernels.flash_attention import mosaic_gpu, tiles
from jaxllm.kernels.flash_attention.mosaic_gpu import DTYPES, LOG2E

ROWS = 64  # key rows per compute warpgroup, and query rows per block (wgmma's M)
WGS = 2  # compute warpgroups per CTA; one more loads
KEYS = WGS * ROWS  # key rows per CTA
GROUP = 16  # (batch row, KV head) pairs per group of the CTA order (_coordinates)
SLOTS = 2  # query blocks in flight (H200 sweep: 3 slots were slower)
HEAD_DIMS = (128,)  # each warpgroup takes one 64-column half of dQ


def unsupported_reason(dtype, head_dim: int, tp: int, sp: int) -> str | None:
    """Why `backward` can't take padded q [B, Tp, H, D] against k [B, Sp, K, D] (None when it can)."""
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (the Mosaic GPU backward takes bf16 and fp16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the Mosaic GPU backward takes {', '.join(map(str, HEAD_DIMS))})"
    if tp % ROWS:
        return f"{tp} query rows is not a multiple of {ROWS}"
    if sp % KEYS:
        return f"{sp} keys is not a multiple of {KEYS}"
    return None


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """One CTA's view: static settings, its coordinates and query-block range, refs, scratch and barriers."""

    scale: float
    causal: bool
    offset: int  # query t sees keys <= t + offset
    s_real: int | None  # keys at and past s_real are padding
    has_seg: bool
    group: int  # query heads per KV head
    b: jax.Array
    kh: jax.Array
    k0: jax.Array  # the CTA's first key row
    start: jax.Array  # the CTA's query blocks are [start, end); those in [p0, p1) need no mask
    end: jax.Array | int  # n_q without segment ids
    p0: jax.Array
    p1: jax.Array | int
    rot: jax.Array | None  # without a causal mask or segment ids: the CTA visits the query blocks from this one
    # on, wrapping around, so the CTAs of one head add into different dQ blocks at a time
    refs: tuple  # q, k, v, do, lse, delta, dq (float32 accumulator), dk, dv, q_seg, kv_seg (or None, None)
    smem: tuple  # k [KEYS, D], v, q [SLOTS, ROWS, D], do, lse [SLOTS, ROWS], delta, ds [2, KEYS, ROWS],
    # dq [WGS, ROWS, D/2], q_seg [SLOTS, ROWS], kv_seg [KEYS] (segment buffers None without segment ids)
    bars: tuple  # kv [2 WGS], q, do, lse, delta [SLOTS], free [SLOTS] (WGS arrivals), ds [2] (WGS arrivals), done,
    # q_seg [SLOTS], kv_seg [WGS]


def _rows(ref, wg):
    return ref.at[pl.ds(wg * ROWS, ROWS)]


def _block(c: _Ctx, i):
    """The query block that the CTA's step through block index i visits."""
    return i if c.rot is None else lax.rem(i + c.rot, jnp.int32(c.end))


def _allowed(c: _Ctx, wg, i, slot, shape):
    """Which of P^T's [keys, queries] entries for query block i may be nonzero (the forward's mask)."""
    allowed = None

    def both(a, b):
        return b if a is None else a & b

    # Positions as vectors (a few registers per thread), broadcast only into the comparisons: full-tile iotas
    # cost two more [64, 64] int32 tiles of registers in the step that already holds the most.
    if c.s_real is not None or c.causal:  # (only where used: an unused one hung a non-causal packed case)
        key = c.k0 + wg * ROWS + plgpu.broadcasted_iota(jnp.int32, shape[:1], 0,
                                                         layout=plgpu.Layout.WGMMA.reduce(1))
        key = lax.broadcast_in_dim(key, shape, [0])
    if c.s_real is not None:
        allowed = key < c.s_real
    if c.causal:
        query = i * ROWS + c.offset + plgpu.broadcasted_iota(jnp.int32, shape[1:], 0,
                                                              layout=plgpu.Layout.WGMMA.reduce(0))
        allowed = both(allowed, key <= lax.broadcast_in_dim(query, shape, [1]))
    if c.has_seg:
        qs = plgpu.load(c.smem[8].at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        ks = plgpu.load(_rows(c.smem[9], wg), layout=plgpu.Layout.WGMMA.reduce(1))
        qs = lax.broadcast_in_dim(qs, shape, [1])
        allowed = both(allowed, (qs == lax.broadcast_in_dim(ks, shape, [0])) & (qs != 0))
    return jnp.ones(shape, jnp.bool_) if allowed is None else allowed


def _probs(c: _Ctx, wg, i, slot, masked: bool):
    """P^T and dS^T [ROWS keys, ROWS queries] float32 of query block i (its q, dO in `slot`)."""
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = c.smem[:6]
    _, q_ready, do_ready, lse_ready, delta_ready = c.bars[:5]
    # Every step waits on every barrier of its slot, also those it does not read (the segment ids of a step
    # without a mask): a barrier's wait tracks its phase, so a skipped wait would desynchronise the ring.
    for bar in (q_ready, do_ready, lse_ready, *((c.bars[8],) if c.has_seg else ())):
        plgpu.barrier_wait(bar.at[slot])

    def scores(s_ref, dp_ref):  # P^T is computed while dP^T is still being multiplied
        plgpu.wgmma(s_ref, _rows(k_smem, wg), q_smem.at[slot].transpose((1, 0)))
        plgpu.wgmma(dp_ref, _rows(v_smem, wg), do_smem.at[slot].transpose((1, 0)))
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        p = jnp.exp2(s * (c.scale * LOG2E) - lax.broadcast_in_dim(lse, s.shape, [1]))
        if masked:
            p = jnp.where(_allowed(c, wg, i, slot, s.shape), p, 0.0)
        plgpu.barrier_wait(delta_ready.at[slot])
        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=0)
        return p, p * (dp - lax.broadcast_in_dim(delta, dp.shape, [1]))

    return pl.run_scoped(scores, plgpu.ACC((ROWS, ROWS), jnp.float32), plgpu.ACC((ROWS, ROWS), jnp.float32))


def _step(c: _Ctx, wg, g, i, carry, masked: bool):
    """One query block of query head g: accumulate dK, dV; add this CTA's share of dQ into HBM."""
    dk, dv = carry
    k_smem, q_smem, do_smem, ds_smem, dq_smem = (c.smem[j] for j in (0, 2, 3, 6, 7))
    free, ds_ready = c.bars[5], c.bars[6]
    n = g * (c.end - c.start) + (i - c.start)  # the step count, which picks the slot and the dS buffer
    slot, buf = lax.rem(n, jnp.int32(SLOTS)), lax.rem(n, jnp.int32(2))
    p, ds = _probs(c, wg, i, slot, masked)
    p, ds = p.astype(q_smem.dtype), ds.astype(q_smem.dtype)
    _rows(ds_smem.at[buf], wg)[...] = ds
    plgpu.commit_smem()
    plgpu.barrier_arrive(ds_ready.at[buf])
    half = q_smem.shape[-1] // 2

    def grads(refs):  # dQ's share goes out while dK is still being multiplied
        dv_ref, dk_ref, dq_ref = refs
        plgpu.wgmma(dv_ref, p, do_smem.at[slot])
        plgpu.barrier_wait(ds_ready.at[buf])  # the other warpgroup's dS^T is in shared memory
        plgpu.wgmma(dq_ref, ds_smem.at[buf].transpose((1, 0)), k_smem.at[:, pl.ds(wg * half, half)])
        plgpu.wgmma(dk_ref, ds, q_smem.at[slot])
        dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=1)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's reduce-add has read dq_smem
        dq_smem.at[wg][...] = dq
        plgpu.commit_smem()
        head = c.kh * c.group + g
        plgpu.copy_smem_to_gmem(dq_smem.at[wg], c.refs[6].at[c.b, pl.ds(_block(c, i) * ROWS, ROWS), head,
                                                             pl.ds(wg * half, half)], reduction_op="add")

    zeros = plgpu.layout_cast(jnp.zeros((ROWS, half), jnp.float32), plgpu.Layout.WGMMA)
    dv, dk, _ = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(zeros)))
    plgpu.barrier_arrive(free.at[slot])
    return dk, dv


def _compute(c: _Ctx, wg):
    plgpu.set_max_registers(240, action="increase")
    k_ref, v_ref, dk_ref, dv_ref = (c.refs[i] for i in (1, 2, 7, 8))
    k_smem, v_smem = c.smem[0], c.smem[1]
    kv_ready = c.bars[0]
    rows = pl.ds(c.k0 + wg * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[c.b, rows, c.kh], _rows(k_smem, wg), kv_ready.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[c.b, rows, c.kh], _rows(v_smem, wg), kv_ready.at[WGS + wg])
    if c.has_seg:
        plgpu.copy_gmem_to_smem(c.refs[10].at[c.b, rows], _rows(c.smem[9], wg), c.bars[9].at[wg])
        plgpu.barrier_wait(c.bars[9].at[wg])
    plgpu.barrier_wait(kv_ready.at[wg])
    plgpu.barrier_wait(kv_ready.at[WGS + wg])
    zeros = plgpu.layout_cast(jnp.zeros((ROWS, k_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    carry = (zeros, zeros)
    for g in range(c.group):
        carry = tiles.loops(functools.partial(_step, c, wg, g), (c.start, c.p0, c.p1, c.end), carry)
    dk, dv = carry  # (the last dQ adds need not land before K is overwritten: they read dq_smem, not K)
    plgpu.barrier_arrive(c.bars[7])  # both warpgroups are done reading K (dQ) before it is overwritten
    plgpu.barrier_wait(c.bars[7])
    _rows(k_smem, wg)[...] = (dk * c.scale).astype(k_smem.dtype)
    _rows(v_smem, wg)[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(_rows(k_smem, wg), dk_ref.at[c.b, rows, c.kh])
    plgpu.copy_smem_to_gmem(_rows(v_smem, wg), dv_ref.at[c.b, rows, c.kh])
    plgpu.wait_smem_to_gmem(0)


def _load(c: _Ctx):
    """The loader warpgroup: query block after query block (head by head) into the slot ring."""
    plgpu.set_max_registers(24, action="decrease")
    q_ref, do_ref, lse_ref, delta_ref = (c.refs[i] for i in (0, 3, 4, 5))
    q_smem, do_smem, lse_smem, delta_smem = c.smem[2:6]
    _, q_ready, do_ready, lse_ready, delta_ready, free = c.bars[:6]
    per_head = c.end - c.start

    def fetch(n, slot):
        head = c.kh * c.group + lax.div(n, per_head)
        rows = pl.ds(_block(c, c.start + lax.rem(n, per_head)) * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[c.b, rows, head], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[c.b, head, rows], lse_smem.at[slot], lse_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[c.b, rows, head], do_smem.at[slot], do_ready.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[c.b, head, rows], delta_smem.at[slot], delta_ready.at[slot])
        if c.has_seg:
            plgpu.copy_gmem_to_smem(c.refs[9].at[c.b, rows], c.smem[8].at[slot], c.bars[8].at[slot])

    total = c.group * per_head
    for s in range(SLOTS):
        pl.when(s < total)(functools.partial(fetch, jnp.int32(s), s))

    @pl.loop(SLOTS, total)
    def _refill(n):
        slot = lax.rem(n, jnp.int32(SLOTS))
        plgpu.barrier_wait(free.at[slot])
        fetch(n, slot)


def _coordinates(batch: int, kv_heads: int, n_kt: int):
    """(batch row, KV head, key tile) of this CTA on the 1-D grid. Heads go in groups of up to GROUP; within a
    group, key tile by key tile (the heaviest causal tiles, the first keys, start first), so the causal tail
    is short while a group's q, dO and dQ stay in L2 (H200: +4% / +3% / +0% at S 2k / 4k / 8k over a
    head-major order)."""
    heads = batch * kv_heads
    size = max(g for g in range(1, min(GROUP, heads) + 1) if heads % g == 0)
    cta = lax.axis_index("cta")
    group, r = lax.div(cta, n_kt * size), lax.rem(cta, n_kt * size)
    unit = group * size + lax.rem(r, size)
    return lax.div(unit, kv_heads), lax.rem(unit, kv_heads), lax.div(r, size)


def _kernel(*refs, scratch, scale, causal, offset, s_real, group, has_seg):
    smem, bars = scratch
    n_q = refs[0].shape[1] // ROWS
    ranges = refs[9] if has_seg else None
    refs = (*refs[:7], *refs[-2:], *(refs[7:9] if has_seg else (None, None)))  # inputs, then dk, dv
    b, kh, kt = _coordinates(refs[0].shape[0], refs[1].shape[2], refs[1].shape[1] // KEYS)
    k0 = kt * KEYS
    lo, lo_full = tiles.query_blocks(k0, KEYS, bq=ROWS, n_q=n_q, causal=causal, offset=offset, s_real=s_real)
    # With segment ids only the query blocks that may share a document with the CTA's keys, and no segment mask
    # where one document fills both the query block and the key tile (tiles.segment_ranges).
    seg = tuple(ranges[b, kt, j] for j in range(4)) if has_seg else None
    start, p0, p1, end = tiles.query_plan(lo, lo_full, n_q, seg)
    # Without a causal mask every CTA of a head would start at query block 0 and add into the same dQ block at
    # the same time: start each at its own block instead, as the causal diagonal does.
    rot = None if causal or has_seg else lax.rem(kt * (KEYS // ROWS), jnp.int32(n_q))
    c = _Ctx(scale=scale, causal=causal, offset=offset, s_real=s_real, has_seg=has_seg, group=group, b=b, kh=kh,
             k0=k0, start=start, end=end, p0=p0, p1=p1, rot=rot, refs=refs, smem=smem, bars=bars)
    wg = lax.axis_index("wg")
    pl.when(wg < WGS)(lambda: _compute(c, wg))
    pl.when(wg == WGS)(lambda: _load(c))


def backward(q, k, v, o, lse, do, q_seg=None, kv_seg=None, *, causal: bool, scale: float, offset: int,
             s_real: int | None = None):
    """(dq, dk, dv) for padded q, o, do [B, Tp, H, D], k, v [B, Sp, K, D] and the forward's base-2 lse
    [B, H, Tp] float32; q_seg [B, Tp], kv_seg [B, Sp] int (0 = padding) or None. offset: query t sees keys
    <= t + offset; s_real: keys past it are padding."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    has_seg = q_seg is not None
    reason = unsupported_reason(q.dtype, d, tp, sp)
    if reason is not None:
        raise ValueError(f"mosaic_gpu_backward: can't take q {q.shape}, k {k.shape}: {reason}")
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, Tp]
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    tile, tile32 = mosaic_gpu.smem_transforms(q.dtype), mosaic_gpu.smem_transforms(jnp.float32)
    smem = (plgpu.SMEM((KEYS, d), q.dtype, transforms=tile), plgpu.SMEM((KEYS, d), q.dtype, transforms=tile),
            plgpu.SMEM((SLOTS, ROWS, d), q.dtype, transforms=tile),
            plgpu.SMEM((SLOTS, ROWS, d), q.dtype, transforms=tile),
            plgpu.SMEM((SLOTS, ROWS), jnp.float32), plgpu.SMEM((SLOTS, ROWS), jnp.float32),
            plgpu.SMEM((2, KEYS, ROWS), q.dtype, transforms=tile),
            plgpu.SMEM((WGS, ROWS, d // 2), jnp.float32, transforms=tile32),
            plgpu.SMEM((SLOTS, ROWS), jnp.int32) if has_seg else None,
            plgpu.SMEM((KEYS,), jnp.int32) if has_seg else None)
    bars = (plgpu.Barrier(num_barriers=2 * WGS), *(plgpu.Barrier(num_barriers=SLOTS) for _ in range(4)),
            plgpu.Barrier(num_arrivals=WGS, num_barriers=SLOTS), plgpu.Barrier(num_arrivals=WGS, num_barriers=2),
            plgpu.Barrier(num_arrivals=WGS), plgpu.Barrier(num_barriers=SLOTS) if has_seg else None,
            plgpu.Barrier(num_barriers=WGS) if has_seg else None)
    kernel = functools.partial(_kernel, scale=scale, causal=causal, offset=offset, s_real=s_real, group=h // kh,
                               has_seg=has_seg)

    def entry(*refs):
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch=scratch), smem, bars, collective_axes="wg")

    dk, dv = plgpu.kernel(
        entry, out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b * kh * (sp // KEYS),), grid_names=("cta",), num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name="jaxllm_flash_bwd_mosaic",
    )(q, k, v, do, lse, delta, dq_acc, *((q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32),
                                          tiles.segment_ranges(kv_seg, KEYS, q_seg, ROWS)) if has_seg else ()))
    return (dq_acc[...] * scale).astype(q.dtype), dk, dv
