"""Losses as pure functions. Every loss returns (loss, metrics) and metrics["weight"], the number of
examples or tokens the mean was taken over, so gradient accumulation can weight microbatches exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1] float32: 1 where token t+1 is a target predicted from position t.

    A target must be in the same packed document as its context (segment ids equal and non-zero) and be
    marked in loss_mask (absent: every non-padding token).
    """
    seg = batch["segment_ids"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        same_doc = same_doc & (loss_mask[:, 1:] != 0)
    return same_doc.astype(jnp.float32)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and log-sum-exp per position, float32. logits: [B, T, V]; targets: [B, T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - lse, lse


def next_token(logits: jax.Array, batch: dict[str, jax.Array], *, z_loss: float = 0.0):
    """Mean next-token cross-entropy over target tokens (see target_mask), plus optional z-loss.

    logits: [B, T, V] float32; batch: tokens [B, T], segment_ids [B, T], optional loss_mask [B, T].
    """
    mask = target_mask(batch)
    logp, lse = token_logprobs(logits[:, :-1], batch["tokens"][:, 1:])
    n = jnp.sum(mask)
    denom = jnp.maximum(n, 1.0)
    ce = -jnp.sum(logp * mask) / denom
    zl = jnp.sum(jnp.square(lse) * mask) / denom
    correct = jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]
    metrics = {
        "loss": ce,
        "z_loss": zl,
        "accuracy": jnp.sum(correct * mask) / denom,
        "weight": n,
    }
    return ce + z_loss * zl, metrics
