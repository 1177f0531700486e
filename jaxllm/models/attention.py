"""One attention entry point for the whole stack; `impl` picks the backend.

impl: "xla" (pure jnp reference, runs anywhere), "cudnn" (jax.nn.dot_product_attention on a GPU),
"pallas" (our flash kernel: Triton-lowered Pallas on a GPU, interpret mode on the CPU for tests),
On a TPU "pallas" is jax's splash-attention kernel behind the same contract (kernels/flash_attention/
pallas_tpu.py). "auto": our kernel wherever it supports the shape (GPU and TPU), else cuDNN on a GPU and
"xla" on a TPU, saying once in the log why; "xla" on the CPU. Every such choice is made in
kernels/dispatch.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.kernels import dispatch
from jaxllm.kernels.decode import attention as decode_attention
from jaxllm.kernels.flash_attention import pallas_gpu, reference
from jaxllm.parallel import rules
from jaxllm.parallel.shard import KV_AXES, Q_AXES, per_shard


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    kv_length: jax.Array | None = None,
) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, S, K, D]; segment_ids: [B, T] (0 = padding). Returns [B, T, H, D].

    Position-based causality (q_positions / kv_positions) is for KV-cache decoding: one new token per row
    (T = 1) with kv_length (the cache columns written so far) goes to our Pallas decode kernel under "auto" on a
    GPU and under "pallas" on a GPU or the CPU (interpret mode; kernels/decode/attention.py); everything
    else there, and a TPU, uses "xla".
    """
    if q_positions is not None:
        if dispatch.decode_attention_takes(impl, q, k, kv_length):
            return per_shard(decode_attention.decode_attention,
                             (q, k, v, q_positions, kv_positions, kv_segment_ids, kv_length),
                             (Q_AXES, KV_AXES, KV_AXES, ("batch", None), ("batch", "seq"), ("batch", "seq"), ()))
        return reference.attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   causal=causal, q_positions=q_positions, kv_positions=kv_positions)
    impl = dispatch.resolve_impl(impl, q, k, kv_segment_ids)
    if impl == "xla":
        return reference.attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   causal=causal, q_positions=q_positions, kv_positions=kv_positions)
    if impl == "cudnn":
        mask = None
        if segment_ids is not None:
            mask = reference.mask(q.shape[1], k.shape[1], segment_ids=segment_ids,
                                  kv_segment_ids=kv_segment_ids, causal=False)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    reason = dispatch.unsupported_reason(q, k, kv_segment_ids)
    if reason is not None:
        raise ValueError(f"attention impl 'pallas' can't run this shape: {reason}; use impl='auto' or 'xla'")
    return per_shard(lambda q, k, v, s, ks: _pallas(q, k, v, s, ks, causal), (q, k, v, segment_ids, kv_segment_ids),
                     (Q_AXES, KV_AXES, KV_AXES, ("batch", "seq"), ("batch", "seq")))


def decode_step(qkv: jax.Array, n_heads: int, cos: jax.Array, sin: jax.Array, cache: tuple[jax.Array, jax.Array],
                q_positions: jax.Array, kv_positions: jax.Array, kv_segment_ids: jax.Array, index: jax.Array,
                norm_x: jax.Array | None = None, eps: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """kernels/decode/attention.decode_step (see there for shapes and norm_x) on each device's shard under a
    mesh: batch split, and heads split by giving each device its own query heads' and KV heads' rows of qkv."""
    mesh = rules.active_mesh()
    if mesh is None:
        return decode_attention.decode_step(qkv, n_heads, cos, sin, *cache, q_positions, kv_positions,
                                            kv_segment_ids, index, norm_x=norm_x, eps=eps)
    kh = cache[0].shape[2]
    q, k, v = jnp.split(qkv, [n_heads, n_heads + kh], axis=1)  # each device takes its heads of each

    def local(q, k, v, cos, sin, cache_k, cache_v, q_positions, kv_positions, kv_segment_ids, index, norm_x):
        return decode_attention.decode_step(jnp.concatenate([q, k, v], axis=1), q.shape[1], cos, sin, cache_k,
                                            cache_v, q_positions, kv_positions, kv_segment_ids, index,
                                            norm_x=norm_x, eps=eps)

    heads, kv_heads, row = ("batch", "heads", "head_dim"), ("batch", "kv_heads", "head_dim"), ("batch", None)
    return per_shard(local, (q, k, v, cos, sin, *cache, q_positions, kv_positions, kv_segment_ids, index, norm_x),
                     (heads, kv_heads, kv_heads, row, row, KV_AXES, KV_AXES, row, ("batch", "seq"),
                      ("batch", "seq"), (), row), out_axes=(heads, KV_AXES, KV_AXES))


def _pallas(q, k, v, segment_ids, kv_segment_ids, causal):
    if jax.default_backend() == "tpu":
        from jaxllm.kernels.flash_attention import pallas_tpu  # noqa: PLC0415 (TPU only)

        return pallas_tpu.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    dispatch.say_flash_variants(q, k, causal)
    return pallas_gpu.flash_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                      causal=causal)
