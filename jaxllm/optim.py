"""Optax chains: global-norm clipping, AdamW with a weight-decay mask, warmup + decay schedules."""

from __future__ import annotations

import jax
import optax

from jaxllm.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        main = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(params, *, decay_embeddings: bool):
    """True for weights that get weight decay: weight matrices (named w*), never norms or biases; the
    embedding and the LM head only when decay_embeddings."""

    def decide(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("embed", "lm_head"):
            return decay_embeddings
        stacked = any(str(getattr(p, "key", p)) == "layers" for p in path)
        return name.startswith("w") and leaf.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def adamw(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decay). Accumulation happens in the train step."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(
        schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda p: decay_mask(p, decay_embeddings=cfg.decay_embeddings)))
    return optax.chain(*parts)
