"""The model-bound PPO pieces on a tiny transformer: alignment of log-probs and values, one PPO update."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import models
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.models import heads, transformer
from jaxllm.rl import ppo

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32,
                  dtype="float32")
B, T, PROMPT = 8, 16, 5


@functools.cache
def init_params():
    """(policy params, critic params) built once: NNX init is slow on a busy 2-core machine."""
    _, policy = models.init(CFG, 0)
    return policy, heads.from_backbone(policy, CFG, 1, std=0.5)


def synthetic_batch(seed: int = 0) -> dict:
    """Prompts of PROMPT tokens, responses of ragged length (one empty), right padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([0, 1, 3, T - PROMPT, 6, 2, 9, 4])
    seg = np.zeros((B, T), np.int32)
    resp = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        seg[i, : PROMPT + n] = 1
        resp[i, PROMPT: PROMPT + n] = 1
    tokens = tokens * seg
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return {k: jnp.asarray(v) for k, v in
            dict(tokens=tokens, positions=positions, segment_ids=seg, response_mask=resp).items()}


def test_policy_logprobs_are_next_token_logprobs():
    params, _ = init_params()
    batch = synthetic_batch()
    logp, logits = jax.jit(ppo.policy_logprobs, static_argnums=(1, 3))(params, CFG, batch, 0.7)
    full = np.asarray(transformer.logits(params, CFG, batch["tokens"], batch["positions"], batch["segment_ids"]),
                      np.float64) / 0.7
    full = full - full.max(-1, keepdims=True)
    log_softmax = full - np.log(np.exp(full).sum(-1, keepdims=True))
    tokens = np.asarray(batch["tokens"])
    want = np.zeros((B, T))
    for t in range(1, T):
        want[:, t] = log_softmax[np.arange(B), t - 1, tokens[:, t]]
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    assert logits.shape == (B, T - 1, CFG.vocab_size)


def test_critic_value_at_t_sees_only_tokens_before_t():
    _, value_params = init_params()
    batch = synthetic_batch()
    values = np.asarray(ppo.critic_values(value_params, CFG, batch))
    assert np.all(values[:, 0] == 0)
    for t in (3, 9):  # the head run on the prefix tokens[:, :t] alone, at its last position
        prefix = {k: v[:, :t] for k, v in batch.items()}
        alone = heads.scalars(value_params, CFG, prefix["tokens"], prefix["positions"], prefix["segment_ids"])
        live = np.asarray(batch["segment_ids"][:, t - 1]) > 0
        np.testing.assert_allclose(values[live, t], np.asarray(alone)[live, -1], rtol=1e-5, atol=1e-5)


UPDATE_CFG = ppo.PPOConfig(epochs=2, minibatch_size=4, kl_controller="adaptive", kl_coef=0.1, kl_target=0.001)


def rollout_and_state(cfg: ppo.PPOConfig, policy_lr: float = 1e-2, value_lr: float = 1e-3):
    policy, critic = init_params()
    batch = synthetic_batch()
    logp, _ = jax.jit(ppo.policy_logprobs, static_argnums=1)(policy, CFG, batch)
    ref_logp = logp + 0.05 * jax.random.normal(jax.random.PRNGKey(5), logp.shape)
    rollout = dict(batch, logprobs=logp, ref_logprobs=ref_logp,
                   values=jax.jit(ppo.critic_values, static_argnums=1)(critic, CFG, batch))
    scores = jax.random.normal(jax.random.PRNGKey(6), (B,))
    rollout, metrics = jax.jit(ppo.compute_advantages, static_argnums=3)(rollout, scores, cfg.kl_coef, cfg)
    opt_p = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(policy_lr))
    opt_v = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(value_lr))
    state = ppo.create_state(policy, critic, opt_p, opt_v, cfg, seed=0)
    update = ppo.make_ppo_update(cfg, policy_model=CFG, value_model=CFG, policy_optimizer=opt_p,
                                 value_optimizer=opt_v, donate=False)
    return rollout, metrics, state, update


@pytest.fixture(scope="module")
def setup():
    """One rollout, state and compiled update shared by the tests below (compiling is the slow part)."""
    return rollout_and_state(UPDATE_CFG)


def test_compute_advantages_whitens_over_the_responses(setup):
    rollout, metrics, _, _ = setup
    mask = np.asarray(rollout["response_mask"]) > 0
    adv = np.asarray(rollout["advantages"])
    np.testing.assert_allclose(adv[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(adv[mask].std(), 1.0, rtol=1e-4)
    assert np.all(adv[~mask] == 0)
    np.testing.assert_allclose(float(metrics["response_length"]), mask.sum() / B, rtol=1e-6)


@jax.jit
def _surrogate_and_vf(policy_params, value_params, rollout):
    """The unclipped surrogate -mean(A * ratio) and the squared value error, over response tokens."""
    mask = rollout["response_mask"]
    logp, _ = ppo.policy_logprobs(policy_params, CFG, rollout)
    ratio = jnp.exp(logp - rollout["logprobs"])
    values = ppo.critic_values(value_params, CFG, rollout)
    return (ppo.masked_mean(-rollout["advantages"] * ratio, mask),
            ppo.masked_mean(jnp.square(values - rollout["returns"]), mask))


def test_one_ppo_update_lowers_the_surrogate_and_value_loss(setup):
    rollout, _, state, update = setup
    before, vf_before = map(float, _surrogate_and_vf(state.policy_params, state.value_params, rollout))
    new, metrics = update(state, rollout, jax.random.PRNGKey(0))
    after, vf_after = map(float, _surrogate_and_vf(new.policy_params, new.value_params, rollout))
    assert after < before - 0.05, (before, after)
    assert vf_after < vf_before, (vf_before, vf_after)
    assert int(new.step) == 1
    assert float(new.kl.kl_coef) > 0.1  # observed KL far above the tiny target: beta grows
    for key in ("pg_loss", "vf_loss", "entropy", "clip_frac", "approx_kl", "policy_grad_norm"):
        assert np.isfinite(float(metrics[key])), key
    again, _ = update(state, rollout, jax.random.PRNGKey(0))  # same key, same result
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_minibatch_size_must_divide_the_rollout(setup):
    rollout, _, state, _ = setup
    opt = optax.sgd(1e-3)
    cfg = dataclasses.replace(UPDATE_CFG, minibatch_size=3)
    update = ppo.make_ppo_update(cfg, policy_model=CFG, value_model=CFG, policy_optimizer=opt,
                                 value_optimizer=opt, donate=False)
    with pytest.raises(ConfigError, match="ppo.minibatch_size=3"):
        update(state, rollout, jax.random.PRNGKey(0))


def test_value_head_on_the_policy_shares_its_backbone(setup):
    """A {"head"}-only critic reads the policy's hidden states, so the value loss has a gradient in the
    policy's params; a separate critic's value loss has none."""
    rollout, _, state, _ = setup
    shared = heads.on_policy(CFG, 2, std=0.5)
    hidden = transformer.hidden_states(state.policy_params, CFG, rollout["tokens"], rollout["positions"],
                                       rollout["segment_ids"])
    want = np.pad(np.asarray(heads.apply_head(shared["head"], hidden))[:, :-1], ((0, 0), (1, 0)))

    @jax.jit
    def value_loss_grad(pp, vp, batch):
        def vf(p):
            return ppo.ppo_minibatch_loss(p, vp, batch, UPDATE_CFG, policy_model=CFG, value_model=CFG)[1]["vf_loss"]
        values = ppo.policy_and_values(pp, vp, batch, policy_model=CFG, value_model=CFG)[2]
        return optax.tree.norm(jax.grad(vf)(pp)), values

    norm, values = value_loss_grad(state.policy_params, shared, rollout)
    np.testing.assert_allclose(np.asarray(values), want, rtol=1e-5, atol=1e-5)
    assert float(norm) > 1e-3
    norm, _ = value_loss_grad(state.policy_params, state.value_params, rollout)
    assert float(norm) == 0.0


@pytest.mark.slow
def test_gradient_accumulation_matches_whole_minibatches(setup):
    """accum_steps=2 weighs microbatches by response tokens: the same update as whole minibatches.

    SGD, not Adam: Adam's update for a near-zero gradient is +-lr whatever its size, which turns float32
    reassociation noise (the sums run in another order) into differences of order lr.
    """
    rollout, _, state, _ = setup
    sgd = optax.sgd(0.1)
    state = ppo.create_state(state.policy_params, state.value_params, sgd, sgd, UPDATE_CFG, seed=0)
    got = {}
    for accum in (1, 2):
        cfg = dataclasses.replace(UPDATE_CFG, accum_steps=accum)
        update = ppo.make_ppo_update(cfg, policy_model=CFG, value_model=CFG, policy_optimizer=sgd,
                                     value_optimizer=sgd, donate=False)
        got[accum] = update(state, rollout, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(got[2][0]), jax.tree.leaves(got[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for k in ("pg_loss", "vf_loss", "entropy", "clip_frac", "approx_kl"):
        np.testing.assert_allclose(float(got[2][1][k]), float(got[1][1][k]), rtol=1e-5, atol=1e-6, err_msg=k)
