"""KV-cache generation against independent oracles: the full forward pass (no cache), `simple_generate`, and a
float64 NumPy top-k / top-p filter. Tolerances are fixed: float32 compute, so cache vs full forward differ only
by summation order."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib, models
from jaxllm.config import ConfigError
from jaxllm.data.pipeline import DataError
from jaxllm.generate import kv_cache, sampling
from jaxllm.generate.sampling import SamplingConfig
from jaxllm.models import transformer

LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)
BF16_LOGIT_TOL = dict(rtol=2e-2, atol=5e-2)  # bf16 keeps 8 mantissa bits: a rounding flip moves a logit ~1e-2
MODEL = {"model.vocab_size": 256, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
         "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_seq_len": 64, "model.dtype": "float32",
         "model.init_std": 0.2}  # large enough init that attention and logits are far from uniform
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 33, 44], [200], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model():
    cfg = config_lib.replace(config_lib.Config(), **MODEL).model
    graphdef, params = models.init(cfg, 0)
    return cfg, graphdef, params


_full_logits = jax.jit(transformer.logits, static_argnums=1)
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)  # shared, so tests reuse one compilation


def full_logits(params, cfg, seq: list[int]) -> np.ndarray:
    """Oracle: logits [L, V] of one sequence through the training forward pass (no cache).

    Right-padded to one width (segment id 0) so every call reuses one compilation; causal attention keeps
    the padding from touching the real positions.
    """
    width = cfg.max_seq_len
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(seq)] = seq
    segment_ids = (np.arange(width) < len(seq)).astype(np.int32)[None]
    positions = np.arange(width, dtype=np.int32)[None]
    out = _full_logits(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
    return np.asarray(out[0, : len(seq)], np.float64)


@pytest.mark.parametrize("dtype,tol", [("float32", LOGIT_TOL), ("bfloat16", BF16_LOGIT_TOL)])
def test_cache_decoding_matches_full_forward(model, dtype, tol):
    cfg, _, params = model
    cfg = dataclasses.replace(cfg, dtype=dtype)
    steps = 6
    sc = SamplingConfig(max_new_tokens=steps)
    tokens, lengths = sampling.pad_prompts(PROMPTS, cfg, sc)
    b, p = tokens.shape
    continuation = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, steps)).astype(np.int32)
    pad = p - lengths
    kv_positions = jnp.asarray(np.maximum(np.arange(p + steps)[None] - pad[:, None], 0), jnp.int32)
    kv_segment_ids = jnp.asarray(np.arange(p + steps)[None] >= pad[:, None], jnp.int32)
    top, layers = kv_cache.prepare_params(params, cfg)
    prefill = jax.jit(sampling._prefill, static_argnums=(2, 6))
    forward = jax.jit(kv_cache.forward, static_argnums=2)
    logits, cache = prefill(top, layers, cfg, jnp.asarray(tokens), kv_positions, kv_segment_ids, p + steps)
    # The prefill runs causal self-attention over the prompt (fresh=True); attending over the whole cache with
    # positions and segment ids instead gives the same logits.
    hidden, _ = forward(top, layers, cfg, jnp.asarray(tokens), kv_positions[:, :p],
                        kv_cache.init_cache(cfg, b, p + steps), jnp.int32(0), kv_positions, kv_segment_ids)
    np.testing.assert_allclose(np.asarray(kv_cache.last_logits(top, cfg, hidden)), np.asarray(logits), **tol)
    got = [logits]
    for t in range(steps - 1):
        hidden, cache = forward(top, layers, cfg, jnp.asarray(continuation[:, t:t + 1]),
                                         jnp.asarray(lengths + t)[:, None], cache, p + t, kv_positions, kv_segment_ids)
        got.append(kv_cache.last_logits(top, cfg, hidden))
    got = np.stack([np.asarray(x) for x in got], axis=1)  # [B, steps, V]
    for i, prompt in enumerate(PROMPTS):
        want = full_logits(params, cfg, prompt + list(continuation[i, : steps - 1]))[len(prompt) - 1:]
        np.testing.assert_allclose(got[i], want, **tol)


def test_greedy_equals_uncached_oracle_and_is_deterministic(model):
    cfg, graphdef, params = model
    sc = GREEDY
    tokens, logprobs, mask = sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), sc)
    again = sampling.generate(graphdef, params, PROMPTS, jax.random.key(123), sc)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(again[0]))
    assert np.asarray(mask).all()
    for i, prompt in enumerate(PROMPTS):
        oracle = sampling.simple_generate(params, cfg, prompt, jax.random.key(0), max_new_tokens=8, temperature=0.0)
        assert list(np.asarray(tokens[i])) == oracle
        want = np_log_softmax(full_logits(params, cfg, prompt + oracle)[len(prompt) - 1:-1])
        np.testing.assert_allclose(np.asarray(logprobs[i]), want[np.arange(8), oracle], **LOGIT_TOL)


def test_mixed_length_batch_gives_same_greedy_continuation_as_alone(model):
    _, graphdef, params = model
    sc = GREEDY
    batch = sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), sc)
    for i, prompt in enumerate(PROMPTS):
        alone = sampling.generate(graphdef, params, [prompt], jax.random.key(0), sc)
        np.testing.assert_array_equal(np.asarray(batch[0][i]), np.asarray(alone[0][0]))
        np.testing.assert_allclose(np.asarray(batch[1][i]), np.asarray(alone[1][0]), **LOGIT_TOL)


def test_same_key_same_samples_different_keys_differ(model):
    _, graphdef, params = model
    sc = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a = sampling.generate(graphdef, params, PROMPTS, jax.random.key(1), sc)[0]
    b = sampling.generate(graphdef, params, PROMPTS, jax.random.key(1), sc)[0]
    c = sampling.generate(graphdef, params, PROMPTS, jax.random.key(2), sc)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()


def test_prepared_params_sample_the_same_as_params(model):
    """Params prepared once (`sampling.prepare`, as the CLI does for all its batches) give the same tokens and
    log-probs as params prepared inside each call."""
    cfg, graphdef, params = model
    sc = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    prepared = sampling.prepare(params, cfg)
    assert isinstance(prepared, kv_cache.Prepared) and "wqkv" in prepared.layers[0]
    want = sampling.generate(graphdef, params, PROMPTS, jax.random.key(1), sc)
    got = sampling.generate(graphdef, params, PROMPTS, jax.random.key(1), sc, prepared=prepared)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6, atol=1e-6)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_allowed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Float64 oracle: boolean [B, V] of the tokens top-k then top-p keep, by a plain loop."""
    out = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits / temperature):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        kept, mass = [], 0.0
        for idx, prob in zip(order, probs):
            if kept and mass >= top_p:
                break
            kept.append(idx)
            mass += prob
        out[b, kept] = True
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 12, 0.8), (1.0, 0, 0.05)])
def test_top_k_top_p_never_sample_outside_allowed_set(temperature, top_k, top_p):
    logits = np.random.default_rng(7).normal(0.0, 2.0, (3, 50)).astype(np.float32)
    allowed = np_allowed(logits.astype(np.float64), temperature, top_k, top_p)
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(filtered), allowed)
    sc = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, logprobs="sampler")
    keys = jax.random.split(jax.random.key(0), 2000)
    tokens, logprobs = jax.vmap(lambda k: sampling.sample_logits(k, jnp.asarray(logits), sc))(keys)  # [N, 3]
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    for b in range(3):
        assert allowed[b, tokens[:, b]].all()
        renormed = np_log_softmax(np.where(allowed[b], logits[b].astype(np.float64) / temperature, -np.inf))
        np.testing.assert_allclose(logprobs[:, b], renormed[tokens[:, b]], rtol=1e-5, atol=1e-5)


def test_sampled_policy_logprobs_match_full_forward(model):
    """End to end with temperature, top-k and top-p: the tokens the loop records and their log-probs line up."""
    cfg, graphdef, params = model
    sc = SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=20, top_p=0.9)
    tokens, logprobs, mask = (np.asarray(x) for x in sampling.generate(graphdef, params, PROMPTS,
                                                                      jax.random.key(5), sc))
    assert mask.all()
    for i, prompt in enumerate(PROMPTS):
        logits = full_logits(params, cfg, prompt + list(tokens[i]))[len(prompt) - 1:-1]  # [N, V]
        assert np_allowed(logits, 0.7, 20, 0.9)[np.arange(4), tokens[i]].all()
        np.testing.assert_allclose(logprobs[i], np_log_softmax(logits)[np.arange(4), tokens[i]], **LOGIT_TOL)


def test_as_batch_scores_rollouts_like_generate(model):
    """The rollout batch through the training forward gives back generate's policy log-probs (PPO's old_logprobs)."""
    cfg, graphdef, params = model
    sc = SamplingConfig(max_new_tokens=8, temperature=1.0, stop_tokens=(196, 118))  # rows 0 and 1 stop early
    prompt_tokens, lengths = sampling.pad_prompts(PROMPTS, cfg, sc)
    tokens, logprobs, mask = sampling.generate(graphdef, params, (prompt_tokens, lengths), jax.random.key(3), sc)
    assert 0 < int(np.asarray(mask).sum()) < mask.size  # the stop path is exercised
    batch = sampling.as_batch(jnp.asarray(prompt_tokens), jnp.asarray(lengths), tokens, mask)
    logits = _full_logits(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    scored = np.asarray(jax.nn.log_softmax(logits[:, :-1], -1), np.float64)  # [B, P + N - 1, V]
    targets = np.asarray(batch["tokens"][:, 1:])
    scored = np.take_along_axis(scored, targets[..., None], -1)[..., 0] * np.asarray(batch["loss_mask"][:, 1:])
    p = prompt_tokens.shape[1]
    np.testing.assert_allclose(scored[:, p - 1:], np.asarray(logprobs), **LOGIT_TOL)
    assert int(np.asarray(batch["loss_mask"]).sum()) == int(np.asarray(mask).sum())
    for i in range(len(PROMPTS)):  # positions restart at each row's first real token
        real = np.asarray(batch["segment_ids"][i]) == 1
        np.testing.assert_array_equal(np.asarray(batch["positions"][i])[real], np.arange(real.sum()))


@pytest.mark.parametrize("mode", sampling.LOGPROBS)
@pytest.mark.parametrize("kernel", [False, True])
def test_logprob_policies_on_fixed_logits(mode, kernel):
    """Each log-prob mode against the float64 oracle, through XLA's top-k and the Pallas top-k kernel
    (interpret mode), which must also draw the same tokens with the same keys."""
    logits = np.random.default_rng(3).normal(0.0, 2.0, (2, 40)).astype(np.float32)
    sc = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, logprobs=mode)
    keys = jax.random.split(jax.random.key(0), 64)
    draw = lambda k, kernel: sampling.sample_logits(k, jnp.asarray(logits), sc, kernel)  # noqa: E731
    tokens, logprobs = jax.vmap(lambda k: draw(k, kernel))(keys)  # [N, 2]
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jax.vmap(lambda k: draw(k, False))(keys)[0]))
    x = logits.astype(np.float64)
    want = {"policy": np_log_softmax(x), "tempered": np_log_softmax(x / 0.7),
            "sampler": np_log_softmax(np.where(np_allowed(x, 0.7, 20, 0.9), x / 0.7, -np.inf))}[mode]
    for b in range(2):
        np.testing.assert_allclose(np.asarray(logprobs[:, b]), want[b, np.asarray(tokens[:, b])], rtol=1e-5, atol=1e-5)
    greedy = sampling.sample_logits(None, jnp.asarray(logits), SamplingConfig(temperature=0.0, logprobs=mode))
    want_greedy = np.zeros(2) if mode == "sampler" else np_log_softmax(x)[np.arange(2), x.argmax(-1)]
    np.testing.assert_array_equal(np.asarray(greedy[0]), x.argmax(-1))
    np.testing.assert_allclose(np.asarray(greedy[1]), want_greedy, rtol=1e-5, atol=1e-5)


def test_stop_token_ends_row_and_is_kept(model):
    _, graphdef, params = model
    free = np.asarray(sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), GREEDY)[0])
    stop = int(free[1, 3])
    tokens, logprobs, mask = (np.asarray(x) for x in sampling.generate(
        graphdef, params, PROMPTS, jax.random.key(0), SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                                     stop_tokens=(stop,), pad_id=0)))
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(free[i] == stop)
        n = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(mask[i], np.arange(8) < n)
        np.testing.assert_array_equal(tokens[i, :n], free[i, :n])
        assert (tokens[i, n:] == 0).all() and (logprobs[i, n:] == 0).all()


@pytest.mark.parametrize("v,k,chunk", [(32000, 50, 0), (1000, 7, 8), (4096, 3, 16), (512, 50, 0)])
def test_top_k_equals_a_full_sort(v, k, chunk):
    """The narrowed top-k (chunk maxima first) against NumPy's full sort: random rows, rows full of ties, and
    rows half -inf (what top-k after a mask looks like); the columns returned hold those values, once each."""
    rng = np.random.default_rng(v + k)
    x = rng.normal(size=(3, 4, v)).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2  # many ties at every value
    x[2, :, : v // 2] = -np.inf
    for rows in x:
        values, columns = (np.asarray(a) for a in sampling.top_k_columns(jnp.asarray(rows), k, chunk))
        np.testing.assert_array_equal(values, -np.sort(-rows, axis=-1)[:, :k])
        np.testing.assert_array_equal(np.take_along_axis(rows, columns, axis=-1), values)
        assert all(len(set(row)) == k for row in columns.tolist())


def test_candidate_noise_follows_the_token_not_its_rank():
    """The Gumbel noise of a top-k candidate is drawn per (step, row, token id): reordering the candidates (as
    tiny logit differences between kernels do) reorders the noise with them, so the same token wins."""
    key = jax.random.key(4)
    columns = jnp.array([[5, 9, 2, 31], [7, 1, 0, 3]], jnp.int32)
    order = jnp.array([[2, 0, 3, 1], [3, 2, 1, 0]])
    noise = np.asarray(sampling.token_gumbel(key, columns))
    shuffled = np.asarray(sampling.token_gumbel(key, jnp.take_along_axis(columns, order, axis=1)))
    np.testing.assert_array_equal(shuffled, np.take_along_axis(noise, np.asarray(order), axis=1))
    assert len(np.unique(noise)) == noise.size  # distinct draws per token and per row
    later = np.asarray(sampling.token_gumbel(key, columns, 1))  # another decode step: fresh noise
    assert len(np.unique(np.concatenate([noise, later]))) == 2 * noise.size


def test_top_k_draws_follow_the_renormalised_distribution():
    """The Gumbel-max draw among the top-k candidates samples softmax(logits / T) restricted to the k largest
    (float64 oracle): 20,000 rows of the same logits, each with its own noise. A frequency is off by more than
    0.015 (over 4 standard deviations at this count) only if the noise is biased."""
    logits = np.array([2.0, 0.5, 1.5, -1.0, 1.0, 0.0, 3.0, -2.0], np.float32)
    sc = SamplingConfig(temperature=0.8, top_k=4)
    rows = 20_000
    tokens, _ = jax.jit(lambda k, x: sampling.sample_logits(k, x, sc))(
        jax.random.key(11), jnp.asarray(np.broadcast_to(logits, (rows, logits.size))))
    x = logits.astype(np.float64) / 0.8
    x[np.argsort(-x)[4:]] = -np.inf
    want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    freq = np.bincount(np.asarray(tokens), minlength=logits.size) / rows
    assert np.abs(freq - want).max() < 0.015, (freq, want)


def test_decode_kernel_rollouts_match_the_xla_path(model):
    """attention_impl=pallas sends each decode step to the Pallas decode kernels (interpret mode here) and
    top-k sampling to the Pallas top-k kernel; the reference stays xla. Same tokens, log-probs within the
    float32 tolerance; also with a mixed-length batch whose cache length (prompt + new) is not a multiple of
    the kernel's key block."""
    cfg, graphdef, params = model
    pallas_graphdef = models.abstract(dataclasses.replace(cfg, attention_impl="pallas"))[0]
    for sc in (GREEDY, SamplingConfig(max_new_tokens=5, temperature=0.0, prompt_bucket=1),
               SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=5)):  # top-k through the Pallas kernel
        assert sampling.top_k_kernel_takes(dataclasses.replace(cfg, attention_impl="pallas"), sc) == (sc.top_k > 0)
        want = sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), sc)
        got = sampling.generate(pallas_graphdef, params, PROMPTS, jax.random.key(0), sc)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), **LOGIT_TOL)


def test_bad_prompts_and_config_raise_one_line_errors(model):
    cfg, graphdef, params = model
    key, sc = jax.random.key(0), SamplingConfig(max_new_tokens=8)
    with pytest.raises(DataError, match="prompt 1 is empty"):
        sampling.generate(graphdef, params, [[1, 2], []], key, sc)
    with pytest.raises(DataError, match="no prompts"):
        sampling.generate(graphdef, params, [], key, sc)
    with pytest.raises(DataError, match="prompt 0 has 60 tokens.*<= 56"):
        sampling.generate(graphdef, params, [[1] * 60], key, sc)
    with pytest.raises(DataError, match="prompt 1 has length 0"):
        sampling.generate(graphdef, params, (np.ones((2, 4), np.int32), np.array([4, 0])), key, sc)
    with pytest.raises(DataError, match="exceeds model.max_seq_len"):
        sampling.generate(graphdef, params, (np.ones((2, 60), np.int32), np.array([4, 3])), key, sc)
    for field, value in [("top_p", 0.0), ("top_k", -1), ("temperature", -1.0), ("logprobs", "raw"),
                         ("max_new_tokens", 64), ("stop_tokens", (999,))]:
        with pytest.raises(ConfigError, match=field):
            sampling.generate(graphdef, params, [[1]], key, SamplingConfig(**{"max_new_tokens": 8, field: value}))


MESH_SCRIPT = textwrap.dedent(r"""
    import dataclasses, re
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from jaxllm import config as config_lib, models
    from jaxllm.parallel import rules
    from jaxllm.generate import sampling
    from tests.test_sampling import MODEL, PROMPTS
    cfg = config_lib.replace(config_lib.Config(), **MODEL).model
    graphdef, params = models.init(cfg, 0)
    sc = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    want = sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), sc)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda x, axes: jax.device_put(x, NamedSharding(mesh, rules.spec(axes))),
                               params, models.logical_axes(cfg))
        got = sampling.generate(graphdef, sharded, PROMPTS, jax.random.key(0), sc)
        tokens, lengths = sampling.pad_prompts(PROMPTS, cfg, sc)
        jitted = sampling.generate_jit(jax.default_backend())
        hlo = jitted.lower(sharded, cfg, tokens, lengths, jax.random.key(0), sc).compile().as_text()
        # The Pallas decode kernel (interpret mode) runs on each device's shard of batch and heads.
        pallas_graphdef = models.abstract(dataclasses.replace(cfg, attention_impl="pallas"))[0]
        got_pallas = sampling.generate(pallas_graphdef, sharded, PROMPTS, jax.random.key(0), sc)
    # The cache [B=4, S=16+8 -> 32, K=2, D=8] exists only as per-device shards: batch over data*fsdp, KV heads
    # over tensor.
    assert set(re.findall(r"f32\[\d+,32,\d+,8\]", hlo)) == {"f32[1,32,1,8]"}, re.findall(r"f32\[\d+,32,\d+,8\]", hlo)
    np.testing.assert_array_equal(np.asarray(got_pallas[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got_pallas[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-4)
    assert got[0].sharding.spec[0] == ("data", "fsdp"), got[0].sharding
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-4)
    print("MESH-OK")
""")


def test_generate_under_mesh_matches_single_device():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert "MESH-OK" in result.stdout, result.stderr[-3000:]
