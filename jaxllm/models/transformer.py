"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

The NNX module owns the parameters (each with its logical axis names); the math is pure functions of a
params dict, so `apply(graphdef, params, batch)` is jittable; models/decode.py reuses qkv/mlp with a KV cache.
Parameters are float32; matmuls run in `cfg.dtype` (bfloat16 by default); logits come out in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, head_dim
from jaxllm.models.attention import attention
from jaxllm.models.rope import rope
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
    """RMSNorm over the last axis in float32; weight None: folded into the next matmul (decode.fold_norms)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 if weight is None else x32 * weight).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, eq: str, p: Params, bias: str | None) -> jax.Array:
    """einsum(eq, x, w) in x's dtype, plus p[bias] where the layer has that bias."""
    y = jnp.einsum(eq, x, w.astype(x.dtype))
    if bias and bias in p:
        y = y + p[bias].astype(x.dtype)
    return y


def qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """Normed input -> RoPE'd q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]."""
    h = rms_norm(x, p.get("attn_norm"), cfg.norm_eps)
    q = dense(h, p["wq"], "btd,dnh->btnh", p, "bq")
    k = dense(h, p["wk"], "btd,dnh->btnh", p, "bk")
    v = dense(h, p["wv"], "btd,dnh->btnh", p, "bv")
    return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def mlp(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The MLP sublayer (its RMSNorm included) of x [B, T, D]: SwiGLU."""
    h = rms_norm(x, p.get("mlp_norm"), cfg.norm_eps)
    gate = dense(h, p["w_gate"], "btd,df->btf", p, "b_gate")
    up = dense(h, p["w_up"], "btd,df->btf", p, "b_up")
    return dense(jax.nn.silu(gate) * up, p["w_down"], "btf,fd->btd", p, "b_down")


def finish_block(p: Params, x: jax.Array, attn: jax.Array, cfg: ModelConfig, mlp_fn=mlp) -> jax.Array:
    """Attention output projection, residual, then the MLP residual. attn: [B, T, H, D]; x: [B, T, D].
    mlp_fn(p, x, cfg): the MLP sublayer (models/decode.py passes its fused-weight one)."""
    x = x + dense(attn, p["wo"], "btnh,nhd->btd", p, "bo")
    x = x + mlp_fn(p, x, cfg)
    return constrain(x, ("batch", "seq", "act_embed"))


def block(p: Params, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One decoder layer (pre-norm). x: [B, T, D] in the compute dtype."""
    q, k, v = qkv(p, x, positions, cfg)
    attn = attention(q, k, v, segment_ids=segment_ids, causal=True, impl=cfg.attention_impl)  # [B, T, H, D]
    return finish_block(p, x, attn, cfg)


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
