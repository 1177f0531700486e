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
