"""Decode-only rewrites of the transformer layer: fused projections, folded norms, split-K, the KV-cache block.

The architecture is models/transformer.py; these rewrite its weights and math for KV-cache decoding (fewer,
larger matmuls; the decode kernels apply the norms' row scales) and give the same numbers up to rounding.
`generate/kv_cache.py` prepares each layer with `fold_norms(fuse_projections(p))` and runs `block_decode`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, head_dim
from jaxllm.kernels import dispatch
from jaxllm.kernels.decode import swiglu
from jaxllm.models import attention as attention_lib, transformer
from jaxllm.models.attention import attention
from jaxllm.models.rope import rope, rope_tables
from jaxllm.models.transformer import dense, rms_norm
from jaxllm.parallel.rules import constrain

Params = dict[str, Any]
CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")

# The decode MLP's down projection (rows x d_ff x d_model) as this many batched GEMMs over equal slices of d_ff,
# float32 partials summed by XLA with the residual, instead of cuBLAS's own split-K and its reduce kernel: ~1% per
# generate call on an H200 for 1b and 124m (docs/benchmarks.md).
DECODE_DOWN_SPLITS = 2


def fuse_projections(p: Params) -> Params:
    """One layer's params with wq|wk|wv and w_gate|w_up concatenated (wqkv [D, H+2K, hd], w_gate_up [D, 2F]):
    fewer, larger matmuls where launches dominate (decoding). qkv() and mlp() here accept either layout."""
    p = dict(p)
    p["wqkv"] = jnp.concatenate([p.pop("wq"), p.pop("wk"), p.pop("wv")], axis=1)
    p["w_gate_up"] = jnp.concatenate([p.pop("w_gate"), p.pop("w_up")], axis=1)
    return p


def fold_norms(p: Params) -> Params:
    """One layer's fused params (fuse_projections) with each RMSNorm weight folded into the matrix after it:
    rms_norm(x, g) @ W == rms_norm(x, None) @ (g[:, None] * W), so the norm entry is dropped (rms_norm then
    skips the weight) and a decode kernel can apply the norm's row scale after the matmul instead of running a
    norm kernel before it. A norm whose projections have biases stays (the scale must precede the bias).
    Fold in float32, before casting the matrices to the compute dtype."""
    p = dict(p)
    for name, norm_name, biases in (("wqkv", "attn_norm", ("bq", "bk", "bv")),
                                    ("w_gate_up", "mlp_norm", ("b_gate", "b_up"))):
        if name in p and not any(b in p for b in biases):
            w, norm = p[name], p.pop(norm_name).astype(jnp.float32)
            p[name] = (norm.reshape(-1, *[1] * (w.ndim - 1)) * w.astype(jnp.float32)).astype(w.dtype)
    return p


def project_qkv(p: Params, x: jax.Array, cfg: ModelConfig, norm: bool = True) -> jax.Array:
    """Normed input through the fused projection (fuse_projections), biases added, before RoPE:
    [B, T, H + 2K, D] (query heads, then keys, then values). norm=False: x as it is (a kernel applies the
    norm's scale afterwards: the norm weight must be folded, fold_norms)."""
    h = rms_norm(x, p.get("attn_norm"), cfg.norm_eps) if norm else x
    fused = dense(h, p["wqkv"], "btd,dnh->btnh", p, None)
    biases = [p.get(name) for name in ("bq", "bk", "bv")]
    if all(b is None for b in biases):
        return fused
    sizes = (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
    bias = jnp.concatenate([jnp.zeros((n, fused.shape[-1])) if b is None else b for b, n in zip(biases, sizes)])
    return fused + bias.astype(fused.dtype)


def qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """transformer.qkv for either layout: RoPE'd q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]."""
    if "wqkv" not in p:
        return transformer.qkv(p, x, positions, cfg)
    q, k, v = jnp.split(project_qkv(p, x, cfg), [cfg.n_heads, cfg.n_heads + cfg.n_kv_heads], axis=2)
    return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def _split_k_dense(x: jax.Array, w: jax.Array, splits: int) -> jax.Array:
    """x [B, T, F] @ w [F, D] as `splits` products over slices of F, summed in float32: [B, T, D] in x.dtype."""
    b, t, f = x.shape
    parts = jnp.einsum("btsf,sfd->sbtd", x.reshape(b, t, splits, f // splits),
                       w.astype(x.dtype).reshape(splits, f // splits, -1), preferred_element_type=jnp.float32)
    return parts.sum(0).astype(x.dtype)


def mlp(p: Params, x: jax.Array, cfg: ModelConfig, kernel: bool = False) -> jax.Array:
    """transformer.mlp for either layout. kernel: with the norm weight folded (fold_norms), the matmul takes x
    un-normed, one Pallas kernel applies the norm's row scale and SwiGLU, and the down projection runs split
    over d_ff (DECODE_DOWN_SPLITS)."""
    if kernel and "mlp_norm" not in p:  # fold_norms drops it only for a fused, bias-free gate/up
        b, t, d = x.shape
        gate_up = dense(x, p["w_gate_up"], "btd,df->btf", p, None)  # [B, T, 2F]
        act = swiglu.normed_swiglu(x.reshape(b * t, d), gate_up.reshape(b * t, -1), cfg.norm_eps)
        if DECODE_DOWN_SPLITS > 1 and "b_down" not in p and act.shape[-1] % DECODE_DOWN_SPLITS == 0:
            return _split_k_dense(act.reshape(b, t, -1), p["w_down"], DECODE_DOWN_SPLITS)
        return dense(act.reshape(b, t, -1), p["w_down"], "btf,fd->btd", p, "b_down")
    if "w_gate_up" not in p:
        return transformer.mlp(p, x, cfg)
    h = rms_norm(x, p.get("mlp_norm"), cfg.norm_eps)
    gate, up = jnp.split(dense(h, p["w_gate_up"], "btd,df->btf", p, None), 2, axis=-1)  # [B, T, F] each
    gate, up = (y + p[b].astype(y.dtype) if b in p else y for y, b in ((gate, "b_gate"), (up, "b_up")))
    return dense(jax.nn.silu(gate) * up, p["w_down"], "btf,fd->btd", p, "b_down")


def block_decode(p: Params, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array],
                 index: jax.Array, kv_positions: jax.Array, kv_segment_ids: jax.Array, cfg: ModelConfig,
                 fresh: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer over T new tokens with a KV cache (prefill: T = prompt width; decode: T = 1).

    x: [B, T, D]; positions: [B, T] (exact per-row positions); cache: (k, v) each [B, S, K, D];
    index: scalar column where the new keys are written (shared by all rows: prompts are left-padded);
    kv_positions, kv_segment_ids: [B, S] for every cache column (0 = padding). Columns not yet written have
    positions beyond every query's, so position-based causality hides them. Returns (x, updated cache).
    fresh: index is 0 and the cache empty (a prefill), so the new tokens attend only among themselves: causal
    self-attention with kv_segment_ids[:, :T] (left padding = segment 0), the training path's flash kernel,
    instead of attending over the whole cache. Left-padded rows keep column order = position order.
    """
    if not fresh and x.shape[1] == 1 and "wqkv" in p:  # one new token: RoPE, cache write, attention in one kernel
        hd = head_dim(cfg)
        fused_shape = (x.shape[0], cfg.n_heads + 2 * cfg.n_kv_heads, hd)
        folded = "attn_norm" not in p  # fold_norms: the kernel applies the norm's row scale
        norm_width = x.shape[-1] if folded else None
        if dispatch.decode_step_takes(cfg.attention_impl, fused_shape, cfg.n_heads, cache[0].shape, norm_width):
            fused = project_qkv(p, x, cfg, norm=not folded)[:, 0]  # [B, H + 2K, D]
            cos, sin = rope_tables(positions[:, 0], hd, cfg.rope_theta)  # [B, D/2] each
            attn, cache_k, cache_v = attention_lib.decode_step(
                fused, cfg.n_heads, cos, sin, cache, positions, kv_positions, kv_segment_ids, index,
                norm_x=x[:, 0] if folded else None, eps=cfg.norm_eps)
            cache_k, cache_v = constrain(cache_k, CACHE_AXES), constrain(cache_v, CACHE_AXES)
            kernel = dispatch.decode_mlp_takes(cfg.attention_impl, x.shape[0], x.shape[-1], cfg.d_ff)
            x = transformer.finish_block(p, x, attn[:, None], cfg, functools.partial(mlp, kernel=kernel))
            return x, (cache_k, cache_v)
    q, k, v = qkv(p, x, positions, cfg)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
    cache_k, cache_v = constrain(cache_k, CACHE_AXES), constrain(cache_v, CACHE_AXES)
    if fresh:
        attn = attention(q, k, v, segment_ids=kv_segment_ids[:, :x.shape[1]], causal=True, impl=cfg.attention_impl)
    else:
        attn = attention(q, cache_k, cache_v, segment_ids=jnp.ones(positions.shape, jnp.int32),
                         kv_segment_ids=kv_segment_ids, q_positions=positions, kv_positions=kv_positions,
                         impl=cfg.attention_impl, kv_length=index + x.shape[1])  # [B, T, H, D]
    return transformer.finish_block(p, x, attn, cfg, mlp), (cache_k, cache_v)
