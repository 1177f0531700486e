"""The generic pure train step: (TrainState, batch) -> (TrainState, metrics), built from a stage's loss_fn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.train.state import TrainState

# loss_fn(params, batch, rng) -> (loss, metrics); metrics["weight"] = what the mean was taken over.
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def weighted_grads(loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array, accum_steps: int):
    """Gradients and metrics averaged over microbatches with each weighted by metrics["weight"].

    Equal to one step on the whole batch: sum_i w_i * grad(mean_i) / sum_i w_i = grad(total mean).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return grads, metrics

    def split(x):
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    micro = jax.tree.map(split, batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (_, metrics_shape), _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    metric_zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape)

    def body(carry, xs):
        grad_sum, metric_sum = carry
        mb, i = xs
        (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        w = m["weight"].astype(jnp.float32)
        grad_sum = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), grad_sum, g)
        metric_sum = {k: metric_sum[k] + (v if k == "weight" else w * v) for k, v in m.items()}
        return (grad_sum, metric_sum), None

    (grad_sum, metric_sum), _ = jax.lax.scan(body, (zeros, metric_zeros), (micro, jnp.arange(accum_steps)))
    total = jnp.maximum(metric_sum["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / total, grad_sum)
    metrics = {k: v if k == "weight" else v / total for k, v in metric_sum.items()}
    return grads, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
                    lr_schedule: optax.Schedule | None = None, donate: bool = True,
                    state_shardings: Any = None, batch_sharding: Any = None):
    """Jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    With `state_shardings` (a TrainState of NamedShardings, see parallel.rules.state_shardings) the new
    state keeps exactly that layout step after step; `batch_sharding` applies to every batch array.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        grads, metrics = weighted_grads(loss_fn, state.params, batch, rng, accum_steps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    kwargs = {"in_shardings": (state_shardings, batch_sharding)} if batch_sharding is not None else {}
    return jax.jit(train_step, donate_argnums=donate_argnums, out_shardings=(state_shardings, replicated), **kwargs)

