"""Pure-jnp attention: the oracle for every kernel. Float32 softmax; fully masked rows give zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models.rope import rope


def mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B or 1, T, S]: True where query t may attend to key s.

    Causality compares positions when both are given (KV-cache decoding), else indices with the query block
    aligned to the end of the keys. Segment id 0 is padding and attends to nothing.
    """
    allowed = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        if q_positions is not None and kv_positions is not None:
            allowed = kv_positions[:, None, :] <= q_positions[:, :, None]
        else:
            q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
            allowed = (jnp.arange(kv_len)[None, :] <= q_idx)[None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        same = segment_ids[:, :, None] == kv_seg[:, None, :]
        allowed = allowed & same & (segment_ids[:, :, None] != 0)
    return allowed


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention without repeating K/V.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; segment_ids: [B, T] (kv_segment_ids: [B, S],
    defaults to segment_ids); returns [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"attention: {h} query heads is not a multiple of {kh} KV heads (q {q.shape}, k {k.shape})")
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, h // kh, d)  # [B, T, K, G, D]
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = mask(t, s, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                   q_positions=q_positions, kv_positions=kv_positions)[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def decode_step(qkv: jax.Array, n_heads: int, cache_k: jax.Array, cache_v: jax.Array, q_positions: jax.Array,
                kv_positions: jax.Array, kv_segment_ids: jax.Array, index, theta: float = 10000.0):
    """The float32 oracle of `decode.decode_step` (without norm_x): rope.rope on the new query and key of
    qkv [B, H+2K, D], the new key and value written into the cache [B, S, K, D] at column `index`, then
    `attention` over the cache. Returns (attention [B, H, D], cache_k, cache_v), float32."""
    kh = cache_k.shape[2]
    qkv = qkv.astype(jnp.float32)[:, None]
    q, k = (rope(x, q_positions, theta) for x in (qkv[:, :, :n_heads], qkv[:, :, n_heads:n_heads + kh]))
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k.astype(jnp.float32), k, index, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v.astype(jnp.float32), qkv[:, :, n_heads + kh:], index,
                                                  axis=1)
    out = attention(q, cache_k, cache_v, segment_ids=jnp.ones((q.shape[0], 1), jnp.int32),
                    kv_segment_ids=kv_segment_ids, q_positions=q_positions, kv_positions=kv_positions)
    return out[:, 0], cache_k, cache_v
