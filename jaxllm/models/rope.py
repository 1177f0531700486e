"""Rotary position embeddings (RoPE): the angle tables and the rotate-half rotation.

No imports from the package: the model, the reference kernels and the decode kernels all use these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D/2] float32 of the RoPE angles at positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face Llama layout). x: [B, T, N, D]; positions: [B, T]."""
    d = x.shape[-1]
    cos, sin = rope_tables(positions, d, theta)
    cos = jnp.concatenate([cos] * 2, axis=-1)[:, :, None, :]  # [B, T, 1, D]
    sin = jnp.concatenate([sin] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
