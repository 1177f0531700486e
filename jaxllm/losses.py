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


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, *, margin: jax.Array | float = 0.0,
                  center_coef: float = 0.0):
    """Pairwise reward-model loss: mean -log sigmoid(r_chosen - r_rejected - margin), computed stably as
    softplus(-(diff - margin)), plus center_coef * mean((r_chosen + r_rejected)^2), which keeps rewards
    centred on zero (the "reward centering" auxiliary term).

    r_chosen, r_rejected: [B] float32; margin: scalar or [B] (a required gap, e.g. from graded preferences).
    """
    r_chosen = r_chosen.astype(jnp.float32)
    r_rejected = r_rejected.astype(jnp.float32)
    diff = r_chosen - r_rejected  # [B]
    bt = jnp.mean(jax.nn.softplus(-(diff - margin)))
    center = jnp.mean(jnp.square(r_chosen + r_rejected))
    rewards = jnp.concatenate([r_chosen, r_rejected])  # [2B]
    metrics = {
        "loss": bt,
        "center_loss": center,
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "margin": jnp.mean(diff),
        "reward_mean": jnp.mean(rewards),
        "reward_std": jnp.std(rewards),
        "weight": jnp.asarray(r_chosen.shape[0], jnp.float32),
    }
    return bt + center_coef * center, metrics
