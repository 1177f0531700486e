"""PPO for RLHF: the math as small pure jittable functions, and the PPO update built from them.

Layout: every per-token array is [B, T] and aligned with `tokens` (prompt + response, padded). Position t
holds what belongs to token t: `logprobs[:, t] = log pi(tokens[:, t] | tokens[:, :t])`, `values[:, t]` =
the critic's value of the state before token t, `rewards[:, t]` the reward for emitting token t.
`response_mask[:, t] = 1` marks generated tokens (EOS included); each row's response is one contiguous span
(possibly empty). Everything outside the mask is ignored and comes back as 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxllm import losses
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.models import heads, transformer
from jaxllm.train.step import weighted_grads  # token-weighted accumulation (exact)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    # Defaults follow common practice; sources in the comments (TRL = trl.PPOConfig, OpenRLHF = its PPO args).
    gamma: float = 1.0  # TRL, OpenRLHF: no discount within a response
    lam: float = 0.95  # TRL, OpenRLHF
    clip_eps: float = 0.2  # TRL cliprange, OpenRLHF eps_clip; PPO paper
    value_clip_eps: float = 0.2  # TRL cliprange_value
    vf_coef: float = 0.1  # TRL
    entropy_coef: float = 0.0  # TRL, OpenRLHF: no entropy bonus by default
    kl_estimator: str = "k1"  # k1 | k2 | k3; TRL kl_estimator="k1" (Schulman's estimators)
    kl_coef: float = 0.05  # TRL; the initial beta when adaptive
    kl_controller: str = "fixed"  # fixed | adaptive (Ziegler et al. 2019)
    kl_target: float = 6.0  # Ziegler et al. 2019 / TRL v0 `target`: per-sequence KL in nats
    kl_horizon: float = 10000.0  # Ziegler et al. 2019 / TRL v0 `horizon`, OpenRLHF kl_horizon
    epochs: int = 4  # TRL num_ppo_epochs
    minibatch_size: int = 8  # rows per minibatch; the rollout batch must be a multiple
    accum_steps: int = 1  # microbatches per minibatch (gradient accumulation, token-weighted: exact)
    whiten_advantages: bool = True  # TRL, OpenRLHF
    whiten_rewards: bool = False  # TRL
    cut_penalty: float = 0.0  # subtracted from the score of a response without EOS (TRL missing_eos_penalty)
    temperature: float = 1.0  # sampling temperature; logprobs are of logits / temperature (as TRL)


KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")


def validate(cfg: PPOConfig, prefix: str = "ppo.") -> PPOConfig:
    """Raise ConfigError naming the key for a value out of range."""
    checks = [
        ("gamma", 0.0 <= cfg.gamma <= 1.0, "must be in [0, 1]"),
        ("lam", 0.0 <= cfg.lam <= 1.0, "must be in [0, 1]"),
        ("clip_eps", cfg.clip_eps > 0, "must be > 0"),
        ("value_clip_eps", cfg.value_clip_eps > 0, "must be > 0"),
        ("vf_coef", cfg.vf_coef >= 0, "must be >= 0"),
        ("entropy_coef", cfg.entropy_coef >= 0, "must be >= 0"),
        ("kl_estimator", cfg.kl_estimator in KL_ESTIMATORS, f"choose one of {', '.join(KL_ESTIMATORS)}"),
        ("kl_coef", cfg.kl_coef >= 0, "must be >= 0"),
        ("kl_controller", cfg.kl_controller in KL_CONTROLLERS, f"choose one of {', '.join(KL_CONTROLLERS)}"),
        ("kl_target", cfg.kl_target > 0, "must be > 0"),
        ("kl_horizon", cfg.kl_horizon > 0, "must be > 0"),
        ("epochs", cfg.epochs > 0, "must be > 0"),
        ("minibatch_size", cfg.minibatch_size > 0, "must be > 0"),
        ("accum_steps", cfg.accum_steps > 0 and cfg.minibatch_size % max(cfg.accum_steps, 1) == 0,
         f"must be > 0 and divide ppo.minibatch_size={cfg.minibatch_size}"),
        ("cut_penalty", cfg.cut_penalty >= 0, "must be >= 0 (it is subtracted from the score)"),
        ("temperature", cfg.temperature > 0, "must be > 0"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)!r} is not allowed: {what}")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Masked statistics.


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance (ddof 0) over the masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries; zero outside the mask. shift_mean=False keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(jnp.float32)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over the mask (1: perfect critic, <= 0: useless)."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)


# ---------------------------------------------------------------------------------------------------------
# KL to the reference, per-token rewards, GAE.


def kl_per_token(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, estimator: str = "k1"):
    """Per-token estimate of KL(pi || ref) from samples of pi; [B, T], zero outside the mask.

    k1 = log pi - log ref (unbiased, can be negative); k2 = (log pi - log ref)^2 / 2; k3 = (r - 1) - log r
    with r = ref / pi (unbiased and >= 0). See Schulman, "Approximating KL divergence" (2020).
    """
    log_ratio = (logprobs - ref_logprobs).astype(jnp.float32)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        kl = jnp.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = exp(-log_ratio); expm1 for accuracy
    else:
        raise ValueError(f"kl estimator {estimator!r} is unknown; choose one of {', '.join(KL_ESTIMATORS)}")
    return kl * mask.astype(jnp.float32)


def cut_without_eos(tokens: jax.Array, mask: jax.Array, eos_id: int) -> jax.Array:
    """[B] bool: the response is non-empty and holds no EOS token (it was cut at the length limit)."""
    has_eos = jnp.any((tokens == eos_id) & (mask != 0), axis=-1)
    return jnp.any(mask != 0, axis=-1) & ~has_eos


def token_rewards(kl: jax.Array, scores: jax.Array, mask: jax.Array, kl_coef, *, cut: jax.Array | None = None,
                  cut_penalty: float = 0.0) -> jax.Array:
    """r_t = -kl_coef * kl_t on response tokens, plus the score (minus cut_penalty if cut) at the last one.

    kl: [B, T] per-token KL (masked); scores: [B]; mask: [B, T]; cut: [B] bool or None. Returns [B, T].
    """
    mask = mask.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    if cut is not None:
        scores = scores - cut_penalty * cut.astype(jnp.float32)
    last = jax.nn.one_hot(heads.last_token_index(mask), mask.shape[-1], dtype=jnp.float32) * mask  # [B, T]
    return (-kl_coef * kl + scores[:, None] * last) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's response span; returns (advantages, returns) [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A taken as 0
    past the end of the response (the episode ends there: bootstrap 0). returns = A + V. Zero off the mask.
    """
    mask = mask.astype(jnp.float32)
    values = values.astype(jnp.float32) * mask
    rewards = rewards.astype(jnp.float32) * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))  # [B, T]; 0 past the end
    deltas = rewards + gamma * next_values - values

    def step(next_adv, xs):
        delta, m = xs  # [B] each
        adv = (delta + gamma * lam * next_adv) * m
        return adv, adv

    _, adv_t = jax.lax.scan(step, jnp.zeros(deltas.shape[0], jnp.float32), (deltas.T, mask.T), reverse=True)
    advantages = adv_t.T  # [B, T]
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------------------
# Losses.


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate, a token mean over the mask: mean(max(-A r, -A clip(r, 1-eps, 1+eps))).

    Returns (loss, {clip_frac: share of tokens where the clipped term is the larger, approx_kl: k3 estimate
    of KL(old || new), ratio: mean ratio}).
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jnp.expm1(-log_ratio) + log_ratio, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_eps: float) -> tuple[jax.Array, dict]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_sq = jnp.square(values - returns)
    clipped_sq = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_sq, clipped_sq), mask)
    return loss, {"vf_clip_frac": masked_mean((clipped_sq > unclipped_sq).astype(jnp.float32), mask)}


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the softmax over the last axis, over the mask. logits: [B, T, V]; mask: [B, T]."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    per_token = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T]
    return masked_mean(per_token, mask)


# ---------------------------------------------------------------------------------------------------------
# KL controller (beta): a small pytree state and pure updates.


class KLState(NamedTuple):
    kl_coef: jax.Array  # float32 scalar


def kl_init(cfg: PPOConfig) -> KLState:
    return KLState(kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32))


def kl_update(state: KLState, observed_kl, n_steps, cfg: PPOConfig) -> KLState:
    """Fixed: unchanged. Adaptive (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon). observed_kl: mean per-sequence KL; n_steps: samples seen."""
    if cfg.kl_controller == "fixed":
        return state
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / cfg.kl_target - 1.0, -0.2, 0.2)
    return KLState(kl_coef=state.kl_coef * (1.0 + error * n_steps / cfg.kl_horizon))


# ---------------------------------------------------------------------------------------------------------
# Model-bound pieces: policy log-probs, critic values, the rollout's advantages, the minibatch loss.


def _next_token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float):
    """logits [B, T, V] (position t predicts t+1) -> (logprobs [B, T] aligned with tokens, logits [B, T-1, V])."""
    logits = logits[:, :-1] / temperature  # [B, T-1, V]
    logp, _ = losses.token_logprobs(logits, tokens[:, 1:])  # [B, T-1]
    return jnp.pad(logp, ((0, 0), (1, 0))), logits


def policy_logprobs(params, model_cfg: ModelConfig, batch: dict, temperature: float = 1.0):
    """(logprobs [B, T], logits [B, T-1, V]) of each token under the policy at `temperature`.

    logprobs[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]]; column 0 is 0. The logits
    returned are the temperature-scaled ones at positions 0..T-2 (each predicting the next token).
    """
    logits = transformer.logits(params, model_cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    return _next_token_logprobs(logits, batch["tokens"], temperature)


def _shift_values(per_position: jax.Array) -> jax.Array:
    """Head outputs [B, T] (position t has seen tokens 0..t) -> values [B, T] of the state before token t."""
    return jnp.pad(per_position[:, :-1], ((0, 0), (1, 0)))


def critic_values(value_params, model_cfg: ModelConfig, batch: dict) -> jax.Array:
    """values[:, t] = V(tokens[:, :t]): the head at position t-1, which has seen exactly the tokens before t.

    value_params: a separate critic {"backbone", "head"}. Returns float32 [B, T]; column 0 is 0.
    """
    out = heads.scalars(value_params, model_cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    return _shift_values(out)


def shares_policy_backbone(value_params) -> bool:
    """A critic without its own backbone ({"head": ...}) is a value head on the policy's hidden states."""
    return "backbone" not in value_params


def policy_and_values(policy_params, value_params, batch: dict, *, policy_model: ModelConfig,
                      value_model: ModelConfig, temperature: float = 1.0):
    """(logprobs [B, T], logits [B, T-1, V], values [B, T]); one forward when the critic shares the policy."""
    if not shares_policy_backbone(value_params):
        logprobs, logits = policy_logprobs(policy_params, policy_model, batch, temperature)
        return logprobs, logits, critic_values(value_params, value_model, batch)
    hidden = transformer.hidden_states(policy_params, policy_model, batch["tokens"], batch["positions"],
                                       batch["segment_ids"])  # [B, T, D]
    logprobs, logits = _next_token_logprobs(transformer.unembed(policy_params, policy_model, hidden),
                                            batch["tokens"], temperature)
    return logprobs, logits, _shift_values(heads.apply_head(value_params["head"], hidden))


def compute_advantages(rollout: dict, scores: jax.Array, kl_coef, cfg: PPOConfig, *,
                       cut: jax.Array | None = None) -> tuple[dict, dict]:
    """Per-token rewards, GAE and (optionally) whitening for one rollout batch.

    rollout: tokens, positions, segment_ids, response_mask, logprobs (sampling policy), ref_logprobs,
    values, all [B, T]; scores: [B]; cut: [B] bool (no EOS) or None. Returns (rollout with kl, rewards,
    advantages, returns added; metrics).
    """
    mask = rollout["response_mask"].astype(jnp.float32)
    kl = kl_per_token(rollout["logprobs"], rollout["ref_logprobs"], mask, cfg.kl_estimator)
    rewards = token_rewards(kl, scores, mask, kl_coef, cut=cut, cut_penalty=cfg.cut_penalty)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, rollout["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    seq_kl = jnp.sum(kl, axis=-1)  # [B]
    metrics = {
        "score_mean": jnp.mean(scores), "score_std": jnp.std(scores),
        "kl_ref": jnp.mean(seq_kl), "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "non_score_reward": jnp.mean(jnp.sum(-kl_coef * kl, axis=-1)),
        "response_length": jnp.mean(jnp.sum(mask, axis=-1)),
        "explained_variance": explained_variance(rollout["values"], returns, mask),
        "return_mean": masked_mean(returns, mask),
    }
    if cut is not None:
        metrics["cut_frac"] = jnp.mean(cut.astype(jnp.float32))
    return dict(rollout, kl=kl, rewards=rewards, advantages=advantages, returns=returns), metrics


def ppo_minibatch_loss(policy_params, value_params, batch: dict, cfg: PPOConfig, *, policy_model: ModelConfig,
                       value_model: ModelConfig) -> tuple[jax.Array, dict]:
    """pg_loss - entropy_coef * entropy + vf_coef * vf_loss on one minibatch (keys as compute_advantages').

    With a critic that shares the policy's backbone, the value loss also trains that backbone (vf_coef
    weighs it); the critic's own optimizer then steps only the head.
    """
    mask = batch["response_mask"].astype(jnp.float32)
    logprobs, logits, values = policy_and_values(policy_params, value_params, batch, policy_model=policy_model,
                                                 value_model=value_model, temperature=cfg.temperature)
    pg, pg_metrics = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, cfg.clip_eps)
    ent = entropy(logits, mask[:, 1:])
    vf, vf_metrics = value_loss(values, batch["values"], batch["returns"], mask, cfg.value_clip_eps)
    loss = pg - cfg.entropy_coef * ent + cfg.vf_coef * vf
    metrics = {"loss": loss, "pg_loss": pg, "vf_loss": vf, "entropy": ent, **pg_metrics, **vf_metrics,
               "weight": jnp.sum(mask)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# The PPO state and update.


@struct.dataclass
class PPOState:
    step: jax.Array  # int32 scalar: PPO iterations done
    policy_params: Any
    value_params: Any
    policy_opt_state: Any
    value_opt_state: Any
    kl: KLState
    rng: jax.Array  # raw key; iteration keys are fold_in(rng, step)


def create_state(policy_params, value_params, policy_optimizer: optax.GradientTransformation,
                 value_optimizer: optax.GradientTransformation, cfg: PPOConfig, seed: int) -> PPOState:
    """A fresh PPO state. The params are copied: the update donates the state, and the caller's arrays
    (often also the frozen reference, or a critic sharing the policy's backbone) must stay alive."""
    policy_params, value_params = jax.tree.map(jnp.copy, (policy_params, value_params))
    return PPOState(step=jnp.zeros((), jnp.int32), policy_params=policy_params, value_params=value_params,
                    policy_opt_state=policy_optimizer.init(policy_params),
                    value_opt_state=value_optimizer.init(value_params), kl=kl_init(cfg),
                    rng=jax.random.PRNGKey(seed))


def _shuffled_minibatches(rollout: dict, key: jax.Array, minibatch_size: int) -> dict:
    """Every [B, ...] leaf permuted along B and split into [B / minibatch_size, minibatch_size, ...]."""
    b = rollout["tokens"].shape[0]
    if b % minibatch_size:
        raise ConfigError(f"rollout batch of {b} rows is not a multiple of ppo.minibatch_size={minibatch_size}; "
                          "change one of them")
    perm = jax.random.permutation(key, b)
    return jax.tree.map(lambda x: x[perm].reshape(b // minibatch_size, minibatch_size, *x.shape[1:]), rollout)


def make_ppo_update(cfg: PPOConfig, *, policy_model: ModelConfig, value_model: ModelConfig,
                    policy_optimizer: optax.GradientTransformation, value_optimizer: optax.GradientTransformation,
                    donate: bool = True):
    """Jitted `ppo_update(state, rollout, key) -> (state, metrics)`.

    rollout: the dict from compute_advantages. Runs cfg.epochs passes over shuffled minibatches, each a step
    of both optimizers (separate Optax chains; clipping lives in them), then moves the KL controller with the
    rollout's mean per-sequence KL and counts one iteration. Metrics are means over all minibatch steps.
    """
    def loss_fn(params, batch, rng):
        del rng
        return ppo_minibatch_loss(*params, batch, cfg, policy_model=policy_model, value_model=value_model)

    keys = ("tokens", "positions", "segment_ids", "response_mask", "logprobs", "values", "advantages", "returns")

    def minibatch_step(carry, batch):
        pp, vp, po, vo = carry
        no_rng = jax.random.PRNGKey(0)  # the PPO loss draws no random numbers
        (pg, vg), metrics = weighted_grads(loss_fn, (pp, vp), batch, no_rng, cfg.accum_steps)
        p_updates, po = policy_optimizer.update(pg, po, pp)
        v_updates, vo = value_optimizer.update(vg, vo, vp)
        metrics = dict(metrics, policy_grad_norm=optax.tree.norm(pg), value_grad_norm=optax.tree.norm(vg))
        return (optax.apply_updates(pp, p_updates), optax.apply_updates(vp, v_updates), po, vo), metrics

    def ppo_update(state: PPOState, rollout: dict, key: jax.Array):
        data = {k: rollout[k] for k in keys}

        def epoch(carry, epoch_key):
            return jax.lax.scan(minibatch_step, carry, _shuffled_minibatches(data, epoch_key, cfg.minibatch_size))

        carry = (state.policy_params, state.value_params, state.policy_opt_state, state.value_opt_state)
        (pp, vp, po, vo), metrics = jax.lax.scan(epoch, carry, jax.random.split(key, cfg.epochs))
        metrics = jax.tree.map(jnp.mean, metrics)  # over [epochs, minibatches]
        observed_kl = jnp.mean(jnp.sum(rollout["kl"], axis=-1))
        kl = kl_update(state.kl, observed_kl, rollout["tokens"].shape[0], cfg)
        state = state.replace(step=state.step + 1, policy_params=pp, value_params=vp, policy_opt_state=po,
                              value_opt_state=vo, kl=kl)
        return state, dict(metrics, kl_coef_next=kl.kl_coef)

    return jax.jit(ppo_update, donate_argnums=(0,) if donate else ())
