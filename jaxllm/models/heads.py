"""Scalar heads (value, reward) on a transformer backbone.

Layout shared by the reward model and the PPO critic, so one can initialise the other:
`{"backbone": <transformer params>, "head": {"w": [D] float32, "b": [] float32}}`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import models
from jaxllm.config import ModelConfig
from jaxllm.models import transformer

Params = dict[str, Any]


def init_head(d_model: int, seed: int, *, std: float = 0.0) -> Params:
    """A scalar head; std=0 starts every output at 0 (a neutral critic / reward)."""
    w = std * jax.random.normal(jax.random.PRNGKey(seed), (d_model,), jnp.float32)
    return {"w": w, "b": jnp.zeros((), jnp.float32)}


def init(cfg: ModelConfig, seed: int, *, std: float = 0.0) -> Params:
    """A fresh backbone (the transformer's params) plus a scalar head."""
    _, backbone = models.init(cfg, seed)
    return {"backbone": backbone, "head": init_head(cfg.d_model, seed + 1, std=std)}


def from_backbone(backbone: Params, cfg: ModelConfig, seed: int, *, std: float = 0.0) -> Params:
    """A scalar model on existing transformer params (e.g. a critic on the SFT policy's weights)."""
    return {"backbone": backbone, "head": init_head(cfg.d_model, seed, std=std)}


def on_policy(cfg: ModelConfig, seed: int, *, std: float = 0.0) -> Params:
    """A head alone, {"head": ...}: a value head on the policy's own hidden states (no second backbone)."""
    return {"head": init_head(cfg.d_model, seed, std=std)}


def logical_axes(cfg: ModelConfig, *, with_backbone: bool = True) -> dict:
    head = {"w": ("embed",), "b": ()}
    return {"backbone": models.logical_axes(cfg), "head": head} if with_backbone else {"head": head}


def apply_head(head: Params, hidden: jax.Array) -> jax.Array:
    """hidden: [B, T, D] -> float32 scalars [B, T]."""
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), head["w"]) + head["b"]


def scalars(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array) -> jax.Array:
    """The head's output at every position: float32 [B, T] (position t has seen tokens 0..t)."""
    hidden = transformer.hidden_states(params["backbone"], cfg, tokens, positions, segment_ids)  # [B, T, D]
    return apply_head(params["head"], hidden)


# ---------------------------------------------------------------------------------------------------------
# Sequence scores (the reward model): the head at each row's last real token.


def last_token_index(mask: jax.Array) -> jax.Array:
    """[B] index of the last position with mask != 0 (left, right or no padding). mask: [B, T]."""
    t = mask.shape[1]
    idx = jnp.where(mask != 0, jnp.arange(t)[None, :], -1)  # [B, T]
    return jnp.maximum(jnp.max(idx, axis=1), 0)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """[B, T] positions counting real tokens only, so left padding does not shift RoPE."""
    return jnp.maximum(jnp.cumsum(mask != 0, axis=1) - 1, 0).astype(jnp.int32)


POOLINGS = ("last", "mean")


def hidden_at_last(backbone: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [B, D]: the backbone's final hidden state at each row's last real token."""
    hidden = _hidden(backbone, cfg, tokens, mask)  # [B, T, D]
    last = last_token_index(mask)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]


def hidden_mean(backbone: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [B, D]: the mean of the backbone's final hidden states over each row's real tokens."""
    hidden = _hidden(backbone, cfg, tokens, mask)  # [B, T, D]
    real = (mask != 0).astype(jnp.float32)  # [B, T]
    return jnp.einsum("btd,bt->bd", hidden, real) / jnp.maximum(real.sum(axis=1), 1.0)[:, None]


def _hidden(backbone: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    segment_ids = (mask != 0).astype(jnp.int32)
    hidden = transformer.hidden_states(backbone, cfg, tokens, positions_from_mask(mask), segment_ids)  # [B, T, D]
    return hidden.astype(jnp.float32)


def score(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, pooling: str = "last") -> jax.Array:
    """Rewards [B] float32 (raw, not normalised). tokens: [B, T] int32; mask: [B, T] (1 = real token).

    Pure and jittable (`jax.jit(score, static_argnums=(1, 4))`). Each row is one sequence (prompt + response +
    EOS, see data/formats.encode_scored); it may be left- or right-padded. pooling: "last" scores the hidden
    state at the last real token (EOS); "mean" scores the mean hidden state over the real tokens (the same as
    the mean of per-token scores). Use the pooling the reward run was trained with (RewardConfig.pooling).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    pool = hidden_mean if pooling == "mean" else hidden_at_last
    h = pool(params["backbone"], cfg, tokens, mask)  # [B, D]
    return h @ params["head"]["w"] + params["head"]["b"]
