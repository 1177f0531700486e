"""Our Pallas flash attention (interpret mode on the CPU) against the pure-jnp reference.

Tolerances fixed in advance: float32 inputs ||x - ref|| / ||ref|| < 1e-5 (forward and every gradient);
bf16 inputs 2e-2. Small blocks (8-32) so that every case spans several blocks and a ragged tail.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import dispatch
from jaxllm.kernels.flash_attention import pallas_gpu, reference
from jaxllm.models import attention as attention_mod, rope
from tests.conftest import load_script
from tests.test_flash_mosaic import assert_matches_reference

F32_TOL = 1e-5
BF16_TOL = 2e-2
SMALL = pallas_gpu.Blocks(q=16, k=8, bwd_q=8, bwd_k=16)


def _inputs(b, t, s, h, kh, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
    return q, k, v, jax.random.normal(ks[3], (b, t, h, d), dtype)


def _packed_segments(b, t, seed):
    """[B, T] int32: several documents per row, then a padding tail (segment 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - 4), size=3, replace=False))
        row = np.zeros(t, np.int32)
        for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, t - 4])):
            row[lo:hi] = doc + 1
        rows.append(row)  # the last 4 tokens stay padding
    return jnp.asarray(np.stack(rows))


def _vjp(fn, q, k, v, do):
    """(out, dq, dk, dv) for the output cotangent do, compiled as one program."""
    def run(q, k, v, do):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(do))
    return jax.jit(run)(q, k, v, do)


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


CASES = [  # b, t, s, h, kh, d, causal, with_segments
    (2, 40, 40, 4, 2, 64, True, True),  # GQA 2, packed documents, ragged length
    (1, 37, 37, 8, 1, 64, True, False),  # GQA 8, ragged, causal only
    (1, 24, 24, 4, 1, 128, False, True),  # GQA 4, d128, not causal, documents
    (2, 32, 32, 2, 2, 128, False, False),  # GQA 1, d128, aligned, no mask at all
    (1, 9, 40, 4, 4, 64, True, False),  # fewer queries than keys: queries aligned to the end (decode-like)
    (2, 96, 96, 4, 2, 64, True, True),  # documents longer than the blocks: skipped, unmasked and masked blocks
    (1, 96, 96, 2, 2, 64, False, True),  # the same, not causal (runs of skipped blocks on both sides)
]


@pytest.mark.parametrize("b,t,s,h,kh,d,causal,with_segments", CASES)
def test_forward_and_gradients_match_reference(b, t, s, h, kh, d, causal, with_segments):
    q, k, v, do = _inputs(b, t, s, h, kh, d, seed=t + d)
    seg = _packed_segments(b, t, seed=t) if with_segments else None
    ours = _vjp(lambda q, k, v: pallas_gpu.flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                                           blocks=SMALL, interpret=True), q, k, v, do)
    ref = _vjp(lambda q, k, v: reference.attention(q, k, v, segment_ids=seg, causal=causal), q, k, v, do)
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert x.shape == r.shape and x.dtype == r.dtype, name
        assert _rel(x, r) < F32_TOL, f"{name}: relative error {_rel(x, r):.2e}"


def test_one_document_matches_no_segment_ids():
    """All-ones segment ids run the blocks unmasked (tiles.segment_ranges): the same numbers as no ids."""
    q, k, v, do = _inputs(2, 64, 64, 4, 2, 64, seed=7)
    run = lambda seg: _vjp(lambda q, k, v: pallas_gpu.flash_attention(  # noqa: E731
        q, k, v, segment_ids=seg, causal=True, blocks=SMALL, interpret=True), q, k, v, do)
    for name, x, r in zip(("out", "dq", "dk", "dv"), run(jnp.ones((2, 64), jnp.int32)), run(None)):
        assert _rel(x, r) < 1e-6, f"{name}: relative difference {_rel(x, r):.2e}"


@pytest.mark.parametrize("with_segments", [False, True])
def test_portable_kernels_lower_to_triton_on_the_cpu(monkeypatch, with_segments):
    """Forward and both backward kernels through Pallas' Triton lowering for CUDA (to Triton IR; compiling
    needs a GPU), with a pretend Hopper's compute capability: catches ops the GPU lowering lacks."""
    from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415

    fake = types.SimpleNamespace(get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0"))
    monkeypatch.setattr(registration, "gpu_info_lib", fake)
    q, k = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def grads(q, k, v, seg):
        out, pullback = jax.vjp(lambda q, k, v: pallas_gpu.flash_attention(
            q, k, v, segment_ids=seg if with_segments else None, interpret=False, forward_kernel="triton",
            backward_kernel="triton"), q, k, v)
        return pullback(out)

    text = jax.jit(grads).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert all(name in text for name in ("jaxllm_flash_fwd", "jaxllm_flash_dkdv", "jaxllm_flash_dq"))


def test_fully_masked_rows_give_zeros_not_nan():
    b, t, h, d = 2, 24, 2, 64
    q, k, v, do = _inputs(b, t, t, h, h, d, seed=3)
    seg = jnp.stack([jnp.zeros(t, jnp.int32), jnp.where(jnp.arange(t) < 10, 1, 0)])  # row 0: all padding
    out, dq, dk, dv = _vjp(lambda q, k, v: pallas_gpu.flash_attention(
        q, k, v, segment_ids=seg, causal=True, blocks=SMALL, interpret=True), q, k, v, do)
    for x in (out, dq, dk, dv):
        assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1, 10:]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[0]), 0.0)


@pytest.mark.parametrize("with_segments", [False, True])
def test_compiled_memory_grows_linearly_with_length(with_segments):
    """No [S, S] buffer forward or backward: the compiled fwd+bwd's temp memory (interpret mode, default
    blocks) grows ~linearly from S 2048 to 8192 and stays far below one [S, S] float32 buffer, which the
    reference exceeds (so the check can see one)."""
    def temp(fn, s):
        x = jax.ShapeDtypeStruct((1, s, 1, 64), jnp.float32)
        seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

        def run(q, k, v, do, seg):
            out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg if with_segments else None), q, k, v)
            return (out, *pullback(do))
        return jax.jit(run).lower(x, x, x, x, seg).compile().memory_analysis().temp_size_in_bytes

    ours = lambda q, k, v, seg: pallas_gpu.flash_attention(q, k, v, segment_ids=seg, causal=True, interpret=True)
    short, long = temp(ours, 2048), temp(ours, 8192)
    assert long <= 4.5 * short, (short, long)  # 4x the length: 4x the memory (not 16x)
    assert long < 8192 * 8192 * 4 / 8, long
    ref = lambda q, k, v, seg: reference.attention(q, k, v, segment_ids=seg, causal=True)
    assert temp(ref, 8192) > 8192 * 8192 * 4


def test_bf16_forward_within_bf16_tolerance():
    q, k, v, _ = _inputs(1, 48, 48, 4, 2, 64, dtype=jnp.bfloat16, seed=5)
    out = jax.jit(lambda q, k, v: pallas_gpu.flash_attention(q, k, v, causal=True, blocks=SMALL,
                                                             interpret=True))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    assert out.dtype == jnp.bfloat16
    assert _rel(out.astype(jnp.float32), reference.attention(*up, causal=True)) < BF16_TOL


def test_tpu_splash_wrapper_matches_reference_in_interpret_mode():
    from jaxllm.kernels.flash_attention import pallas_tpu

    q, k, v, do = _inputs(1, 200, 200, 4, 2, 64, seed=11)  # GQA 2, 200 not a multiple of the 128 block
    seg = jnp.asarray([[1] * 80 + [2] * 100 + [0] * 20])
    ours = _vjp(lambda q, k, v: pallas_tpu.flash_attention(q, k, v, segment_ids=seg, block=128, interpret=True),
                q, k, v, do)
    ref = _vjp(lambda q, k, v: reference.attention(q, k, v, segment_ids=seg), q, k, v, do)
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert _rel(x, r) < F32_TOL, f"{name}: relative error {_rel(x, r):.2e}"


def test_auto_is_xla_off_gpu_and_bad_names_fail():
    q = jnp.zeros((1, 8, 2, 64))
    assert dispatch.resolve_impl("auto", q) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="unknown"):
        dispatch.resolve_impl("flash", q)


def test_bad_shapes_raise_one_line_errors():
    q, k, v, _ = _inputs(1, 16, 16, 3, 2, 64)
    with pytest.raises(ValueError, match="multiple of K"):
        pallas_gpu.flash_attention(q, k, v, interpret=True)
    q, k, v, _ = _inputs(1, 8, 16, 2, 2, 64)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        pallas_gpu.flash_attention(q, k, v, segment_ids=jnp.ones((1, 8), jnp.int32), interpret=True)
    reason = pallas_gpu.unsupported_reason(jnp.zeros((1, 8, 2, 96)), jnp.zeros((1, 8, 2, 96)), "gpu")
    assert reason is not None and "head dim 96" in reason


_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jaxllm.models import attention as A
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(ks[0], (4, 24, 4, 64))
k, v = (jax.random.normal(x, (4, 24, 2, 64)) for x in ks[1:])
seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 4, 0))
loss = lambda impl: lambda q, k, v: (A.attention(q, k, v, segment_ids=seg, impl=impl) ** 2).sum()
ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
with jax.set_mesh(mesh):
    got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    hlo = jax.jit(loss("pallas")).lower(q, k, v).as_text()
err = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(got, ref))
print("ERR", err, "MANUAL", "manual" in hlo)
"""


def test_runs_per_shard_under_a_mesh():
    """impl="pallas" through models.attention with batch over (data, fsdp), heads over tensor on 8 simulated
    devices: runs per shard (a manual computation in the HLO) with the reference's gradients."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("ERR")][-1].split()
    assert float(line[1]) < F32_TOL and line[3] == "True", line


@pytest.mark.gpu
def test_model_on_gpu_auto_uses_pallas_and_matches_xla():
    """A bf16 transformer's loss and gradients with attention_impl=auto (our kernel) vs xla, on a GPU."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    import dataclasses

    from jaxllm import models
    from jaxllm.config import ModelConfig
    from jaxllm.models import transformer

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=512,
                      max_seq_len=256, dtype="bfloat16")
    assert dispatch.resolve_impl("auto", jnp.zeros((1, 8, 2, 128), jnp.bfloat16)) == "pallas"
    _, params = models.init(cfg, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 200), 0, 512)
    positions = jnp.broadcast_to(jnp.arange(200), (2, 200))
    seg = jnp.where(jnp.arange(200) < 120, 1, 2)[None].repeat(2, 0).at[1, 180:].set(0)

    def loss(params, impl):
        c = dataclasses.replace(cfg, attention_impl=impl)
        return jnp.mean(transformer.logits(params, c, tokens, positions, seg) ** 2)

    (l_ours, g_ours), (l_ref, g_ref) = (jax.jit(jax.value_and_grad(lambda p, i=i: loss(p, i)))(params)
                                        for i in ("auto", "xla"))
    loss_err = abs(float(l_ours - l_ref)) / abs(float(l_ref))
    grad_err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)))
    print(f"model on GPU: loss rel err {loss_err:.2e}, worst gradient rel err {grad_err:.2e}")
    assert loss_err < BF16_TOL and grad_err < 5e-2, (loss_err, grad_err)  # bf16 through 2 layers


def test_auto_on_gpu_falls_back_to_cudnn_and_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_said", set())
    q_ok, q_odd = jnp.zeros((1, 8, 2, 128), jnp.bfloat16), jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
    with caplog.at_level("WARNING", logger=dispatch.log.name):
        assert dispatch.resolve_impl("auto", q_ok) == "pallas"
        assert dispatch.resolve_impl("auto", q_odd) == "cudnn"
        assert dispatch.resolve_impl("auto", q_odd) == "cudnn"
    said = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(said) == 1 and "head dim 96" in said[0], said


def _decode_case(rng, b, s, h, kh, d, length, dtype):
    """Random q [B, 1, H, D] and cache [B, S, K, D] with left padding and columns from `length` on unwritten."""
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype) for _ in range(2))
    pad = rng.integers(0, 5, b)
    cols = np.arange(s)[None]
    kv_pos = np.maximum(cols - pad[:, None], 0).astype(np.int32)
    kv_seg = ((cols >= pad[:, None]) & (cols < length)).astype(np.int32)
    q_pos = (length - 1 - pad)[:, None].astype(np.int32)
    return q, k, v, jnp.asarray(q_pos), jnp.asarray(kv_pos), jnp.asarray(kv_seg)


@pytest.mark.parametrize("b,s,h,kh,d,length", [(3, 64, 4, 2, 64, 40), (2, 48, 12, 12, 64, 48),
                                                (2, 32, 16, 2, 128, 17), (1, 16, 8, 1, 32, 1),
                                                (2, 32, 6, 2, 64, 20), (2, 48, 32, 4, 64, 30)])
def test_decode_kernel_matches_reference(b, s, h, kh, d, length):
    """Interpret mode, float32: one query per row against a left-padded cache read up to `length` (GQA 1-8,
    and 3: the query heads of a KV head are padded to 16 rows, so any count up to 16 works)."""
    from jaxllm.kernels.decode import attention as decode  # noqa: PLC0415

    args = _decode_case(np.random.default_rng(s + h), b, s, h, kh, d, length, jnp.float32)
    q, k, v, q_pos, kv_pos, kv_seg = args
    want = reference.attention(q, k, v, segment_ids=jnp.ones((b, 1), jnp.int32), kv_segment_ids=kv_seg,
                               q_positions=q_pos, kv_positions=kv_pos)
    for pad in (False, True):  # 16/32/64 query heads: each program reads the whole row's q (or padded rows)
        got = decode.decode_attention(*args, jnp.int32(length), interpret=True, pad=pad)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    cut = s - 4
    with pytest.raises(ValueError, match=f"cache length {cut} is not a multiple of 16"):
        decode.decode_attention(q, k[:, :cut], v[:, :cut], q_pos, kv_pos[:, :cut], kv_seg[:, :cut],
                                jnp.int32(length), interpret=True)


@pytest.mark.gpu
def test_decode_kernel_on_gpu_matches_reference():
    """Triton-lowered decode kernel, bf16, head dims 64/128, GQA 1/2/8: relative L2 error vs the float32
    reference on the same (bf16-rounded) inputs below 1e-2."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from jaxllm.kernels.decode import attention as decode  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for b, s, h, kh, d, length in [(64, 256, 16, 8, 128, 200), (8, 512, 12, 12, 64, 300), (4, 64, 8, 1, 128, 64)]:
        args = _decode_case(rng, b, s, h, kh, d, length, jnp.bfloat16)
        q, k, v, q_pos, kv_pos, kv_seg = args
        want = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids=jnp.ones((b, 1)),
                                   kv_segment_ids=kv_seg, q_positions=q_pos, kv_positions=kv_pos)
        for pad in (False, True):
            got = jax.jit(decode.decode_attention, static_argnames="pad")(*args, jnp.int32(length), pad=pad)
            err = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
            assert err < 1e-2, (b, s, h, kh, d, pad, err)


def _step_case(rng, b, s, h, kh, d, index, dtype):
    """A fused projection qkv [B, H+2K, D] (before RoPE) and a left-padded cache [B, S, K, D] written up to
    column `index` (later columns hold stale values), with the new token's RoPE tables."""
    qkv = jnp.asarray(rng.normal(size=(b, h + 2 * kh, d)), dtype)
    cache_k, cache_v = (jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype) for _ in range(2))
    pad = rng.integers(0, min(5, index + 1), b)
    cols = np.arange(s)[None]
    kv_pos = jnp.asarray(np.maximum(cols - pad[:, None], 0), jnp.int32)
    kv_seg = jnp.asarray((cols >= pad[:, None]) & (cols < max(index + 1, s - 3)), jnp.int32)
    q_pos = kv_pos[:, index:index + 1]  # the new token sits at column index
    cos, sin = rope.rope_tables(q_pos[:, 0], d, 10000.0)
    return qkv, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg


def _norm_input(rng, b, d_model, dtype=jnp.float32):
    """An un-normed layer input x [B, d_model] and its RMSNorm row scale rsqrt(mean(x^2) + 1e-5) [B], float64."""
    x = rng.normal(size=(b, d_model)) * rng.uniform(0.5, 3.0, (b, 1))
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
    return jnp.asarray(x, dtype), 1.0 / np.sqrt(np.mean(x * x, axis=-1) + 1e-5)


@pytest.mark.parametrize("b,s,h,kh,d,index", [(3, 64, 4, 2, 64, 40), (2, 32, 16, 2, 128, 17), (1, 16, 8, 1, 32, 1),
                                               (2, 48, 32, 4, 64, 30), (2, 32, 4, 4, 16, 31), (2, 32, 12, 4, 16, 9)])
def test_decode_step_matches_rope_cache_write_and_reference(b, s, h, kh, d, index):
    """Interpret mode, float32: the fused decode step (RoPE, cache write at `index`, attention over the columns
    before it plus the new key) against the separate ops; the cache's other columns are untouched."""
    from jaxllm.kernels.decode import attention as decode  # noqa: PLC0415

    qkv, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg = _step_case(np.random.default_rng(s + h), b, s, h, kh,
                                                                        d, index, jnp.float32)
    want = reference.decode_step(qkv, h, cache_k, cache_v, q_pos, kv_pos, kv_seg, index)
    for pad in (False, True):  # 16/32/64 query heads: the whole row's query, or gathered per KV head
        got = decode.decode_step(qkv, h, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg, jnp.int32(index),
                                 interpret=True, pad=pad)
        for got_x, want_x in zip(got, want):
            np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), rtol=1e-5, atol=1e-5)
    # With norm_x, qkv is the projection of the un-normed input: the kernel scales it by its RMSNorm factor.
    x, scale = _norm_input(np.random.default_rng(index), b, 48)
    want = reference.decode_step(qkv * scale[:, None, None], h, cache_k, cache_v, q_pos, kv_pos, kv_seg, index)
    got = decode.decode_step(qkv, h, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg, jnp.int32(index),
                             norm_x=x, eps=1e-5, interpret=True)
    for got_x, want_x in zip(got, want):
        np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="d_model 40 has no power-of-two factor"):
        decode.decode_step(qkv, h, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg, jnp.int32(index),
                           norm_x=jnp.ones((b, 40)), interpret=True)
    with pytest.raises(ValueError, match="3 query heads over 2 KV heads"):
        bad_cache = jnp.zeros((b, s, 2, d))
        decode.decode_step(jnp.zeros((b, 7, d)), 3, cos, sin, bad_cache, bad_cache, q_pos, kv_pos, kv_seg,
                           jnp.int32(index), interpret=True)


@pytest.mark.gpu
def test_decode_step_on_gpu_matches_reference():
    """Triton-lowered fused decode step, bf16, head dims 64/128: attention within relative L2 error 1e-2 of the
    float32 oracle on the same inputs; the written cache column equal to the oracle's bf16-rounded RoPE."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from jaxllm.kernels.decode import attention as decode  # noqa: PLC0415

    rng = np.random.default_rng(0)
    step = jax.jit(decode.decode_step, static_argnums=1, static_argnames="pad")
    for b, s, h, kh, d, index in [(64, 256, 16, 8, 128, 200), (8, 512, 32, 4, 64, 300), (4, 64, 16, 1, 128, 63),
                                  (64, 256, 12, 12, 64, 130), (4, 128, 12, 4, 128, 77)]:
        qkv, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg = _step_case(rng, b, s, h, kh, d, index, jnp.bfloat16)
        want = reference.decode_step(qkv, h, cache_k, cache_v, q_pos, kv_pos, kv_seg, index)
        for pad in (False, True):
            got = step(qkv, h, cos, sin, cache_k, cache_v, q_pos, kv_pos, kv_seg, jnp.int32(index), pad=pad)
            err = float(jnp.linalg.norm(got[0].astype(jnp.float32) - want[0]) / jnp.linalg.norm(want[0]))
            assert err < 1e-2, (b, s, h, kh, d, pad, err)
            for got_c, want_c in zip(got[1:], want[1:]):
                want_c = np.asarray(want_c.astype(jnp.bfloat16).astype(jnp.float32))
                np.testing.assert_allclose(np.asarray(got_c.astype(jnp.float32)), want_c, rtol=1e-2, atol=1e-2)
        x, scale = _norm_input(rng, b, 2048, jnp.bfloat16)  # the in-kernel RMSNorm scale (folded norm weights)
        want = reference.decode_step(qkv.astype(jnp.float32) * scale[:, None, None], h, cache_k, cache_v, q_pos,
                                     kv_pos, kv_seg, index)
        got = jax.jit(decode.decode_step, static_argnums=1)(qkv, h, cos, sin, cache_k, cache_v, q_pos, kv_pos,
                                                            kv_seg, jnp.int32(index), norm_x=x)
        err = float(jnp.linalg.norm(got[0].astype(jnp.float32) - want[0]) / jnp.linalg.norm(want[0]))
        assert err < 1e-2, (b, s, h, kh, d, "norm_x", err)


def test_decoding_on_gpu_falls_back_to_xla_and_says_why_once(monkeypatch, caplog):
    """auto on a GPU sends a decode step to the kernel; a shape it can't take (head dim 96, or 32 query heads
    per KV head: more than 16) goes to the XLA path with one log line per reason, with the same result as the
    reference."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_said", set())
    length = jnp.int32(10)
    assert dispatch.decode_attention_takes("auto", jnp.zeros((2, 1, 4, 128)), jnp.zeros((2, 32, 2, 128)), length)
    assert not dispatch.decode_attention_takes("xla", jnp.zeros((2, 1, 4, 128)), jnp.zeros((2, 32, 2, 128)),
                                               length)
    q, k, v, q_pos, kv_pos, kv_seg = _decode_case(np.random.default_rng(1), 2, 32, 4, 2, 96, 10, jnp.float32)
    with caplog.at_level("WARNING", logger=dispatch.log.name):
        for _ in range(2):
            got = attention_mod.attention(q, k, v, segment_ids=jnp.ones((2, 1), jnp.int32), kv_segment_ids=kv_seg,
                                          q_positions=q_pos, kv_positions=kv_pos, kv_length=length)
        assert not dispatch.decode_attention_takes("auto", jnp.zeros((2, 1, 64, 128)),
                                                   jnp.zeros((2, 32, 2, 128)), length)
    want = reference.attention(q, k, v, segment_ids=jnp.ones((2, 1), jnp.int32), kv_segment_ids=kv_seg,
                               q_positions=q_pos, kv_positions=kv_pos)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    said = [r.getMessage() for r in caplog.records if "decode kernel" in r.getMessage()]
    assert len(said) == 2 and "head_dim 96" in said[0] and "64 query heads over 2 KV heads" in said[1], said


def test_decode_step_on_gpu_falls_back_and_says_why_once(monkeypatch, caplog):
    """auto on a GPU fuses a decode step (16 heads over 8, and 12 over 12: the 1b and 124m models); head dim 96
    runs RoPE, the cache write and attention as separate ops, with one log line; xla never fuses."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_said", set())
    assert dispatch.decode_step_takes("auto", (2, 32, 128), 16, (2, 256, 8, 128))
    assert dispatch.decode_step_takes("auto", (2, 36, 64), 12, (2, 256, 12, 64))
    assert not dispatch.decode_step_takes("xla", (2, 32, 128), 16, (2, 256, 8, 128))
    with caplog.at_level("WARNING", logger=dispatch.log.name):
        for _ in range(2):
            assert not dispatch.decode_step_takes("auto", (2, 36, 96), 12, (2, 256, 12, 96))
    said = [r.getMessage() for r in caplog.records if "decode step" in r.getMessage()]
    assert len(said) == 1 and "head_dim 96" in said[0], said


def test_bench_decode_step_checks_the_kernel_before_timing():
    """scripts/bench_decode_step.py on one small point (interpret mode off a GPU, where no kernel time is seen):
    its check of the fused step against RoPE + the float32 reference passes, and the row says what it measured."""
    row = load_script("bench_decode_step").measure(1, 20, types.SimpleNamespace(copies=1, calls=1))
    assert row["rel_err"] < 1e-2 and (row["batch"], row["index"], row["cache"]) == (1, 20, 256), row


PORTABLE_GPU_CASES = [  # b, t, h, kh, d, causal, dtype (several packed documents per row, a padding tail)
    (2, 384, 4, 2, 128, True, jnp.bfloat16),
    (1, 1000, 8, 1, 64, True, jnp.bfloat16),
    (2, 512, 4, 4, 256, False, jnp.float16),
    (1, 2048, 2, 2, 128, True, jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,h,kh,d,causal,dtype", PORTABLE_GPU_CASES)
def test_portable_kernels_with_segment_ids_on_gpu_match_reference(b, t, h, kh, d, causal, dtype):
    """The Triton-lowered forward, dK/dV and dQ kernels, which skip the blocks no shared document reaches."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    q, k, v, do = _inputs(b, t, t, h, kh, d, dtype, seed=t + d)
    seg = _packed_segments(b, t, seed=d)
    assert_matches_reference(q, k, v, do, seg, causal, forward_kernel="triton", backward_kernel="triton")
