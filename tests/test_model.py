"""Model invariants and a float64 NumPy oracle for the loss and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib, losses, models
from jaxllm.models import rope, transformer
from tests.conftest import TINY_MODEL


def model_cfg(**kw):
    return config_lib.replace(config_lib.Config(), **{**TINY_MODEL, **{f"model.{k}": v for k, v in kw.items()}}).model


def batch_of(tokens, segment_ids=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    # positions restart at each segment
    pos = np.zeros((b, t), np.int32)
    for i in range(b):
        for j in range(1, t):
            pos[i, j] = 0 if seg[i, j] != seg[i, j - 1] else pos[i, j - 1] + 1
    return {"tokens": tokens, "positions": jnp.asarray(pos), "segment_ids": seg}


forward = jax.jit(transformer.logits, static_argnums=1)


def test_causality():
    cfg = model_cfg()
    _, params = models.init(cfg, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 16))
    changed = tokens.copy()
    changed[:, 9:] = rng.integers(0, cfg.vocab_size, (2, 7))
    a, b = batch_of(tokens), batch_of(changed)
    la = forward(params, cfg, a["tokens"], a["positions"], a["segment_ids"])
    lb = forward(params, cfg, b["tokens"], b["positions"], b["segment_ids"])
    np.testing.assert_array_equal(np.asarray(la[:, :9]), np.asarray(lb[:, :9]))
    assert not np.allclose(la[:, 9:], lb[:, 9:])


def test_segment_isolation():
    cfg = model_cfg()
    _, params = models.init(cfg, 1)
    rng = np.random.default_rng(1)
    seg = [[1] * 6 + [2] * 6 + [3] * 4]
    tokens = rng.integers(0, cfg.vocab_size, (1, 16))
    changed = tokens.copy()
    changed[0, 6:12] = rng.integers(0, cfg.vocab_size, 6)  # document B only
    a, b = batch_of(tokens, seg), batch_of(changed, seg)
    la = forward(params, cfg, a["tokens"], a["positions"], a["segment_ids"])
    lb = forward(params, cfg, b["tokens"], b["positions"], b["segment_ids"])
    np.testing.assert_array_equal(np.asarray(la[0, :6]), np.asarray(lb[0, :6]))  # A before B
    np.testing.assert_array_equal(np.asarray(la[0, 12:]), np.asarray(lb[0, 12:]))  # C after B
    # a packed document equals the same document alone in its own row
    alone = batch_of(tokens[:, 12:])
    l_alone = forward(params, cfg, alone["tokens"], alone["positions"], alone["segment_ids"])
    np.testing.assert_allclose(np.asarray(la[0, 12:]), np.asarray(l_alone[0]), rtol=1e-5, atol=1e-5)


def test_gqa_with_repeated_kv_equals_multi_head():
    gqa = model_cfg(n_heads=4, n_kv_heads=2)
    mha = model_cfg(n_heads=4, n_kv_heads=4)
    _, p = models.init(gqa, 2)
    p_mha = jax.tree.map(lambda x: x, p)
    for name in ("wk", "wv"):
        p_mha["layers"][name] = jnp.repeat(p["layers"][name], 2, axis=2)  # [L, D, K, hd] -> [L, D, H, hd]
    b = batch_of(np.random.default_rng(2).integers(0, 512, (2, 12)))
    out_gqa = forward(p, gqa, b["tokens"], b["positions"], b["segment_ids"])
    out_mha = forward(p_mha, mha, b["tokens"], b["positions"], b["segment_ids"])
    np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 4])  # MQA and MHA run too
def test_mqa_and_mha_run(n_kv_heads):
    cfg = model_cfg(n_heads=4, n_kv_heads=n_kv_heads)
    _, p = models.init(cfg, 0)
    b = batch_of(np.zeros((1, 8), np.int32) + 3)
    assert forward(p, cfg, b["tokens"], b["positions"], b["segment_ids"]).shape == (1, 8, 512)


def test_rope_scores_depend_only_on_offset():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        qm = rope.rope(q, jnp.array([[m]]), 10000.0)
        kn = rope.rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    for m, n, shift in [(5, 2, 17), (0, 0, 100), (9, 30, 3)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-5, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# float64 NumPy oracle of a 1-layer model


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None], np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def np_loss(p, cfg, tokens, pos, seg):
    L = {k: v[0] for k, v in p["layers"].items()}
    x = p["embed"][tokens]
    h = np_rms(x, L["attn_norm"], cfg.norm_eps)
    q = np_rope(np.einsum("btd,dnh->btnh", h, L["wq"]), pos, cfg.rope_theta)
    k = np_rope(np.einsum("btd,dnh->btnh", h, L["wk"]), pos, cfg.rope_theta)
    v = np.einsum("btd,dnh->btnh", h, L["wv"])
    b, t, nh, hd = q.shape
    group = nh // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for head in range(nh):
            for i in range(t):
                allowed = [j for j in range(t) if j <= i and seg[bi, j] == seg[bi, i] and seg[bi, i] != 0]
                if not allowed:  # padding attends to nothing: zeros
                    continue
                s = np.array([q[bi, i, head] @ k[bi, j, head // group] / np.sqrt(hd) for j in allowed])
                w = np.exp(s - s.max())
                w /= w.sum()
                out[bi, i, head] = sum(wj * v[bi, j, head // group] for wj, j in zip(w, allowed))
    x = x + np.einsum("btnh,nhd->btd", out, L["wo"])
    h = np_rms(x, L["mlp_norm"], cfg.norm_eps)
    g, u = h @ L["w_gate"], h @ L["w_up"]
    x = x + (g / (1 + np.exp(-g)) * u) @ L["w_down"]
    logits = np_rms(x, p["final_norm"], cfg.norm_eps) @ p["embed"].T
    total, count = 0.0, 0
    for bi in range(b):
        for i in range(t - 1):
            if seg[bi, i + 1] == seg[bi, i] and seg[bi, i + 1] != 0:
                row = logits[bi, i]
                lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
                total += lse - row[tokens[bi, i + 1]]
                count += 1
    return total / count


def test_loss_and_gradients_match_float64_numpy():
    cfg = model_cfg(n_layers=1, vocab_size=64, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24)
    _, params = models.init(cfg, 4)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(9), x.shape), params)
    rng = np.random.default_rng(4)
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 1, [1] * 10])
    b = batch_of(rng.integers(0, 64, (2, 10)), seg)

    def loss(p):
        logits = transformer.logits(p, cfg, b["tokens"], b["positions"], b["segment_ids"])
        return losses.next_token(logits, b)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    args = (np.asarray(b["tokens"]), np.asarray(b["positions"], np.float64), np.asarray(b["segment_ids"]))
    assert float(value) == pytest.approx(np_loss(p64, cfg, *args), rel=1e-5)
    # gradients vs central differences of the float64 oracle, on random coordinates of every weight
    flat = jax.tree_util.tree_flatten_with_path(p64)[0]
    gflat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    for path, leaf in flat:
        for _ in range(2):
            idx = tuple(rng.integers(0, s) for s in leaf.shape)
            eps = 1e-5
            plus, minus = leaf.copy(), leaf.copy()
            plus[idx] += eps
            minus[idx] -= eps

            def at(arr):
                leaves = [arr if q is path else v for q, v in flat]
                return np_loss(jax.tree_util.tree_unflatten(jax.tree.structure(p64), leaves), cfg, *args)

            numeric = (at(plus) - at(minus)) / (2 * eps)
            got = float(np.asarray(gflat[path])[idx])
            assert got == pytest.approx(numeric, rel=2e-3, abs=2e-6), jax.tree_util.keystr(path)
