"""The Mosaic GPU flash-attention forward (kernels/flash_attention/mosaic_gpu.py) against the float32 reference.

On a GPU (`-m gpu`): forward and gradients through `pallas_gpu.flash_attention(forward_kernel="mosaic",
backward_kernel="triton")` (the portable backward reading the Mosaic forward's log-sum-exp), bf16/fp16 inputs,
relative error < 2e-2 (fixed in advance, as for the portable kernel's bf16 tests). On the CPU: the kernel
lowers for CUDA (its trace and Pallas-to-Mosaic lowering), and bad settings give one-line errors.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.flash_attention import hopper, mosaic_gpu, pallas_gpu, reference

TOL = 2e-2


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("t,causal,with_seg,s_real", [(256, True, False, None), (256, True, True, None),
                                                      (256, False, False, 200), (128, True, True, None),
                                                      (384, False, True, None)])
def test_kernel_lowers_for_cuda_on_the_cpu(t, causal, with_seg, s_real):
    """Tracing and the Pallas -> Mosaic GPU lowering run without a GPU (compilation to PTX needs one); t = 128
    is one key block, fewer than the ring's slots (a generation prefill of 128 tokens)."""
    q = jax.ShapeDtypeStruct((1, t, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32) if with_seg else None
    fn = functools.partial(mosaic_gpu.forward, causal=causal, scale=0.1, offset=0, s_real=s_real)
    text = jax.jit(fn).trace(q, k, k, seg, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_unsupported_shapes_and_bad_choices_give_one_line_errors():
    assert "dtype float32" in mosaic_gpu.unsupported_reason(jnp.float32, 128, 256, 256)
    assert "head dim 256" in mosaic_gpu.unsupported_reason(jnp.bfloat16, 256, 256, 256)
    assert "multiple of 128" in mosaic_gpu.unsupported_reason(jnp.bfloat16, 128, 192, 256)
    assert "key block 128" in mosaic_gpu.unsupported_reason(jnp.bfloat16, 128, 256, 192)
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="can't take"):
        mosaic_gpu.forward(q[:, :64], q, q, None, None, causal=True, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="forward_kernel='mosaic' can't run here: interpret mode"):
        pallas_gpu.flash_attention(q, q, q, interpret=True, forward_kernel="mosaic")
    with pytest.raises(ValueError, match="choose one of"):
        pallas_gpu.flash_attention(q, q, q, interpret=True, forward_kernel="cuda")


GPU_CASES = [  # b, t, s, h, kh, d, causal, with_segments, dtype
    (2, 384, 384, 4, 2, 128, True, True, jnp.bfloat16),  # GQA 2, packed documents with a padding tail
    (1, 1000, 1000, 8, 1, 64, True, False, jnp.bfloat16),  # GQA 8, ragged length (64-key blocks)
    (2, 256, 256, 4, 4, 128, False, False, jnp.float16),  # not causal, fp16
    (1, 1000, 1000, 4, 4, 128, False, False, jnp.bfloat16),  # not causal, ragged: the key-column mask alone
    (1, 256, 512, 4, 2, 128, True, False, jnp.bfloat16),  # fewer queries than keys (aligned to the end)
    (1, 2048, 2048, 2, 2, 128, True, False, jnp.bfloat16),  # many key blocks per CTA (the slot ring wraps)
    (4, 128, 128, 4, 2, 128, True, True, jnp.bfloat16),  # one key block (as in a generation prefill), a padding tail
    (1, 2048, 2048, 2, 2, 128, False, True, jnp.bfloat16),  # not causal, packed: runs of skipped key blocks
    (2, 1024, 1024, 4, 2, 64, True, True, jnp.float16),  # packed documents, head dim 64, fp16
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,s,h,kh,d,causal,with_seg,dtype", GPU_CASES)
def test_mosaic_forward_and_gradients_match_reference_on_gpu(b, t, s, h, kh, d, causal, with_seg, dtype):
    if pallas_gpu.mosaic_forward_reason((b, t, h, d), (b, s, kh, d), dtype, causal) is not None:
        pytest.skip("needs a Hopper GPU")
    ks = jax.random.split(jax.random.PRNGKey(t + d), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k, v = (jax.random.normal(kk, (b, s, kh, d), dtype) for kk in ks[1:3])
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    seg = None
    if with_seg:
        seg = jnp.broadcast_to((jnp.arange(t) * 3 // t + 1).astype(jnp.int32), (b, t)).at[:, -17:].set(0)

    assert_matches_reference(q, k, v, do, seg, causal, forward_kernel="mosaic", backward_kernel="triton")


def assert_matches_reference(q, k, v, do, seg, causal, **kernels):
    """Output and gradients of pallas_gpu.flash_attention(..., **kernels) vs the float32 reference on upcast
    inputs: relative error < TOL, no NaN."""

    def grads(fn, q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(do.astype(out.dtype)))

    ours = jax.jit(lambda q, k, v: grads(lambda q, k, v: pallas_gpu.flash_attention(
        q, k, v, segment_ids=seg, causal=causal, **kernels), q, k, v))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(lambda q, k, v: grads(lambda q, k, v: reference.attention(
        q, k, v, segment_ids=seg, causal=causal), q, k, v))(*up)
    errs = [_rel(a.astype(jnp.float32), r) for a, r in zip(ours, ref)]
    assert not any(bool(jnp.isnan(a.astype(jnp.float32)).any()) for a in ours)
    assert max(errs) < TOL, errs


def test_auto_picks_the_mosaic_forward_only_where_it_runs(monkeypatch):
    """The decision logic on a pretend Hopper device: shapes it takes, and one-line reasons for the rest."""
    assert "not a Hopper GPU" in pallas_gpu.mosaic_forward_reason((1, 128, 2, 64), (1, 128, 2, 64), jnp.bfloat16, True)
    fake = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "devices", lambda *a: [fake])
    reason = functools.partial(pallas_gpu.mosaic_forward_reason, causal=True)
    assert reason((2, 100, 4, 128), (2, 100, 2, 128), jnp.bfloat16) is None  # padded to 128 queries and keys
    assert reason((2, 1000, 4, 64), (2, 1000, 2, 64), jnp.float16) is None  # 1024 keys: 128-key blocks
    assert pallas_gpu.mosaic_settings(1024).block_k == 128 and pallas_gpu.mosaic_settings(960).block_k == 64
    assert "head dim 256" in reason((1, 128, 2, 256), (1, 128, 2, 256), jnp.bfloat16)
    assert "dtype float32" in reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.float32)
    assert reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.bfloat16, interpret=True).startswith("interpret mode")
    monkeypatch.setattr(hopper, "cuda_runtime", lambda: 12080)
    assert "miscompiles" in reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.bfloat16)
    assert pallas_gpu.mosaic_forward_reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.bfloat16, False) is None
