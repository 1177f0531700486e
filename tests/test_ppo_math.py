"""PPO math against independent oracles: float64 NumPy loops and hand-worked numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config
from jaxllm.config import ConfigError
from jaxllm.rl import ppo

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 against float64 oracles


def ragged_mask(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """One contiguous response span per row after a random-length prompt; row 0 empty, row 1 ends at T-1."""
    mask = np.zeros((b, t), np.float32)
    for i in range(1, b):
        start = int(rng.integers(1, t // 2))
        end = t if i == 1 else int(rng.integers(start + 1, t + 1))
        mask[i, start:end] = 1
    return mask


# ---------------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(estimator):
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(-2, 1, (4, 12)), rng.normal(-2, 1, (4, 12))
    mask = ragged_mask(rng, 4, 12)
    d = logp - ref
    expected = {"k1": d, "k2": 0.5 * d ** 2, "k3": (np.exp(-d) - 1) - (-d)}[estimator] * mask
    got = ppo.kl_per_token(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(mask),
                           estimator)
    np.testing.assert_allclose(np.asarray(got), expected, **TOL)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        ppo.kl_per_token(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), "k4")


def test_token_rewards_and_cut_penalty():
    rng = np.random.default_rng(1)
    b, t, beta, penalty = 5, 10, 0.1, 2.0
    mask = ragged_mask(rng, b, t)
    kl = rng.normal(0, 1, (b, t)) * mask
    scores = rng.normal(0, 1, b)
    tokens = rng.integers(3, 50, (b, t))
    eos = 2
    tokens[2, np.nonzero(mask[2])[0][-1]] = eos  # row 2 ends with EOS; rows 1, 3, 4 are cut; row 0 empty
    cut = ppo.cut_without_eos(jnp.asarray(tokens), jnp.asarray(mask), eos)
    assert np.asarray(cut).tolist() == [False, True, False, True, True]
    expected = -beta * kl
    for i in range(b):
        idx = np.nonzero(mask[i])[0]
        if len(idx):
            expected[i, idx[-1]] += scores[i] - (penalty if i != 2 else 0.0)
    got = ppo.token_rewards(jnp.asarray(kl, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.asarray(mask),
                            beta, cut=cut, cut_penalty=penalty)
    np.testing.assert_allclose(np.asarray(got), expected, **TOL)


# ---------------------------------------------------------------------------------------------------------
# GAE against a plain loop


def gae_loop(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = np.nonzero(mask[i])[0]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = values[i, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_python_loop(seed):
    rng = np.random.default_rng(seed)
    b, t = 6, 24
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    mask = ragged_mask(rng, b, t)
    rewards, values = rng.normal(0, 1, (b, t)), rng.normal(0, 1, (b, t))  # junk off the mask must not matter
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    adv, ret = jax.jit(ppo.gae)(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                                jnp.asarray(mask), gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, **TOL)
    np.testing.assert_allclose(np.asarray(ret), want_ret, **TOL)


# ---------------------------------------------------------------------------------------------------------
# Whitening, explained variance, entropy


def test_whiten_and_explained_variance():
    rng = np.random.default_rng(3)
    mask = ragged_mask(rng, 5, 16)
    x, y = rng.normal(3, 2, (5, 16)), rng.normal(0, 1, (5, 16))
    sel = mask > 0
    want = np.where(sel, (x - x[sel].mean()) / np.sqrt(x[sel].var() + 1e-8), 0.0)
    got = ppo.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
    got_keep = ppo.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean=False)
    np.testing.assert_allclose(np.asarray(got_keep), np.where(sel, want + x[sel].mean(), 0.0), **TOL)
    ev = ppo.explained_variance(jnp.asarray(y, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(ev), 1 - (x - y)[sel].var() / x[sel].var(), **TOL)


def test_entropy_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (3, 7, 11))
    mask = ragged_mask(rng, 3, 7)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = -(p * np.log(p)).sum(-1)
    got = ppo.entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), h[mask > 0].mean(), **TOL)


# ---------------------------------------------------------------------------------------------------------
# Clipped losses: every branch on hand-worked numbers (eps = 0.2)


def test_policy_loss_every_clip_branch():
    adv = np.array([[2.0, 2.0, -1.0, -1.0, 1.0, 5.0]])
    ratio = np.array([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)  # the last token is padding
    # A>0, r>1+eps: clipped -2*1.2; A>0, r<1-eps: unclipped -2*0.5; A<0, r<1-eps: clipped 1*0.8;
    # A<0, r>1+eps: unclipped 1*1.5; inside the range: -1*1.1.
    per_token = [-2.4, -1.0, 0.8, 1.5, -1.1]
    old = np.full_like(ratio, -1.0)
    new = old + np.log(ratio)
    loss, m = ppo.policy_loss(jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32),
                              jnp.asarray(adv, jnp.float32), jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(float(loss), np.mean(per_token), **TOL)
    np.testing.assert_allclose(float(m["clip_frac"]), 2 / 5, **TOL)
    r = ratio[0, :5]
    np.testing.assert_allclose(float(m["approx_kl"]), np.mean((1 / r - 1) + np.log(r)), **TOL)
    np.testing.assert_allclose(float(m["ratio"]), np.mean(r), **TOL)


def test_value_loss_every_clip_branch():
    old = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 9.0]])
    new = np.array([[2.0, 2.0, 0.0, 0.0, 1.1, 9.0]])
    ret = np.array([[3.0, 0.0, -1.0, 2.0, 1.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    # eps = 0.2; clipped V: 1.2, 1.2, 0.8, 0.8, 1.1.
    # unclipped sq vs clipped sq: (1, 3.24) -> 3.24 clipped; (4, 1.44) -> 4; (1, 3.24) -> 3.24 clipped;
    # (4, 1.44) -> 4; (0.01, 0.01) -> 0.01 (equal: not counted as clipped)
    want = 0.5 * np.mean([3.24, 4.0, 3.24, 4.0, 0.01])
    loss, m = ppo.value_loss(jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32),
                             jnp.asarray(ret, jnp.float32), jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(m["vf_clip_frac"]), 2 / 5, **TOL)


# ---------------------------------------------------------------------------------------------------------
# KL controller and config


def test_adaptive_kl_controller_follows_rule():
    cfg = ppo.PPOConfig(kl_controller="adaptive", kl_coef=0.2, kl_target=6.0, kl_horizon=10000.0)
    update = jax.jit(ppo.kl_update, static_argnames="cfg")
    beta = 0.2
    state = ppo.kl_init(cfg)
    for observed, n in [(6.6, 64), (30.0, 64), (0.0, 128), (5.0, 32)]:  # inside, clipped high, clipped low
        err = np.clip(observed / 6.0 - 1.0, -0.2, 0.2)
        beta = beta * (1 + err * n / 10000.0)
        state = update(state, observed, n, cfg=cfg)
        np.testing.assert_allclose(float(state.kl_coef), beta, rtol=1e-6)
    fixed = ppo.PPOConfig(kl_controller="fixed", kl_coef=0.3)
    np.testing.assert_allclose(float(ppo.kl_update(ppo.kl_init(fixed), 100.0, 64, fixed).kl_coef), 0.3, rtol=1e-7)


@pytest.mark.parametrize("key,value", [("gamma", 1.5), ("kl_estimator", "k9"), ("kl_controller", "pid"),
                                       ("clip_eps", 0.0), ("minibatch_size", 0), ("cut_penalty", -1.0),
                                       ("accum_steps", 3)])
def test_validate_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"ppo.{key}="):
        ppo.validate(dataclasses.replace(ppo.PPOConfig(), **{key: value}))
    assert ppo.validate(ppo.PPOConfig()) == ppo.PPOConfig()


def test_ppo_config_loads_through_the_config_loader(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("kl_controller: adaptive\nkl_target: 3\nepochs: 2\n")
    cfg = config.load(path, ["clip_eps=0.1"], cls=ppo.PPOConfig, validator=lambda c: ppo.validate(c, prefix=""))
    assert (cfg.kl_controller, cfg.kl_target, cfg.epochs, cfg.clip_eps) == ("adaptive", 3.0, 2, 0.1)
    with pytest.raises(ConfigError, match="did you mean kl_coef"):
        config.load(path, ["kl_cof=0.1"], cls=ppo.PPOConfig)
    with pytest.raises(ConfigError, match="kl_estimator='k9'"):
        config.load(path, ["kl_estimator=k9"], cls=ppo.PPOConfig, validator=lambda c: ppo.validate(c, prefix=""))
