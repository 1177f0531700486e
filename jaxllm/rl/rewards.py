"""Python reward functions for PPO: `reward.fn=my_module:my_reward`.

A reward function takes the decoded prompts and responses and returns one float per row:
    def my_reward(prompts: list[str], responses: list[str]) -> list[float]
`text_score` turns it into the `score(batch) -> [B]` that rl/ppo_loop.py calls (on the host, not jitted).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward_fn(spec: str, key: str = "reward.fn") -> RewardFn:
    """Import `package.module:function`; a mistake raises ConfigError naming the key and the fix."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}={spec!r} must look like package.module:function (e.g. my_rewards:length_bonus)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: cannot import module {module_name!r} ({e}); "
                          "put it on PYTHONPATH or run from its directory") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                          f"has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def split_rows(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, response token ids) per row: prompt = real tokens outside the response mask."""
    tokens = np.asarray(batch["tokens"])
    response = np.asarray(batch["response_mask"]) != 0
    prompt = (np.asarray(batch["segment_ids"]) != 0) & ~response
    return ([row[m].tolist() for row, m in zip(tokens, prompt)],
            [row[m].tolist() for row, m in zip(tokens, response)])


def text_score(fn: RewardFn, decode: Callable[[list[int]], str], *, name: str = "reward fn"):
    """score(batch) -> float32 [B] that decodes each row and calls fn(prompts, responses)."""

    def score(batch: dict):
        prompt_ids, response_ids = split_rows(batch)
        prompts, responses = [decode(p) for p in prompt_ids], [decode(r) for r in response_ids]
        out = list(fn(prompts, responses))
        if len(out) != len(prompts):
            raise ValueError(f"{name} returned {len(out)} rewards for {len(prompts)} responses; return one float "
                             "per response")
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ValueError(f"{name} returned a non-number ({out[:3]!r}...); return floats") from None
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"{name} returned {values[bad]} for row {bad} (response {responses[bad][:60]!r}); "
                             "rewards must be finite")
        return jnp.asarray(values, jnp.float32)

    return score
