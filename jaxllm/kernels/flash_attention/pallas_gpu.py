"""Portable Pallas flash attention: forward, dK/dV and dQ kernels under one jax.custom_vjp.

Runs through Pallas' Triton lowering on a GPU and with `interpret=True` anywhere (the CPU tests). On a Hopper
GPU the forward runs as the Mosaic GPU kernel of `mosaic_gpu.py` where it takes the shape (same outputs,
including the log-sum-exp the backward reads), and the backward as the one-pass kernel of
`mosaic_gpu_backward.py`; `forward_kernel` / `backward_kernel` pick one explicitly.
Layout stays [B, T, H, D] (no transposes). Causal masking skips whole blocks above the diagonal and
masks only the blocks that cross it; segment ids (0 = padding) mask packed documents; GQA reads the
shared KV head through the index map (q head h -> kv head h // G), K/V are never repeated. Lengths that
are not a multiple of the block are padded up and the padded keys masked. Softmax runs in float32 in the
base-2 domain; the log-sum-exp saved for the backward is +inf for fully masked rows, whose output is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.kernels.flash_attention import hopper, mosaic_gpu, mosaic_gpu_backward, tiles
from jaxllm.kernels.launch import triton_params

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128, 256)  # what the GPU path supports; interpret mode takes any head dim
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of two) and Triton launch settings for the three kernels."""

    q: int = 128
    k: int = 64
    warps: int = 4
    stages: int = 2
    bwd_q: int = 64  # dK/dV kernel
    bwd_k: int = 64
    bwd_warps: int = 4
    bwd_stages: int = 2
    dq_q: int | None = None  # dQ kernel (None: the dK/dV kernel's settings)
    dq_k: int | None = None
    dq_warps: int | None = None
    dq_stages: int | None = None

    @property
    def dq(self) -> tuple[int, int, int, int]:
        """(block_q, block_k, warps, stages) of the dQ kernel."""
        pick = lambda x, default: default if x is None else x  # noqa: E731
        return (pick(self.dq_q, self.bwd_q), pick(self.dq_k, self.bwd_k), pick(self.dq_warps, self.bwd_warps),
                pick(self.dq_stages, self.bwd_stages))


def default_blocks(head_dim: int, itemsize: int = 2) -> Blocks:
    """Block sizes that fit shared memory and registers for this head dim and input width (bytes)."""
    if head_dim <= 64 and itemsize <= 2:
        return Blocks(q=128, k=64, warps=4, stages=3, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2)
    if head_dim <= 128 and head_dim * itemsize <= 256:
        # H200 sweep at S 4096 causal (docs/benchmarks.md): 8 backward warps ran at half the speed of 4
        return Blocks(q=128, k=64, warps=8, stages=3, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2)
    return Blocks(q=64, k=32, warps=4, stages=2, bwd_q=32, bwd_k=32, bwd_warps=4, bwd_stages=1)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need to know at trace time (hashable: a custom_vjp static arg)."""

    t: int  # real query length
    s: int  # real key length
    tp: int  # padded query length (a multiple of every query block)
    sp: int  # padded key length (a multiple of every key block)
    causal: bool
    has_seg: bool
    scale: float
    group: int  # query heads per KV head
    blocks: Blocks
    interpret: bool
    mosaic: bool = False  # the forward runs as mosaic_gpu.forward
    mosaic_bwd: bool = False  # the backward runs as mosaic_gpu_backward.backward

    @property
    def offset(self) -> int:  # query t sees keys <= t + offset (queries aligned to the end of the keys)
        return self.s - self.t

    @property
    def ragged(self) -> bool:  # padded keys exist and no segment ids mask them
        return self.sp != self.s and not self.has_seg


def unsupported_reason(q: jax.Array, k: jax.Array, backend: str) -> str | None:
    """Why the kernel can't run this shape on `backend` (None when it can)."""
    d = q.shape[-1]
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} (supported: bf16, fp16, fp32, same for q and k)"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads is not a multiple of {k.shape[2]} KV heads"
    if backend == "gpu" and d not in HEAD_DIMS:
        return f"head dim {d} (supported: {', '.join(map(str, HEAD_DIMS))})"
    return None


def _mask(st: _Static, q_start, k_start, bq: int, bk: int, qs, ks):
    """Boolean [bq, bk]: True where query row may attend to key column. qs: [bq], ks: [bk] segment ids."""
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    allowed = jnp.ones((bq, bk), jnp.bool_)
    if st.causal:
        allowed = k_idx <= q_idx + st.offset
    if st.ragged:
        allowed = allowed & (k_idx < st.s)
    if st.has_seg:
        allowed = allowed & (qs[:, None] == ks[None, :]) & (qs[:, None] != 0)
    return allowed


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with float32 accumulation; the transposes fold into the contraction."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _range_row(ref):
    """The four int32 scalars of a [4] ref (a row of tiles.segment_ranges), or None without one."""
    if ref is None:
        return None
    row, idx = ref[...], lax.broadcasted_iota(jnp.int32, (4,), 0)
    return tuple(jnp.sum(jnp.where(idx == j, row, 0)) for j in range(4))


def _kv_plan(st: _Static, sp: int, q_start, bq: int, bk: int, seg):
    """(start, p0, p1, end) key blocks for a query block: [p0, p1) need no mask, [start, p0) and [p1, end) do,
    the rest are skipped. seg: its tiles.segment_ranges row (None without segment ids: start = p0 = 0)."""
    full, hi = tiles.key_blocks(q_start, bq, bk=bk, n_k=sp // bk, causal=st.causal, offset=st.offset,
                                full_cap=st.s // bk if st.ragged else None)
    return (0, 0, full, hi) if seg is None else tiles.key_plan(full, hi, seg)


def _q_block(st: _Static, n_q: int):
    """This program's query block; causal runs the heavy (late) blocks first."""
    i = pl.program_id(0)
    return n_q - 1 - i if st.causal else i


def _split_refs(refs, has_seg: bool, n_in: int):
    """(inputs, q_seg_ref, kv_seg_ref, ranges_ref, outputs) from a kernel's positional refs."""
    ins, rest = refs[:n_in], refs[n_in:]
    if has_seg:
        return ins, rest[0], rest[1], rest[2], rest[3:]
    return ins, None, None, None, rest


def _fwd_kernel(*refs, st: _Static):
    """One query block of one head: online softmax over its key blocks; writes O and the base-2 LSE."""
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, rg_ref, (o_ref, lse_ref) = _split_refs(refs, st.has_seg, 3)
    bq, bk, sp = st.blocks.q, st.blocks.k, k_ref.shape[0]
    q_start = _q_block(st, pl.num_programs(0)) * bq
    q = q_ref[...]  # [bq, D]
    qs = qs_ref[...] if st.has_seg else None

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]  # [bk, D]
        s = _dot(q, k, trans_b=True) * (st.scale * LOG2E)  # [bq, bk] float32, base-2 logits
        if masked:
            ks = ks_ref[pl.ds(k_start, bk)] if st.has_seg else None
            s = jnp.where(_mask(st, q_start, k_start, bq, bk, qs, ks), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked so far: keep exp2 finite
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])  # [bq, bk]
        v = v_ref[pl.ds(k_start, bk), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    d = q.shape[-1]
    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = tiles.loops(body, _kv_plan(st, sp, q_start, bq, bk, _range_row(rg_ref)), carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _seg_specs(st: _Static, q_block_map, kv_block_map, range_map, bq: int, bk: int | None, tp: int, sp: int):
    """BlockSpecs for [B, Tp] query and [B, Sp] key segment ids (bk None = the whole row) and the program's row
    of tiles.segment_ranges [B, n, 4]."""
    if not st.has_seg:
        return []
    q_spec = pl.BlockSpec((None, bq), q_block_map) if bq else pl.BlockSpec((None, tp), q_block_map)
    kv_spec = pl.BlockSpec((None, bk), kv_block_map) if bk else pl.BlockSpec((None, sp), kv_block_map)
    return [q_spec, kv_spec, pl.BlockSpec((None, None, 4), range_map)]


def _params(st: _Static, warps: int, stages: int):
    return triton_params(st.interpret, warps, stages)


def _forward(q, k, v, q_seg, kv_seg, st: _Static):
    """Padded q: [B, Tp, H, D]; k, v: [B, Sp, K, D] -> (o [B, Tp, H, D], lse [B, H, Tp] float32)."""
    if st.mosaic:
        return mosaic_gpu.forward(q, k, v, q_seg, kv_seg, causal=st.causal, scale=st.scale, offset=st.offset,
                                  s_real=st.s if st.ragged else None, settings=mosaic_settings(k.shape[1]))
    b, tp, h, d = q.shape
    sp = k.shape[1]
    bq, g = st.blocks.q, st.group
    n_q = tp // bq
    rev = (lambda i: n_q - 1 - i) if st.causal else (lambda i: i)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
    ] + _seg_specs(st, lambda i, bi, hi: (bi, rev(i)), lambda i, bi, hi: (bi, 0),
                   lambda i, bi, hi: (bi, rev(i), 0), bq, None, tp, sp)
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
    ]
    segs = [q_seg, kv_seg, tiles.segment_ranges(q_seg, bq, kv_seg, st.blocks.k)] if st.has_seg else []
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(n_q, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
        name="jaxllm_flash_fwd",
        **_params(st, st.blocks.warps, st.blocks.stages),
    )(q, k, v, *segs)


def _probs(st: _Static, q, k, lse, q_start, k_start, bq: int, bk: int, qs, ks, masked: bool):
    """Recomputed softmax probabilities [bq, bk] float32 from the saved base-2 LSE [bq]."""
    s = _dot(q, k, trans_b=True) * (st.scale * LOG2E)
    if masked:
        s = jnp.where(_mask(st, q_start, k_start, bq, bk, qs, ks), s, -jnp.inf)
    return jnp.exp2(s - lse[:, None])


def _dkdv_kernel(*refs, st: _Static):
    """One key block of one KV head: sums dK, dV over its query heads and the query blocks that see it."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rg_ref, (dk_ref, dv_ref) = _split_refs(
        refs, st.has_seg, 6)
    bq, bk, tp = st.blocks.bwd_q, st.blocks.bwd_k, st.tp
    n_q = tp // bq
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    ks = ks_ref[...] if st.has_seg else None

    def body(i, carry, g, masked):
        dk, dv = carry
        q_start = i * bq
        q = q_ref[pl.ds(q_start, bq), g, :]  # [bq, D]
        do = do_ref[pl.ds(q_start, bq), g, :]
        qs = qs_ref[pl.ds(q_start, bq)] if st.has_seg else None
        p = _probs(st, q, k, lse_ref[g, pl.ds(q_start, bq)], q_start, k_start, bq, bk, qs, ks, masked)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)  # [bk, D]
        dp = _dot(do, v, trans_b=True)  # [bq, bk]
        ds = p * (dp - delta_ref[g, pl.ds(q_start, bq)][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    lo, lo_full = tiles.query_blocks(k_start, bk, bq=bq, n_q=n_q, causal=st.causal, offset=st.offset,
                                     s_real=st.s if st.ragged else None)
    plan = tiles.query_plan(lo, lo_full, n_q, _range_row(rg_ref))
    d = k.shape[-1]
    carry = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    for g in range(st.group):  # static: the query heads that share this KV head
        carry = tiles.loops(functools.partial(body, g=g), plan, carry)
    dk, dv = carry
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: _Static):
    """One query block of one head: dQ over the key blocks it sees."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rg_ref, (dq_ref,) = _split_refs(
        refs, st.has_seg, 6)
    (bq, bk, _, _), sp = st.blocks.dq, k_ref.shape[0]
    q_start = _q_block(st, pl.num_programs(0)) * bq
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq]
    qs = qs_ref[...] if st.has_seg else None

    def body(j, dq, masked):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        ks = ks_ref[pl.ds(k_start, bk)] if st.has_seg else None
        p = _probs(st, q, k, lse, q_start, k_start, bq, bk, qs, ks, masked)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])  # [bq, bk]
        return dq + _dot(ds.astype(k.dtype), k)

    dq = tiles.loops(body, _kv_plan(st, sp, q_start, bq, bk, _range_row(rg_ref)), jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, o, lse, do, st: _Static):
    """Padded inputs -> (dq [B, Tp, H, D], dk, dv [B, Sp, K, D]): the Mosaic GPU kernel where st says so, else
    two portable kernels (no atomics: bitwise reproducible)."""
    if st.mosaic_bwd:
        return mosaic_gpu_backward.backward(q, k, v, o, lse, do, q_seg, kv_seg, causal=st.causal, scale=st.scale,
                                            offset=st.offset, s_real=st.s if st.ragged else None)
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    bq, bk, g = st.blocks.bwd_q, st.blocks.bwd_k, st.group
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, Tp]
    segs = [q_seg, kv_seg, tiles.segment_ranges(kv_seg, bk, q_seg, bq)] if st.has_seg else []
    # dK, dV: grid over key blocks; each program reads all G query heads of its KV head.
    group_spec = pl.BlockSpec((None, tp, g, d), lambda j, bi, ki: (bi, 0, ki, 0))
    key_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    row_spec = pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(sp // bk, b, kh),
        in_specs=[group_spec, key_spec, key_spec, group_spec, row_spec, row_spec]
        + _seg_specs(st, lambda j, bi, ki: (bi, 0), lambda j, bi, ki: (bi, j), lambda j, bi, ki: (bi, j, 0), None,
                     bk, tp, sp),
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="jaxllm_flash_dkdv",
        **_params(st, st.blocks.bwd_warps, st.blocks.bwd_stages),
    )(q, k, v, do, lse, delta, *segs)
    # dQ: grid over query blocks, like the forward.
    bq, bk, dq_warps, dq_stages = st.blocks.dq
    segs = [q_seg, kv_seg, tiles.segment_ranges(q_seg, bq, kv_seg, bk)] if st.has_seg else []
    n_q = tp // bq
    rev = (lambda i: n_q - 1 - i) if st.causal else (lambda i: i)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0))
    kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(n_q, b, h),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec]
        + _seg_specs(st, lambda i, bi, hi: (bi, rev(i)), lambda i, bi, hi: (bi, 0),
                     lambda i, bi, hi: (bi, rev(i), 0), bq, None, tp, sp),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="jaxllm_flash_dq",
        **_params(st, dq_warps, dq_stages),
    )(q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, st: _Static):
    return _forward(q, k, v, q_seg, kv_seg, st)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, st: _Static):
    o, lse = _forward(q, k, v, q_seg, kv_seg, st)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, o, lse, do, st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded(t: int, s: int, blocks: Blocks) -> tuple[int, int]:
    """(Tp, Sp): the query and key lengths padded to a multiple of every kernel's block."""
    q_mult = max(blocks.q, blocks.bwd_q, blocks.dq[0])  # powers of two: the max is a common multiple
    k_mult = max(blocks.k, blocks.bwd_k, blocks.dq[1])
    return _round_up(t, q_mult), _round_up(s, k_mult)


def mosaic_settings(sp: int) -> mosaic_gpu.Settings:
    """The Mosaic forward's launch settings for Sp padded keys: 128-key blocks in 2 slots where Sp allows, else
    64-key blocks in 4 (the faster of an H200 sweep, docs/benchmarks.md)."""
    return mosaic_gpu.Settings(128, 2) if sp % 128 == 0 else mosaic_gpu.Settings(64, 4)


def mosaic_forward_reason(q_shape: tuple, k_shape: tuple, dtype, causal: bool, blocks: Blocks | None = None,
                          interpret: bool = False) -> str | None:
    """Why the forward can't run as the Mosaic GPU kernel for q [B, T, H, D], k [B, S, K, D] (None when it can)."""
    reason = hopper.unavailable_reason(causal, interpret)
    if reason is not None:
        return reason
    d = q_shape[-1]
    tp, sp = _padded(q_shape[1], k_shape[1], blocks or default_blocks(d, jnp.dtype(dtype).itemsize))
    return mosaic_gpu.unsupported_reason(dtype, d, tp, sp, mosaic_settings(sp))


def mosaic_backward_reason(q_shape: tuple, k_shape: tuple, dtype, causal: bool, blocks: Blocks | None = None,
                           interpret: bool = False) -> str | None:
    """Why `auto` doesn't run the backward as the Mosaic GPU kernel (None when it does). Its dQ is a float32 sum
    in an order that varies run to run, so it is refused when XLA was asked for deterministic ops."""
    reason = hopper.unavailable_reason(causal, interpret)
    if reason is not None:
        return reason
    if hopper.deterministic_requested():
        return "--xla_gpu_deterministic_ops is set (the Mosaic backward's dQ sum order varies run to run)"
    d = q_shape[-1]
    tp, sp = _padded(q_shape[1], k_shape[1], blocks or default_blocks(d, jnp.dtype(dtype).itemsize))
    return mosaic_gpu_backward.unsupported_reason(dtype, d, tp, sp)


def _choose(kind: str, which: str, why_not) -> bool:
    """Whether the Mosaic kernel runs for forward_kernel / backward_kernel = kind; why_not() gives the reason it
    can't (None when it can)."""
    if kind not in KERNELS:
        raise ValueError(f"flash_attention: {which}={kind!r}; choose one of {KERNELS}")
    if kind == "triton":
        return False
    reason = why_not()
    if kind == "mosaic" and reason is not None:
        raise ValueError(f"flash_attention: {which}='mosaic' can't run here: {reason}; pass {which}='auto' or "
                         "'triton'")
    return reason is None


KERNELS = ("auto", "mosaic", "triton")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    blocks: Blocks | None = None,
    interpret: bool | None = None,
    forward_kernel: str = "auto",
    backward_kernel: str = "auto",
) -> jax.Array:
    """Flash attention with the reference's contract.

    q: [B, T, H, D]; k, v: [B, S, K, D] (H a multiple of K); segment_ids: [B, T] int (0 = padding),
    kv_segment_ids: [B, S] (defaults to segment_ids). Returns [B, T, H, D] in q's dtype. `interpret`
    defaults to True off GPU (the CPU tests); blocks default to `default_blocks(D)`. forward_kernel: "mosaic"
    (the Hopper kernel of mosaic_gpu.py; an error where `mosaic_forward_reason` says it can't run), "triton"
    (the portable kernel here) or "auto" (mosaic where it runs, else triton). backward_kernel likewise, with
    `mosaic_backward_reason` (mosaic_gpu_backward.py: one pass, dQ summed by float32 reduce-adds whose order
    varies, so "auto" takes the portable, bitwise-reproducible backward under --xla_gpu_deterministic_ops).
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: bad shapes q {q.shape}, k {k.shape}, v {v.shape} "
                         "(want q [B,T,H,D], k = v [B,S,K,D] with H a multiple of K)")
    if kv_segment_ids is None and segment_ids is not None:
        if s != t:
            raise ValueError(f"flash_attention: T={t} != S={s}; pass kv_segment_ids [B, S] too")
        kv_segment_ids = segment_ids
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    blocks = blocks or default_blocks(d, jnp.dtype(q.dtype).itemsize)
    tp, sp = _padded(t, s, blocks)
    has_seg = segment_ids is not None
    mosaic = _choose(forward_kernel, "forward_kernel", lambda: mosaic_forward_reason(
        q.shape, k.shape, q.dtype, causal, blocks, bool(interpret)))
    mosaic_bwd = _choose(backward_kernel, "backward_kernel", lambda: mosaic_backward_reason(
        q.shape, k.shape, q.dtype, causal, blocks, bool(interpret)))
    st = _Static(t=t, s=s, tp=tp, sp=sp, causal=causal, has_seg=has_seg,
                 scale=float(d**-0.5 if scale is None else scale), group=h // kh, blocks=blocks,
                 interpret=bool(interpret), mosaic=mosaic, mosaic_bwd=mosaic_bwd)
    pad_t = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    pad_s = ((0, 0), (0, sp - s), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad_t), jnp.pad(k, pad_s), jnp.pad(v, pad_s)  # no-ops when aligned
    q_seg = kv_seg = None
    if has_seg:
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))  # padding -> segment 0
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))
    return _flash(q, k, v, q_seg, kv_seg, st)[:, :t]
