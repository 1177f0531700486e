"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

The NNX module owns the parameters (each with its logical axis names); the math is pure functions of a
params dict, so `apply(graphdef, params, batch)` is jittable and the sampler can reuse `block` with a cache.
Parameters are float32; matmuls run in `cfg.dtype` (bfloat16 by default); logits come out in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, head_dim
from jaxllm.kernels import swiglu
from jaxllm.models import attention as attention_lib
from jaxllm.models.attention import attention
from jaxllm.models.rope import rope, rope_tables
from jaxllm.parallel.rules import constrain

Params = dict[str, Any]

# name -> (shape builder, logical axes, init kind); shapes of stacked per-layer weights start with L.
_LAYER_WEIGHTS = {
    "attn_norm": (lambda c, hd: (c.d_model,), ("embed",), "ones"),
    "wq": (lambda c, hd: (c.d_model, c.n_heads, hd), ("embed", "heads", "head_dim"), "normal"),
    "wk": (lambda c, hd: (c.d_model, c.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), "normal"),
    "wv": (lambda c, hd: (c.d_model, c.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), "normal"),
    "wo": (lambda c, hd: (c.n_heads, hd, c.d_model), ("heads", "head_dim", "embed"), "out"),
    "mlp_norm": (lambda c, hd: (c.d_model,), ("embed",), "ones"),
    "w_gate": (lambda c, hd: (c.d_model, c.d_ff), ("embed", "mlp"), "normal"),
    "w_up": (lambda c, hd: (c.d_model, c.d_ff), ("embed", "mlp"), "normal"),
    "w_down": (lambda c, hd: (c.d_ff, c.d_model), ("mlp", "embed"), "out"),
}
_LAYER_BIASES = {
    "bq": (lambda c, hd: (c.n_heads, hd), ("heads", "head_dim")),
    "bk": (lambda c, hd: (c.n_kv_heads, hd), ("kv_heads", "head_dim")),
    "bv": (lambda c, hd: (c.n_kv_heads, hd), ("kv_heads", "head_dim")),
    "bo": (lambda c, hd: (c.d_model,), ("embed",)),
    "b_gate": (lambda c, hd: (c.d_ff,), ("mlp",)),
    "b_up": (lambda c, hd: (c.d_ff,), ("mlp",)),
    "b_down": (lambda c, hd: (c.d_model,), ("embed",)),
}


def _init(key: jax.Array, shape: tuple[int, ...], kind: str, cfg: ModelConfig) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, jnp.float32)
    if kind == "zeros":
        return jnp.zeros(shape, jnp.float32)
    std = cfg.init_std / ((2 * cfg.n_layers) ** 0.5 if kind == "out" else 1.0)
    return std * jax.random.normal(key, shape, jnp.float32)


class Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hd = head_dim(cfg)
        for name, (shape_fn, axes, kind) in _LAYER_WEIGHTS.items():
            shape = (cfg.n_layers, *shape_fn(cfg, hd))
            setattr(self, name, nnx.Param(_init(rngs.params(), shape, kind, cfg), logical_axes=("layers", *axes)))
        if cfg.use_bias:
            for name, (shape_fn, axes) in _LAYER_BIASES.items():
                shape = (cfg.n_layers, *shape_fn(cfg, hd))
                setattr(self, name, nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=("layers", *axes)))


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens, positions, segment_ids)` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.d_model), "normal", cfg),
                               logical_axes=("vocab", "embed"))
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32), logical_axes=("embed",))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(_init(rngs.params(), (cfg.d_model, cfg.vocab_size), "normal", cfg),
                                     logical_axes=("embed", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        return logits(params, self.cfg, tokens, positions, segment_ids)


# ---------------------------------------------------------------------------------------------------------
# Pure math on the params dict.


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32; weight None: folded into the next matmul (fold_norms)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 if weight is None else x32 * weight).astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, eq: str, p: Params, bias: str | None) -> jax.Array:
    y = jnp.einsum(eq, x, w.astype(x.dtype))
    if bias and bias in p:
        y = y + p[bias].astype(x.dtype)
    return y


def qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """Normed input -> RoPE'd q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]."""
    if "wqkv" in p:  # fused by fuse_projections (decoding: one matmul instead of three)
        q, k, v = jnp.split(project_qkv(p, x, cfg), [cfg.n_heads, cfg.n_heads + cfg.n_kv_heads], axis=2)
    else:
        h = rms_norm(x, p.get("attn_norm"), cfg.norm_eps)
        q = _dense(h, p["wq"], "btd,dnh->btnh", p, "bq")
        k = _dense(h, p["wk"], "btd,dnh->btnh", p, "bk")
        v = _dense(h, p["wv"], "btd,dnh->btnh", p, "bv")
    return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def project_qkv(p: Params, x: jax.Array, cfg: ModelConfig, norm: bool = True) -> jax.Array:
    """Normed input through the fused projection (fuse_projections), biases added, before RoPE:
    [B, T, H + 2K, D] (query heads, then keys, then values). norm=False: x as it is (a kernel applies the
    norm's scale afterwards: the norm weight must be folded, fold_norms)."""
    h = rms_norm(x, p.get("attn_norm"), cfg.norm_eps) if norm else x
    fused = _dense(h, p["wqkv"], "btd,dnh->btnh", p, None)
    biases = [p.get(name) for name in ("bq", "bk", "bv")]
    if all(b is None for b in biases):
        return fused
    sizes = (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
    bias = jnp.concatenate([jnp.zeros((n, fused.shape[-1])) if b is None else b for b, n in zip(biases, sizes)])
    return fused + bias.astype(fused.dtype)


def mlp(p: Params, x: jax.Array, cfg: ModelConfig, kernel: bool = False) -> jax.Array:
    """The MLP sublayer (its RMSNorm included) of x [B, T, D]. kernel: with the norm weight folded
    (fold_norms), the matmul takes x un-normed, one Pallas kernel applies the norm's row scale and SwiGLU, and
    the down projection runs split over d_ff (DECODE_DOWN_SPLITS; decoding is this path's only user)."""
    if kernel and "mlp_norm" not in p:  # fold_norms drops it only for a fused, bias-free gate/up
        b, t, d = x.shape
        gate_up = _dense(x, p["w_gate_up"], "btd,df->btf", p, None)  # [B, T, 2F]
        act = swiglu.normed_swiglu(x.reshape(b * t, d), gate_up.reshape(b * t, -1), cfg.norm_eps)
        if DECODE_DOWN_SPLITS > 1 and "b_down" not in p and act.shape[-1] % DECODE_DOWN_SPLITS == 0:
            return _split_k_dense(act.reshape(b, t, -1), p["w_down"], DECODE_DOWN_SPLITS)
        return _dense(act.reshape(b, t, -1), p["w_down"], "btf,fd->btd", p, "b_down")
    h = rms_norm(x, p.get("mlp_norm"), cfg.norm_eps)
    if "w_gate_up" in p:  # fused by fuse_projections
        gate, up = jnp.split(_dense(h, p["w_gate_up"], "btd,df->btf", p, None), 2, axis=-1)  # [B, T, F] each
        gate, up = (y + p[b].astype(y.dtype) if b in p else y for y, b in ((gate, "b_gate"), (up, "b_up")))
    else:
        gate = _dense(h, p["w_gate"], "btd,df->btf", p, "b_gate")
        up = _dense(h, p["w_up"], "btd,df->btf", p, "b_up")
    return _dense(jax.nn.silu(gate) * up, p["w_down"], "btf,fd->btd", p, "b_down")


# The decode MLP's down projection (rows x d_ff x d_model) as this many batched GEMMs over equal slices of d_ff,
# float32 partials summed by XLA with the residual, instead of cuBLAS's own split-K and its reduce kernel: ~1% per
# generate call on an H200 for 1b and 124m (docs/benchmarks.md, thirteenth session).
DECODE_DOWN_SPLITS = 2


def _split_k_dense(x: jax.Array, w: jax.Array, splits: int) -> jax.Array:
    """x [B, T, F] @ w [F, D] as `splits` products over slices of F, summed in float32: [B, T, D] in x.dtype."""
    b, t, f = x.shape
    parts = jnp.einsum("btsf,sfd->sbtd", x.reshape(b, t, splits, f // splits),
                       w.astype(x.dtype).reshape(splits, f // splits, -1), preferred_element_type=jnp.float32)
    return parts.sum(0).astype(x.dtype)


def fuse_projections(p: Params) -> Params:
    """One layer's params with wq|wk|wv and w_gate|w_up concatenated (wqkv [D, H+2K, hd], w_gate_up [D, 2F]):
    fewer, larger matmuls where launches dominate (decoding). qkv() and mlp() accept either layout."""
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


def _finish_block(p: Params, x: jax.Array, attn: jax.Array, cfg: ModelConfig, kernel: bool = False) -> jax.Array:
    """Attention output projection, residual, then the MLP residual. attn: [B, T, H, D]; x: [B, T, D]."""
    x = x + _dense(attn, p["wo"], "btnh,nhd->btd", p, "bo")
    x = x + mlp(p, x, cfg, kernel)
    return constrain(x, ("batch", "seq", "act_embed"))


def block(p: Params, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One decoder layer (pre-norm). x: [B, T, D] in the compute dtype."""
    q, k, v = qkv(p, x, positions, cfg)
    attn = attention(q, k, v, segment_ids=segment_ids, causal=True, impl=cfg.attention_impl)  # [B, T, H, D]
    return _finish_block(p, x, attn, cfg)


CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")


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
        if attention_lib.decode_step_takes(cfg.attention_impl, fused_shape, cfg.n_heads, cache[0].shape, norm_width):
            fused = project_qkv(p, x, cfg, norm=not folded)[:, 0]  # [B, H + 2K, D]
            cos, sin = rope_tables(positions[:, 0], hd, cfg.rope_theta)  # [B, D/2] each
            attn, cache_k, cache_v = attention_lib.decode_step(
                fused, cfg.n_heads, cos, sin, cache, positions, kv_positions, kv_segment_ids, index,
                norm_x=x[:, 0] if folded else None, eps=cfg.norm_eps)
            cache_k, cache_v = constrain(cache_k, CACHE_AXES), constrain(cache_v, CACHE_AXES)
            kernel = attention_lib.decode_mlp_takes(cfg.attention_impl, x.shape[0], x.shape[-1], cfg.d_ff)
            return _finish_block(p, x, attn[:, None], cfg, kernel), (cache_k, cache_v)
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
    return _finish_block(p, x, attn, cfg), (cache_k, cache_v)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def hidden_states(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)  # [B, T, D]
    x = constrain(x, ("batch", "seq", "act_embed"))

    def body(x, layer_params):
        return block(layer_params, x, positions, segment_ids, cfg), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return rms_norm(x, params["final_norm"], cfg.norm_eps)


def unembed(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 logits [B, T, V]."""
    if cfg.tie_embeddings:
        return jnp.einsum("btd,vd->btv", hidden, params["embed"].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", hidden, params["lm_head"].astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def logits(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
           segment_ids: jax.Array) -> jax.Array:
    return unembed(params, cfg, hidden_states(params, cfg, tokens, positions, segment_ids))
