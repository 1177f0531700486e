"""TPU path: jax's shipped Pallas splash-attention kernel, wrapped behind the reference's contract.

Splash differs from our reference in three ways that this wrapper closes: it does not scale the logits
(we scale q), equal segment ids attend to each other even when 0 (we zero the output of padding rows, so
no gradient reaches or leaves them), and it wants lengths that are multiples of its blocks (we pad with
segment 0). GQA runs the multi-query kernel once per KV head (vmap), so K/V are never repeated.
Self-attention only (T == S); the dispatcher falls back to "xla" otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
    splash_attention_mask as splash_mask,
)

DEFAULT_BLOCK = 512


def unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
    """Why the splash path can't take this shape (None when it can)."""
    if q.shape[1] != k.shape[1]:
        return f"query length {q.shape[1]} != key length {k.shape[1]} (splash path is self-attention only)"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads is not a multiple of {k.shape[2]} KV heads"
    return None


@functools.lru_cache(maxsize=64)
def _kernel(group: int, length: int, causal: bool, block: int, interpret: bool):
    """A multi-query splash kernel for `group` query heads over one KV head (cached: mask processing is host work)."""
    one = splash_mask.CausalMask((length, length)) if causal else splash_mask.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([one] * group), block_sizes=sizes,
                                                interpret=interpret)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    block: int = DEFAULT_BLOCK,
    interpret: bool | None = None,
) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, T, K, D]; segment_ids: [B, T] (0 = padding). Returns [B, T, H, D]."""
    reason = unsupported_reason(q, k)
    if reason is not None:
        raise ValueError(f"pallas_tpu.flash_attention: {reason}")
    b, t, h, d = q.shape
    kh = k.shape[2]
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    block = min(block, -(-t // 128) * 128)
    tp = -(-t // block) * block
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)))  # [B, Tp], padding -> 0
    scale = d**-0.5 if scale is None else scale
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qg = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).reshape(b, tp, kh, h // kh, d)
    qg = qg.transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, D]
    kt = jnp.pad(k, pad).transpose(0, 2, 1, 3)  # [B, K, Tp, D]
    vt = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    kernel = _kernel(h // kh, tp, causal, block, bool(interpret))

    def one(qh, kh_, vh, sg):  # qh: [G, Tp, D]; kh_, vh: [Tp, D]; sg: [Tp]
        return kernel(qh, kh_, vh, segment_ids=splash.SegmentIds(q=sg, kv=sg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over KV heads
    out = jax.vmap(per_head)(qg, kt, vt, seg)  # [B, K, G, Tp, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]  # [B, T, H, D]
    return jnp.where((seg[:, :t] != 0)[:, :, None, None], out, 0).astype(q.dtype)
