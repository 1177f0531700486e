"""The PPO iteration: prompts -> rollout -> score -> advantages -> update, and a thin loop with checkpoints.

Written against two callables so the sampler and the reward source plug in without this file knowing them:
  generate(policy_params, prompt_tokens [B, P], prompt_mask [B, P], key)
      -> (tokens [B, T], sample_logprobs [B, T], response_mask [B, T])   (prompt + response, one row each)
  score(batch) -> scores [B]   batch: tokens, positions, segment_ids, response_mask [B, T]
                               (a reward model, or a Python function via rl/rewards.py)
Everything on the accelerator is jitted; the iteration's randomness is fold_in(state.rng, state.step) and the
prompt batch is a function of state.step, so a run restored from a checkpoint continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.rl import ppo
from jaxllm.rl.ppo import PPOConfig, PPOState

GenerateFn = Callable[[dict, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
ScoreFn = Callable[[dict], jax.Array]


def prompt_batch(prompts: np.ndarray, prompt_mask: np.ndarray, step: int, batch_size: int, seed: int):
    """Rows of iteration `step`: epochs of a seeded permutation, so the position is the step itself.

    prompts, prompt_mask: [N, P]. Returns (tokens [batch_size, P], mask [batch_size, P]). An epoch is
    N // batch_size batches; the N % batch_size rows left over differ from epoch to epoch.
    """
    n = prompts.shape[0]
    if n < batch_size:
        raise ConfigError(f"{n} prompts are fewer than one rollout batch of {batch_size}; "
                          "add prompts or lower the rollout batch size")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)[i * batch_size: (i + 1) * batch_size]
    return jnp.asarray(prompts[order]), jnp.asarray(prompt_mask[order])


def sequence_batch(prompt_mask: jax.Array, tokens: jax.Array, response_mask: jax.Array) -> dict:
    """The model batch for generated rows: segment_ids = prompt or response; positions count real tokens.

    prompt_mask: [B, P] over tokens[:, :P]; tokens, response_mask: [B, T]. Works for left- or right-padded
    prompts: positions are the running count of real tokens, as at generation time.
    """
    t = tokens.shape[1]
    prompt_part = jnp.pad(prompt_mask.astype(jnp.int32), ((0, 0), (0, t - prompt_mask.shape[1])))  # [B, T]
    segment_ids = jnp.maximum(prompt_part, response_mask.astype(jnp.int32))
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
            "response_mask": response_mask.astype(jnp.int32)}


def make_rollout_forward(cfg: PPOConfig, *, policy_model: ModelConfig, value_model: ModelConfig):
    """Jitted (policy, reference, critic params, batch) -> (logprobs, ref_logprobs, values), each [B, T].

    The policy's log-probs are recomputed by a forward pass (not taken from the sampler) so the PPO ratio
    starts at exactly 1 under the same numerics as the update.
    """

    def forward(policy_params, ref_params, value_params, batch):
        logprobs, _, values = ppo.policy_and_values(policy_params, value_params, batch, policy_model=policy_model,
                                                    value_model=value_model, temperature=cfg.temperature)
        ref_logprobs, _ = ppo.policy_logprobs(ref_params, policy_model, batch, cfg.temperature)
        return logprobs, ref_logprobs, values

    return jax.jit(forward)


def iteration(state: PPOState, ref_params, prompts: tuple[jax.Array, jax.Array], *, generate: GenerateFn,
              score: ScoreFn, forward, update, cfg: PPOConfig, eos_id: int | None):
    """One PPO iteration. Returns (new state, metrics dict of floats, the rollout's tokens and mask)."""
    key = jax.random.fold_in(state.rng, state.step)
    gen_key, update_key = jax.random.split(key)
    prompt_tokens, prompt_mask = prompts
    tokens, sample_logprobs, response_mask = generate(state.policy_params, prompt_tokens, prompt_mask, gen_key)
    batch = sequence_batch(prompt_mask, tokens, response_mask)
    logprobs, ref_logprobs, values = forward(state.policy_params, ref_params, state.value_params, batch)
    scores = jnp.asarray(score(batch), jnp.float32)
    cut = ppo.cut_without_eos(tokens, response_mask, eos_id) if eos_id is not None else None
    rollout = dict(batch, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values)
    rollout, rollout_metrics = _advantages(rollout, scores, state.kl.kl_coef, cut, cfg=cfg)
    mask = batch["response_mask"]
    sampler_gap = jnp.max(jnp.abs(sample_logprobs - logprobs) * mask)
    state, update_metrics = update(state, rollout, update_key)
    metrics = jax.device_get({**rollout_metrics, **update_metrics, "sampler_logprob_gap": sampler_gap})
    return state, {k: float(v) for k, v in metrics.items()}, (tokens, response_mask)


@partial(jax.jit, static_argnames="cfg")
def _advantages(rollout, scores, kl_coef, cut, *, cfg: PPOConfig):
    return ppo.compute_advantages(rollout, scores, kl_coef, cfg, cut=cut)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of the whole PPO state (policy, critic, both optimizer states, KL controller, RNG, step).


def state_dict(state: PPOState) -> dict:
    return {"step": state.step, "policy_params": state.policy_params, "value_params": state.value_params,
            "policy_opt_state": state.policy_opt_state, "value_opt_state": state.value_opt_state,
            "kl": state.kl, "rng": state.rng}


def save(mgr, state: PPOState, *, meta: dict | None = None, force: bool = False) -> None:
    checkpoint.save(mgr, int(state.step), state_dict(state), meta=meta, force=force)


def restore_or_keep(mgr, state: PPOState) -> PPOState:
    """The latest checkpoint in mgr onto state's structure, or state itself when there is none."""
    if mgr.latest_step() is None:
        return state
    abstract = jax.eval_shape(lambda: state_dict(state))
    restored, _, _ = checkpoint.restore(mgr, abstract, with_data=False)
    return PPOState(**restored)


def train(state: PPOState, ref_params, prompts: np.ndarray, prompt_mask: np.ndarray, *, iterations: int,
          batch_size: int, seed: int, generate: GenerateFn, score: ScoreFn, forward, update, cfg: PPOConfig,
          eos_id: int | None, run_dir: Path | None = None, every: int = 0,
          log: Callable[[int, dict, jax.Array, jax.Array], None] | None = None) -> PPOState:
    """Run PPO iterations up to `iterations`, resuming from run_dir/checkpoints when present.

    log(step, metrics, tokens, response_mask) sees each iteration's metrics and rollout (to write samples).
    A checkpoint is written every `every` iterations and at the end (every=0: never).
    """
    mgr = checkpoint.manager(Path(run_dir) / "checkpoints", keep=2, use_async=False) if run_dir else None
    try:
        if mgr is not None:
            state = restore_or_keep(mgr, state)
        for step in range(int(state.step), iterations):
            batch_prompts = prompt_batch(prompts, prompt_mask, step, batch_size, seed)
            state, metrics, (tokens, response_mask) = iteration(
                state, ref_params, batch_prompts, generate=generate, score=score, forward=forward, update=update,
                cfg=cfg, eos_id=eos_id)
            if log is not None:
                log(step + 1, metrics, tokens, response_mask)
            if mgr is not None and every and ((step + 1) % every == 0 or step + 1 == iterations):
                save(mgr, state)
    finally:
        if mgr is not None:
            mgr.wait_until_finished()
            mgr.close()
    return state
