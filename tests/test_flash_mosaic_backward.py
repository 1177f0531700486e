"""The one-pass Mosaic GPU flash-attention backward (kernels/flash_attention/mosaic_gpu_backward.py).

On a GPU (`-m gpu`): forward and gradients through `pallas_gpu.flash_attention(backward_kernel="mosaic")`
against the float32 reference (tests/test_flash_mosaic.assert_matches_reference: relative error < 2e-2, fixed in
advance, as for the other bf16 kernel tests).
On the CPU: the kernel lowers for CUDA (trace and Pallas-to-Mosaic lowering; compiling needs a GPU), `auto`'s
choice on a pretend Hopper device, and one-line errors.
"""

from __future__ import annotations

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.flash_attention import mosaic_gpu_backward, pallas_gpu, tiles
from tests.test_flash_mosaic import assert_matches_reference


@pytest.mark.parametrize("t,s,causal,s_real,with_seg", [(256, 256, True, None, False), (128, 384, False, 300, False),
                                                        (256, 256, True, None, True)])
def test_backward_lowers_for_cuda_on_the_cpu(t, s, causal, s_real, with_seg):
    """Causal with GQA; not causal with fewer queries than keys and padded keys; segment ids."""
    q = jax.ShapeDtypeStruct((1, t, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, s, 2, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 4, t), jnp.float32)
    segs = (jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, s), jnp.int32)) if with_seg else ()
    fn = functools.partial(mosaic_gpu_backward.backward, causal=causal, scale=0.1, offset=s - t, s_real=s_real)
    text = jax.jit(fn).trace(q, k, k, q, lse, q, *segs).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_auto_picks_the_mosaic_backward_only_where_it_runs(monkeypatch):
    """The decision logic on a pretend Hopper device: shapes it takes, one-line reasons for the rest."""
    fake = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "devices", lambda *a: [fake])
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    reason = functools.partial(pallas_gpu.mosaic_backward_reason, causal=True)
    assert reason((2, 100, 4, 128), (2, 100, 2, 128), jnp.bfloat16) is None  # padded to 128 queries and keys
    assert reason((2, 1000, 4, 128), (2, 1000, 1, 128), jnp.float16) is None
    assert "960 keys is not a multiple of 128" in reason((1, 960, 2, 128), (1, 960, 2, 128), jnp.bfloat16)
    assert "head dim 64" in reason((1, 128, 2, 64), (1, 128, 2, 64), jnp.bfloat16)
    assert "dtype float32" in reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.float32)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert "deterministic" in reason((1, 128, 2, 128), (1, 128, 2, 128), jnp.bfloat16)


def test_bad_choices_give_one_line_errors():
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="backward_kernel='mosaic' can't run here: interpret mode"):
        pallas_gpu.flash_attention(q, q, q, interpret=True, backward_kernel="mosaic")
    with pytest.raises(ValueError, match="backward_kernel='cuda'; choose one of"):
        pallas_gpu.flash_attention(q, q, q, interpret=True, backward_kernel="cuda")
    lse = jnp.zeros((1, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="can't take .*head dim 64"):
        mosaic_gpu_backward.backward(q, q, q, q, lse, q, causal=True, scale=1.0, offset=0)


def _segment_layouts(rng, b: int, tp: int, sp: int):
    """Packed documents (increasing ids, a padding tail), one document, random ids (negative too) with padding."""

    def docs(n):
        ids = np.ones(n, np.int32)
        for cut in rng.choice(np.arange(1, n), size=rng.integers(0, 5), replace=False):
            ids[cut:] += 1
        ids[n - rng.integers(0, 40):] = 0
        return ids

    yield np.stack([docs(tp) for _ in range(b)]), np.stack([docs(sp) for _ in range(b)])
    yield np.ones((b, tp), np.int32), np.ones((b, sp), np.int32)
    yield rng.integers(-2, 3, (b, tp)).astype(np.int32), rng.integers(-2, 3, (b, sp)).astype(np.int32)
    yield np.full((b, tp), -1, np.int32), np.where(np.arange(sp) < sp // 2, -1, 0).astype(np.int32)[None].repeat(b, 0)


@pytest.mark.parametrize("a_rows,b_rows", [(128, 64), (64, 128), (64, 64)])  # backward, forward, 64-key forward
def test_segment_ranges_cover_every_shared_document(a_rows, b_rows):
    """tiles.segment_ranges against a brute-force check of every (a block, b block) pair: a pair with an allowed
    entry lies in [first, stop); a pair in [u_lo, u_hi) is one document throughout, so it needs no segment mask;
    one document everywhere visits every block unmasked."""
    rng = np.random.default_rng(a_rows + b_rows)
    for _ in range(6):
        b, n_a, n_b = 2, int(rng.integers(1, 6)), int(rng.integers(1, 8))
        for a_seg, b_seg in _segment_layouts(rng, b, n_a * a_rows, n_b * b_rows):
            r = np.asarray(tiles.segment_ranges(jnp.asarray(a_seg), a_rows, jnp.asarray(b_seg), b_rows))
            for bi, i, j in itertools.product(range(b), range(n_a), range(n_b)):
                aa, bb = a_seg[bi, i * a_rows:(i + 1) * a_rows], b_seg[bi, j * b_rows:(j + 1) * b_rows]
                first, stop, u_lo, u_hi = r[bi, i]
                if ((aa[:, None] == bb[None, :]) & (aa[:, None] != 0)).any():
                    assert first <= j < stop, (bi, i, j, r[bi, i])
                if u_lo <= j < u_hi:
                    assert (aa[:, None] == bb[None, :]).all() and (aa != 0).all(), (bi, i, j, r[bi, i])
            if (a_seg == 1).all() and (b_seg == 1).all():
                assert (r == np.array([0, n_b, 0, n_b])).all()


GPU_CASES = [  # b, t, s, h, kh, causal, dtype, with_segments (head dim 128)
    (2, 384, 384, 4, 2, True, jnp.bfloat16, True),  # GQA 2, packed documents with a padding tail
    (2, 512, 512, 4, 4, False, jnp.float16, True),  # not causal, packed documents
    (2, 384, 384, 4, 2, True, jnp.bfloat16, False),  # GQA 2
    (1, 1000, 1000, 8, 1, True, jnp.bfloat16, False),  # GQA 8, ragged length (padded keys masked)
    (2, 256, 256, 4, 4, False, jnp.float16, False),  # not causal, fp16
    (1, 256, 512, 4, 2, True, jnp.bfloat16, False),  # fewer queries than keys (aligned to the end)
    (1, 2048, 2048, 2, 2, True, jnp.bfloat16, False),  # many query blocks per CTA (the slot ring wraps)
    (1, 4096, 4096, 2, 1, True, jnp.bfloat16, True),  # 32 key tiles, packed documents
    (4, 128, 128, 4, 2, True, jnp.bfloat16, False),  # one key block, two query blocks
    (1, 1000, 1000, 4, 2, False, jnp.bfloat16, False),  # not causal, ragged: CTAs start at their own block
    (1, 2048, 2048, 2, 2, False, jnp.bfloat16, False),  # not causal, the start wraps around 32 query blocks
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,s,h,kh,causal,dtype,with_seg", GPU_CASES)
def test_mosaic_backward_matches_reference_on_gpu(b, t, s, h, kh, causal, dtype, with_seg):
    if pallas_gpu.mosaic_backward_reason((b, t, h, 128), (b, s, kh, 128), dtype, causal) is not None:
        pytest.skip("needs a Hopper GPU")
    ks = jax.random.split(jax.random.PRNGKey(t + s), 4)
    q = jax.random.normal(ks[0], (b, t, h, 128), dtype)
    k, v = (jax.random.normal(kk, (b, s, kh, 128), dtype) for kk in ks[1:3])
    do = jax.random.normal(ks[3], (b, t, h, 128), dtype)
    seg = None
    if with_seg:  # three documents per row (uneven lengths), then 17 padding tokens
        seg = jnp.broadcast_to((jnp.arange(t) * 3 // t + 1).astype(jnp.int32), (b, t)).at[:, -17:].set(0)

    assert_matches_reference(q, k, v, do, seg, causal, backward_kernel="mosaic")
