"""Which key blocks a block of query rows visits: shared by the portable (Triton) and Mosaic GPU forwards."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def key_blocks(q_start, rows: int, *, bk: int, n_k: int, causal: bool, offset: int, full_cap: int | None = None,
               has_seg: bool = False):
    """(unmasked, total) key blocks of bk columns (n_k in all) for `rows` query rows from q_start (traced int):
    blocks [0, unmasked) need no mask, [unmasked, total) do, the rest are skipped. Causal: query t sees keys
    <= t + offset. full_cap: the number of key blocks holding only real keys when the last is ragged (its
    padding must be masked). has_seg: segment ids mask every block."""
    if causal:
        hi = jnp.clip(lax.div(jnp.maximum(q_start + rows + offset, 0) + (bk - 1), bk), 0, n_k)
        full = lax.div(jnp.maximum(q_start + offset + 1, 0), bk)
    else:
        hi = full = jnp.int32(n_k)
    if full_cap is not None:
        full = jnp.minimum(full, full_cap)
    if has_seg:
        full = jnp.int32(0)
    return jnp.minimum(full, hi), hi
