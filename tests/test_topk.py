"""The Pallas top-k kernel (kernels/decode/topk.py, interpret mode) against a float64 NumPy oracle.

Exact by construction, so values and columns must match exactly: the oracle is a stable descending argsort
(ties at the k-th value go to the lowest columns, the kernel's rule); the log-sum-exp within 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.decode import topk


def _oracle(x: np.ndarray, k: int, scale: float):
    """(the k largest columns of each row, lowest column first on ties, as sorted column lists; logsumexp)."""
    columns = np.sort(np.argsort(-x, axis=-1, kind="stable")[:, :k], axis=-1)
    xs = x.astype(np.float64) * scale
    top = xs.max(-1, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)  # [rows, 1]
    lse = np.log(np.exp(xs - shift).sum(-1)) + shift[:, 0]
    return columns, lse


@pytest.mark.parametrize("v,k", [(32000, 50), (1024, 32), (96, 3), (96, 50), (256, 96), (64, 64), (40, 1)])
def test_top_k_matches_a_stable_sort(v, k):
    """Random rows, rows full of ties, rows half -inf; k above and below the number of chunks."""
    rng = np.random.default_rng(v + k)
    x = rng.normal(size=(4, v)).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2  # many ties at every value
    x[2, : v // 2] = -np.inf
    x[3, :] = x[3, 5]  # one value everywhere: the lowest k columns
    values, columns, lse = (np.asarray(a) for a in topk.top_k(jnp.asarray(x), k, scale=0.7, interpret=True))
    want_columns, want_lse = _oracle(x, k, 0.7)
    np.testing.assert_array_equal(columns, want_columns)  # column order, exactly the oracle's columns
    np.testing.assert_array_equal(values, np.take_along_axis(x, want_columns, axis=-1))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_kth_largest_stops_early_only_when_it_may():
    """The bisection (the kernel's selection step) against np.sort on int32 keys: distinct keys (it stops
    early), keys tied at the k-th (it runs all 32 passes), negative keys and INT_MIN padding."""
    rng = np.random.default_rng(0)
    cases = [rng.permutation(np.arange(-500, 524, dtype=np.int32)).reshape(8, 128),
             rng.integers(-4, 4, (4, 64)).astype(np.int32),
             np.concatenate([rng.integers(-2**31 + 1, 2**31 - 1, (2, 40)), np.full((2, 24), -2**31)],
                            1).astype(np.int32)]
    for keys in cases:
        for k in (1, 5, 17, keys.size // 2, keys.size):
            want = np.sort(keys.ravel())[::-1][k - 1]
            assert int(topk._kth_largest(jnp.asarray(keys), k)) == want, (keys.shape, k)


def test_bad_shapes_raise_one_line_errors():
    with pytest.raises(ValueError, match="vocabulary size 50257 has no power-of-two factor >= 8"):
        topk.top_k(jnp.zeros((2, 50257)), 5, interpret=True)
    with pytest.raises(ValueError, match=r"top_k=70 is not in \[1, 64\]"):
        topk.top_k(jnp.zeros((2, 64)), 70, interpret=True)
    with pytest.raises(ValueError, match="top_k=300 needs more than 8192 candidates"):
        topk.top_k(jnp.zeros((2, 32000)), 300, interpret=True)
    assert "16384 maxima" in topk.unsupported_reason(2**20, 50)


@pytest.mark.gpu
def test_top_k_on_gpu_matches_a_stable_sort():
    """Triton-lowered: the 1b vocabulary at batch 64, a Llama-3-sized one, the largest top_k taken, exact."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(0)
    for b, v, k in [(64, 32000, 50), (8, 128256, 40), (16, 4096, 1), (4, 32000, 255)]:
        x = rng.normal(size=(b, v)).astype(np.float32) * 3
        x[1] = np.round(x[1])
        values, columns, lse = (np.asarray(a) for a in jax.jit(topk.top_k, static_argnums=1)(jnp.asarray(x), k))
        want_columns, want_lse = _oracle(x, k, 1.0)
        np.testing.assert_array_equal(columns, want_columns)
        np.testing.assert_array_equal(values, np.take_along_axis(x, want_columns, axis=-1))
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
