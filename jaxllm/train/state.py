"""TrainState: the whole training state as one pytree (step, params, opt_state, rng)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key; per-step keys are fold_in(rng, step)


def create(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def as_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def from_dict(d: dict) -> TrainState:
    return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])
