"""Which key blocks a block of query rows visits: shared by the portable (Triton) and Mosaic GPU kernels; with
segment ids, which blocks may share a document (`segment_ranges`)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax


def key_blocks(q_start, rows: int, *, bk: int, n_k: int, causal: bool, offset: int, full_cap: int | None = None):
    """(unmasked, total) key blocks of bk columns (n_k in all) for `rows` query rows from q_start (traced int):
    blocks [0, unmasked) need no mask, [unmasked, total) do, the rest are skipped. Causal: query t sees keys
    <= t + offset. full_cap: the number of key blocks holding only real keys when the last is ragged (its
    padding must be masked)."""
    if causal:
        hi = jnp.clip(lax.div(jnp.maximum(q_start + rows + offset, 0) + (bk - 1), bk), 0, n_k)
        full = lax.div(jnp.maximum(q_start + offset + 1, 0), bk)
    else:
        hi = full = jnp.int32(n_k)
    if full_cap is not None:
        full = jnp.minimum(full, full_cap)
    return jnp.minimum(full, hi), hi


def query_blocks(k_start, bk: int, *, bq: int, n_q: int, causal: bool, offset: int, s_real: int | None = None):
    """(lo, lo_full) query blocks of bq rows (n_q in all) for the bk keys from k_start (traced int): blocks
    [lo, lo_full) need the mask, [lo_full, n_q) don't, those before lo see none of the keys. s_real: keys at and
    past it are padding (a key block holding some is masked throughout)."""
    lo, lo_full = jnp.int32(0), jnp.int32(0)
    if causal:
        lo = lax.div(jnp.maximum(k_start - offset, 0), bq)
        lo_full = jnp.clip(lax.div(jnp.maximum(k_start + bk - 1 - offset, 0) + (bq - 1), bq), lo, n_q)
    if s_real is not None:
        lo_full = jnp.where(k_start + bk > s_real, n_q, lo_full)
    return lo, lo_full


def key_plan(full, hi, seg, start=None):
    """(start, p0, p1, end) key blocks for a query block with segment ids: [p0, p1) need no mask, [start, p0) and
    [p1, end) do, the rest are skipped. (full, hi): its `key_blocks`; seg: its `segment_ranges` row (first, stop,
    u_lo, u_hi); start: where to begin instead of the first block that may share a document."""
    first, stop, u_lo, u_hi = seg
    start = jnp.minimum(first, hi) if start is None else start
    end = jnp.maximum(start, jnp.minimum(hi, stop))
    p0 = jnp.clip(u_lo, start, end)
    return start, p0, jnp.clip(jnp.minimum(u_hi, full), p0, end), end


def query_plan(lo, lo_full, n_q: int, seg):
    """(start, p0, p1, end) query blocks for a key block: [p0, p1) need no mask, [start, p0) and [p1, end) do,
    the rest are skipped. (lo, lo_full): its `query_blocks`; seg: its `segment_ranges` row, or None (then
    [lo, lo_full) masked, [lo_full, n_q) not)."""
    if seg is None:
        return lo, lo_full, n_q, n_q
    first, stop, u_lo, u_hi = seg
    start = jnp.maximum(lo, first)
    end = jnp.maximum(start, stop)
    p0 = jnp.clip(jnp.maximum(lo_full, u_lo), start, end)
    return start, p0, jnp.clip(u_hi, p0, end), end


def loops(body, plan, carry):
    """Runs body(i, carry, masked=...) over a plan's blocks: masked [start, p0), unmasked [p0, p1), masked
    [p1, end). A range whose bounds are the same Python int (a plan without segment ids) is not traced."""
    start, p0, p1, end = plan
    for lo, hi, masked in ((start, p0, True), (p0, p1, False), (p1, end, True)):
        if not (isinstance(lo, int) and isinstance(hi, int) and lo == hi):
            carry = lax.fori_loop(lo, hi, functools.partial(body, masked=masked), carry)
    return carry


def segment_ranges(a_seg, a_rows: int, b_seg, b_rows: int):
    """int32 [B, n_a, 4] per block of a_rows entries of a_seg [B, Na] (int, 0 = padding), over the n_b blocks of
    b_rows entries of b_seg [B, Nb]: b blocks [first, stop) may share a nonzero id with the a block (the others
    can't: their ranges of nonzero ids don't meet; a conservative test), and in [u_lo, u_hi), the first run of
    such blocks, one nonzero id fills both the a block and the b block. None: first = u_lo = u_hi = n_b, stop = 0.
    The forward takes (q_seg, 64, kv_seg, block_k), the backward (kv_seg, 128, q_seg, 64). Ids may be any int32
    (negative too). XLA temporaries hold [B, n_a, n_b] entries (S^2 / 8192 for the kernels' blocks: 2M per row
    at 128k tokens)."""
    n = a_seg.shape[0]
    a, b = a_seg.astype(jnp.int32).reshape(n, -1, a_rows), b_seg.astype(jnp.int32).reshape(n, -1, b_rows)
    big = jnp.iinfo(jnp.int32).max

    def bounds(x):  # (min and max over nonzero ids, whether there is one; min, max over all)
        nonzero = x != 0
        return (jnp.min(jnp.where(nonzero, x, big), axis=-1), jnp.max(jnp.where(nonzero, x, -big), axis=-1),
                jnp.any(nonzero, axis=-1), jnp.min(x, axis=-1), jnp.max(x, axis=-1))

    a_nmin, a_nmax, a_any, a_min, a_max = (x[:, :, None] for x in bounds(a))  # [B, n_a, 1]
    b_nmin, b_nmax, b_any, b_min, b_max = (x[:, None, :] for x in bounds(b))  # [B, 1, n_b]
    meet = (a_nmin <= b_nmax) & (b_nmin <= a_nmax) & a_any & b_any  # [B, n_a, n_b]
    one = (a_min == a_max) & (b_min == b_max) & (a_min == b_min) & (a_min != 0)
    n_b = b.shape[1]
    idx = jnp.arange(n_b, dtype=jnp.int32)
    first = jnp.min(jnp.where(meet, idx, n_b), axis=-1)
    stop = jnp.max(jnp.where(meet, idx + 1, 0), axis=-1)
    u_lo = jnp.min(jnp.where(one, idx, n_b), axis=-1)
    u_hi = jnp.min(jnp.where(~one & (idx >= u_lo[..., None]), idx, n_b), axis=-1)  # the run from u_lo
    return jnp.stack([first, stop, u_lo, u_hi], axis=-1).astype(jnp.int32)
