"""Python reward functions: loading by `module:function`, decoding rows, and one-line errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.rl import rewards

BATCH = {  # row 0: prompt [5, 6], response [7, 8]; row 1: left-padded prompt [9], response [3]
    "tokens": jnp.array([[5, 6, 7, 8, 0], [0, 9, 3, 0, 0]]),
    "segment_ids": jnp.array([[1, 1, 1, 1, 0], [0, 1, 1, 0, 0]]),
    "response_mask": jnp.array([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]),
}


def decode(ids):
    return " ".join(map(str, ids))


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_ppo.py").write_text(
        "def length(prompts, responses):\n"
        "    return [len(r.split()) + 0.5 * len(p.split()) for p, r in zip(prompts, responses)]\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(prompts)\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_ppo"


def test_text_score_decodes_prompt_and_response(module):
    assert rewards.split_rows(BATCH) == ([[5, 6], [9]], [[7, 8], [3]])
    score = rewards.text_score(rewards.load_reward_fn(f"{module}:length"), decode)
    np.testing.assert_allclose(np.asarray(score(BATCH)), [2 + 0.5 * 2, 1 + 0.5 * 1])


@pytest.mark.parametrize("spec,message", [
    ("no_colon", "must look like package.module:function"),
    ("surely_missing_module_xyz:fn", "cannot import module"),
    ("{m}:absent", "has no attribute 'absent'"),
    ("{m}:NOT_A_FUNCTION", "is a int, not a function"),
])
def test_bad_reward_fn_specs(module, spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        rewards.load_reward_fn(spec.format(m=module))
    assert "reward.fn=" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fn,message", [("short", "returned 1 rewards for 2"), ("nan", "must be finite")])
def test_bad_reward_fn_outputs(module, fn, message):
    score = rewards.text_score(rewards.load_reward_fn(f"{module}:{fn}"), decode)
    with pytest.raises(ValueError, match=message):
        score(BATCH)
