"""Flash attention forward for Hopper GPUs (H100/H200) in Pallas Mosaic GPU: warpgroup MMAs, TMA copies,
a loader warpgroup.

Each CTA takes 2 x 64 query rows of one head: two compute warpgroups hold 64 rows each (the wgmma tile height),
with the scores, the online softmax (float32, base 2) and the output accumulator in registers, while a third
warpgroup streams that head's key and value blocks through a ring of shared-memory slots with TMA copies (K/V are
read once per CTA, never repeated for GQA). Each slot has a "ready" barrier (the copy landed) and a "free"
barrier (both compute warpgroups are done with it). Causal attention skips the key blocks above the diagonal
(the loader stops at the last block that warpgroup 1, holding the later rows, needs; warpgroup 0 hands back the
slots of the blocks it does not see) and masks only the blocks that cross it. Segment ids (0 = padding) mask
packed documents: a CTA streams only the key blocks that may share a document with its rows
(`tiles.segment_ranges`), and a key block that one document fills, with a warpgroup's 64 query rows, needs no
segment mask. The output contract is `pallas_gpu._forward`'s: o [B, Tp, H, D] and the base-2 log-sum-exp
[B, H, Tp] float32 (+inf for a row with no allowed key, whose output is 0), so `pallas_gpu`'s backward kernels
run on it unchanged.

GPU only (Mosaic GPU's CPU interpret mode does not run multi-warpgroup kernels in jax 0.11): tested against the
reference under `-m gpu`; on the CPU `pallas_gpu` runs the portable Triton-lowered forward in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxllm.kernels.flash_attention import tiles

LOG2E = math.log2(math.e)
ROWS = 64  # query rows per compute warpgroup: wgmma's M
WGS = 2  # compute warpgroups per CTA; one more loads K/V
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Key block (a multiple of 64) and shared-memory slots for K/V in flight."""

    block_k: int = 128
    slots: int = 2
    pingpong: bool = True  # the two compute warpgroups take turns on the tensor cores (one runs its softmax
    # while the other multiplies), paced by a two-arrival barrier


def unsupported_reason(dtype, head_dim: int, tp: int, sp: int, settings: Settings = Settings()) -> str | None:
    """Why `forward` can't take padded q [B, Tp, H, D] against k [B, Sp, K, D] (None when it can)."""
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (the Mosaic GPU kernel takes bf16 and fp16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the Mosaic GPU kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if tp % (WGS * ROWS):
        return f"{tp} query rows is not a multiple of {WGS * ROWS}"
    if sp % settings.block_k:
        return f"{sp} keys is not a multiple of the key block {settings.block_k}"
    return None


def smem_transforms(dtype) -> tuple:
    """Shared-memory layout of a [rows, D] tile for wgmma and TMA (both Mosaic kernels): 8 x (128-byte row)
    tiles, 128-byte swizzle."""
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _mask(s, q0, k0, qs, ks_ref, *, causal: bool, offset: int, s_real: int | None):
    """Scores s [ROWS, bk] with -inf where a query row may not attend to a key column."""
    shape = s.shape
    allowed = None

    def both(a, b):
        return b if a is None else a & b

    if causal or s_real is not None:
        cols = k0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        if causal:
            rows = q0 + offset + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            allowed = both(allowed, cols <= rows)
        if s_real is not None:
            allowed = both(allowed, cols < s_real)
    if qs is not None:
        ks = plgpu.load(ks_ref, layout=plgpu.Layout.WGMMA.reduce(0))
        qsb = lax.broadcast_in_dim(qs, shape, [0])
        allowed = both(allowed, (qsb == lax.broadcast_in_dim(ks, shape, [1])) & (qsb != 0))
    return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _Cta:
    """What every warpgroup of one CTA sees: static settings, the CTA's indices, refs, shared memory, barriers."""

    scale: float
    causal: bool
    offset: int
    s_real: int | None
    has_seg: bool
    settings: Settings
    b: jax.Array  # batch row
    h: jax.Array  # query head
    kh: jax.Array  # its KV head
    tile: jax.Array  # query tile (WGS * ROWS rows)
    start: jax.Array | int  # the first key block the loader streams (0 without segment ids)
    loads: jax.Array  # the loader streams key blocks [start, loads): those some warpgroup needs
    refs: tuple  # q, k, v, q_seg, kv_seg, o, lse, ranges (segment refs None without segment ids)
    smem: tuple  # q/o [WGS, ROWS, D], k, v [slots, bk, D], lse [WGS, ROWS], q_seg [WGS, ROWS], kv_seg [slots, bk]
    ready: tuple  # barriers: q, k, v, q_seg, kv_seg landed
    free: tuple  # barriers: k, v slot released by both compute warpgroups
    turn: object  # two-arrival barrier pacing the compute warpgroups (pingpong)

    def ranges(self, q0):
        """(unmasked, total) key blocks of the causal / ragged mask for the warpgroup at query row q0."""
        bk = self.settings.block_k
        return tiles.key_blocks(q0, ROWS, bk=bk, n_k=self.refs[1].shape[1] // bk, causal=self.causal,
                                offset=self.offset, full_cap=None if self.s_real is None else self.s_real // bk)

    def segments(self, q0):
        """(first, stop, u_lo, u_hi) of `tiles.segment_ranges` for the warpgroup at query row q0."""
        return tuple(self.refs[7][self.b, lax.div(q0, jnp.int32(ROWS)), j] for j in range(4))

    def plan(self, q0):
        """(p0, p1, end) for the warpgroup at query row q0: it steps through key blocks [start, end), with no
        mask in [p0, p1), and hands back the slots of [end, loads)."""
        full, hi = self.ranges(q0)
        if not self.has_seg:
            return 0, full, hi
        return tiles.key_plan(full, hi, self.segments(q0), start=self.start)[1:]

    def slot(self, j):
        """The ring slot of key block j: the loader streams [start, loads) in order."""
        return lax.rem(j - self.start if self.has_seg else j, jnp.int32(self.settings.slots))

    def meet(self):
        """Both compute warpgroups reach this point."""
        plgpu.barrier_arrive(self.turn)
        plgpu.barrier_wait(self.turn)


def _step(c: _Cta, wg, q0, qs, j, carry, masked: bool):
    """One key block of the online softmax for warpgroup wg's 64 rows from q0: carry (acc [ROWS, D], m, l)."""
    acc, m, l = carry
    q_smem, k_smem, v_smem = c.smem[:3]
    slot = c.slot(j)
    plgpu.barrier_wait(c.ready[1].at[slot])

    def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
        if c.settings.pingpong:
            c.meet()
        return acc_ref[...]

    s = pl.run_scoped(scores, plgpu.ACC((ROWS, c.settings.block_k), jnp.float32)) * (c.scale * LOG2E)
    plgpu.barrier_arrive(c.free[0].at[slot])
    if c.has_seg:  # also unmasked: every wait tracks its barrier's phase, a skipped one would desynchronise it
        plgpu.barrier_wait(c.ready[4].at[slot])
    if masked:
        s = _mask(s, q0, j * c.settings.block_k, qs, c.smem[5].at[slot] if c.has_seg else None, causal=c.causal,
                  offset=c.offset, s_real=c.s_real)
    m_new = jnp.maximum(m, s.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no allowed key yet: keep exp2 finite
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    p = p.astype(v_smem.dtype)
    if c.settings.pingpong:  # the softmax is done (the optimization barrier keeps it before the hand-over)
        acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        plgpu.barrier_arrive(c.turn)
    plgpu.barrier_wait(c.ready[2].at[slot])
    if c.settings.pingpong:  # wait until the other warpgroup hands the tensor cores over
        plgpu.barrier_wait(c.turn)

    def values(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])

    acc = pl.run_state(values)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(c.free[1].at[slot])
    return acc, m_new, l


def _compute(c: _Cta, wg) -> None:
    """Compute warpgroup wg: its 64 query rows against the key blocks they see; writes o and the base-2 LSE."""
    plgpu.set_max_registers(232, action="increase")
    q_ref, qs_ref, o_ref, lse_ref = c.refs[0], c.refs[3], c.refs[5], c.refs[6]
    q_smem, lse_smem, qs_smem = c.smem[0], c.smem[3], c.smem[4]
    q0 = c.tile * (WGS * ROWS) + wg * ROWS
    rows = pl.ds(q0, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[c.b, rows, c.h], q_smem.at[wg], c.ready[0].at[wg])
    qs = None
    if c.has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[c.b, rows], qs_smem.at[wg], c.ready[3].at[wg])
        plgpu.barrier_wait(c.ready[3].at[wg])
        qs = plgpu.load(qs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
    plgpu.barrier_wait(c.ready[0].at[wg])
    p0, p1, end = c.plan(q0)
    row_vec = plgpu.Layout.WGMMA.reduce(1)
    init = (plgpu.layout_cast(jnp.zeros((ROWS, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_vec),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_vec))
    if c.settings.pingpong:  # warpgroup 1 starts half a step behind: it multiplies while 0 runs its softmax
        pl.when(wg == 1)(c.meet)
    step = functools.partial(_step, c, wg, q0, qs)
    acc, m, l = tiles.loops(step, (c.start, p0, p1, end), init)

    @pl.loop(end, c.loads)
    def _skip(j):  # blocks only the other warpgroup needs: hand their slots back, keep the pacing in step
        slot = c.slot(j)
        if c.has_seg:  # the block lands before its slot goes back: a run of skips can outgrow the ring, and
            # without pingpong nothing else would keep this warpgroup from arriving twice in one phase
            for bar in (c.ready[1], c.ready[2], c.ready[4]):
                plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(c.free[0].at[slot])
        plgpu.barrier_arrive(c.free[1].at[slot])
        if c.settings.pingpong:
            c.meet()
            c.meet()

    if c.settings.pingpong:
        pl.when(wg == 0)(c.meet)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    q_smem.at[wg][...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_smem.dtype)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe) * LOG2E)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[c.b, rows, c.h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[c.b, c.h, rows])
    plgpu.wait_smem_to_gmem(0)


def _load(c: _Cta) -> None:
    """The loader warpgroup: streams key/value blocks (and key segment ids) through the ring of slots."""
    plgpu.set_max_registers(40, action="decrease")
    k_ref, v_ref, ks_ref = c.refs[1], c.refs[2], c.refs[4]
    bk, slots = c.settings.block_k, c.settings.slots

    def fetch(j, slot):
        cols = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[c.b, cols, c.kh], c.smem[1].at[slot], c.ready[1].at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[c.b, cols, c.kh], c.smem[2].at[slot], c.ready[2].at[slot])
        if c.has_seg:
            plgpu.copy_gmem_to_smem(ks_ref.at[c.b, cols], c.smem[5].at[slot], c.ready[4].at[slot])

    for i in range(min(slots, k_ref.shape[1] // bk)):  # fill the ring (no more slots than the keys have blocks)
        pl.when(c.start + i < c.loads)(functools.partial(fetch, c.start + i, i))

    @pl.loop(c.start + slots, c.loads)
    def _refill(j):
        slot = c.slot(j)
        plgpu.barrier_wait(c.free[0].at[slot])
        plgpu.barrier_wait(c.free[1].at[slot])
        fetch(j, slot)


def _schedule(c: _Cta) -> _Cta:
    """c with the key blocks the loader streams, [start, loads): every block some warpgroup steps through. Each
    warpgroup steps from the CTA's start (blocks before its own first are masked out whole) to its own end."""
    q0 = c.tile * (WGS * ROWS)
    if not c.has_seg:  # the tile's last warpgroup needs the most
        return dataclasses.replace(c, loads=c.ranges(q0 + (WGS - 1) * ROWS)[1])
    q0s = [q0 + w * ROWS for w in range(WGS)]
    c = dataclasses.replace(c, start=functools.reduce(jnp.minimum, [c.segments(q)[0] for q in q0s]))
    return dataclasses.replace(c, loads=functools.reduce(jnp.maximum, [c.plan(q)[2] for q in q0s]))


def _kernel(q_ref, k_ref, v_ref, *refs, group: int, **static):
    """One CTA: grid (head, query tile, batch); warpgroups 0 and 1 compute, 2 loads K/V (and key segment ids)."""
    *io, (smem, ready, free, turn) = refs
    qs_ref, ks_ref, ranges, o_ref, lse_ref = io if static["has_seg"] else (None, None, None, *io)
    h = lax.axis_index("h")
    n_tiles = q_ref.shape[1] // (WGS * ROWS)
    tile = (n_tiles - 1 - lax.axis_index("q")) if static["causal"] else lax.axis_index("q")  # heavy tiles first
    c = _Cta(**static, b=lax.axis_index("b"), h=h, kh=lax.div(h, jnp.int32(group)), tile=tile, start=0,
             loads=jnp.int32(0), refs=(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, ranges), smem=smem,
             ready=ready, free=free, turn=turn)
    c = _schedule(c)
    wg = lax.axis_index("wg")
    pl.when(wg < WGS)(lambda: _compute(c, wg))
    pl.when(wg == WGS)(lambda: _load(c))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None, *,
            causal: bool, scale: float, offset: int, s_real: int | None = None,
            settings: Settings = Settings()) -> tuple[jax.Array, jax.Array]:
    """Padded q [B, Tp, H, D]; k, v [B, Sp, K, D]; q_seg [B, Tp], kv_seg [B, Sp] int32 or None -> (o [B, Tp, H, D],
    lse [B, H, Tp] float32, base 2). offset: query t sees keys <= t + offset (causal); s_real: the real key length
    when Sp pads it and no segment ids mask the padding (None otherwise). See `unsupported_reason`."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.dtype, d, tp, sp, settings)
    if reason is not None:
        raise ValueError(f"mosaic_gpu.forward can't take q {q.shape}, k {k.shape}: {reason}")
    has_seg = q_seg is not None
    bk, slots = settings.block_k, settings.slots
    tr = smem_transforms(q.dtype)
    smem = (plgpu.SMEM((WGS, ROWS, d), q.dtype, transforms=tr),
            plgpu.SMEM((slots, bk, d), q.dtype, transforms=tr),
            plgpu.SMEM((slots, bk, d), q.dtype, transforms=tr),
            plgpu.SMEM((WGS, ROWS), jnp.float32),
            plgpu.SMEM((WGS, ROWS), jnp.int32) if has_seg else None,
            plgpu.SMEM((slots, bk), jnp.int32) if has_seg else None)
    ready = (plgpu.Barrier(num_barriers=WGS), plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_barriers=WGS) if has_seg else None,
             plgpu.Barrier(num_barriers=slots) if has_seg else None)
    free = (plgpu.Barrier(num_arrivals=WGS, num_barriers=slots),) * 2
    turn = plgpu.Barrier(num_arrivals=WGS)
    kernel = functools.partial(_kernel, scale=scale, causal=causal, offset=offset, group=h // kh, settings=settings,
                               has_seg=has_seg, s_real=s_real)

    def entry(*refs):
        pl.run_scoped(lambda *scratch: kernel(*refs, scratch), smem, ready, free, turn, collective_axes="wg")

    segs = ()
    if has_seg:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
        segs = (q_seg, kv_seg, tiles.segment_ranges(q_seg, ROWS, kv_seg, bk))
    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        grid=(h, tp // (WGS * ROWS), b), grid_names=("h", "q", "b"), num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name="jaxllm_flash_fwd_mosaic",
    )(q, k, v, *segs)
