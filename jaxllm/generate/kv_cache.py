"""The model side of KV-cache generation: a pre-allocated per-layer cache and a cache-aware forward.

The cache is a tuple with one `(k, v)` pair per layer, each [B, S, K, D] in the compute dtype, sharded like
activations (`batch, seq, kv_heads, head_dim`). Layers are unrolled in Python rather than scanned so that each
layer's cache is its own buffer in the decode loop's carry: XLA then updates it in place, where a scan with the
cache as xs/ys would copy the whole cache on every step. The per-layer math is `decode.block_decode`,
which shares qkv/mlp with the training path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, head_dim
from jaxllm.models import decode, transformer
from jaxllm.parallel.rules import constrain

Params = dict[str, Any]
Cache = tuple[tuple[jax.Array, jax.Array], ...]


class Prepared(NamedTuple):
    """Params laid out for decoding (`prepare_params`): top-level params and one dict per layer."""

    top: Params
    layers: list[Params]


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
    """Zeros: n_layers pairs of k, v [batch, length, n_kv_heads, head_dim] in the compute dtype."""
    shape = (batch, length, cfg.n_kv_heads, head_dim(cfg))
    dtype = jnp.dtype(cfg.dtype)
    return tuple((constrain(jnp.zeros(shape, dtype), decode.CACHE_AXES),
                  constrain(jnp.zeros(shape, dtype), decode.CACHE_AXES)) for _ in range(cfg.n_layers))


def prepare_params(params: Params, cfg: ModelConfig) -> Prepared:
    """(top-level params, one params dict per layer) with the q/k/v and gate/up projections fused
    (decode.fuse_projections: fewer, larger decode matmuls), the layers' RMSNorm weights folded into those
    matrices (decode.fold_norms: the decode kernels apply the norms' row scales), and matrices cast to
    the compute dtype once.

    Norm weights (the final one) and biases keep their dtype, as in the training path, which casts matrices to
    the compute dtype inside each matmul, and only them; the folded products are rounded once, in float32
    before the cast, so the numerics equal `transformer.logits` up to that rounding.
    """
    dtype = jnp.dtype(cfg.dtype)

    def cast(w: jax.Array) -> jax.Array:
        return w.astype(dtype) if w.ndim >= 2 else w

    top = {name: cast(w) for name, w in params.items() if name != "layers"}
    layers = [decode.fold_norms(decode.fuse_projections({n: w[i] for n, w in params["layers"].items()}))
              for i in range(cfg.n_layers)]
    return Prepared(top, [{name: cast(w) for name, w in layer.items()} for layer in layers])


def forward(top: Params, layers: list[Params], cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            cache: Cache, index: jax.Array, kv_positions: jax.Array, kv_segment_ids: jax.Array,
            fresh: bool = False) -> tuple[jax.Array, Cache]:
    """Run T new tokens through every layer, writing their keys/values at cache column `index`.

    tokens, positions: [B, T] int32; kv_positions, kv_segment_ids: [B, S]. Returns final-normed hidden states
    [B, T, D] in the compute dtype and the updated cache. `top`, `layers` come from `prepare_params`. fresh: a
    prefill into an empty cache at index 0 (decode.block_decode).
    """
    x = jnp.take(top["embed"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, T, D]
    x = constrain(x, ("batch", "seq", "act_embed"))
    new_cache = []
    for layer_params, layer_cache in zip(layers, cache):
        x, layer_cache = decode.block_decode(layer_params, x, positions, layer_cache, index, kv_positions,
                                                  kv_segment_ids, cfg, fresh)
        new_cache.append(layer_cache)
    return transformer.rms_norm(x, top["final_norm"], cfg.norm_eps), tuple(new_cache)


def last_logits(top: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 logits [B, V] of the last column of hidden [B, T, D]."""
    return transformer.unembed(top, cfg, hidden[:, -1:])[:, 0]
