"""Sampling from a model. `simple_generate` re-runs the full forward per token (no cache): small and
obviously right, used for samples during training and as the oracle for the KV-cache sampler."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import transformer


@partial(jax.jit, static_argnames=("cfg",))
def _next_logits(params, cfg: ModelConfig, buf: jax.Array, length: jax.Array) -> jax.Array:
    """Logits [B, V] at position length-1 of each row of buf [B, L] (right-padded)."""
    b, l = buf.shape
    positions = jnp.broadcast_to(jnp.arange(l), (b, l))
    segment_ids = (positions < length[:, None]).astype(jnp.int32)
    logits = transformer.logits(params, cfg, buf, positions, segment_ids)
    return jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0]


def sample_token(key: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def simple_generate(params, cfg: ModelConfig, prompt: list[int], key: jax.Array, *, max_new_tokens: int,
                    temperature: float = 1.0, eos_id: int | None = None) -> list[int]:
    """Continue one prompt; returns the new token ids (stops at eos_id, not included)."""
    if not prompt:
        raise ValueError("prompt is empty: give at least one token")
    window = cfg.max_seq_len
    if len(prompt) >= window:
        raise ValueError(f"prompt has {len(prompt)} tokens; model.max_seq_len={window} leaves no room")
    buf = jnp.zeros((1, window), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))
    length, out = len(prompt), []
    for i in range(min(max_new_tokens, window - len(prompt))):
        logits = _next_logits(params, cfg, buf, jnp.array([length]))
        token = int(sample_token(jax.random.fold_in(key, i), logits, temperature)[0])
        if eos_id is not None and token == eos_id:
            break
        out.append(token)
        buf = buf.at[0, length].set(token)
        length += 1
    return out
