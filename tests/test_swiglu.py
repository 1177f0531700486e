"""The RMS-normed SwiGLU decode kernel (kernels/decode/swiglu.py) against a float64 NumPy oracle.

Tolerances fixed in advance: float32 inputs (interpret mode) 1e-5; bf16 inputs on a GPU: relative L2 error
< 1e-2 against the oracle on the same (bf16-rounded) inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.decode import swiglu
from jaxllm.models import decode


def _oracle(x: np.ndarray, gate_up: np.ndarray, eps: float) -> np.ndarray:
    """silu(r * gate) * (r * up), r = 1 / sqrt(mean(x^2) + eps) per row, in float64."""
    x, gate_up = np.asarray(x, np.float64), np.asarray(gate_up, np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    gate, up = np.split(gate_up * r, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def _case(rng, m, d, f, dtype=jnp.float32):
    x = rng.normal(size=(m, d)) * rng.uniform(0.3, 4.0, (m, 1))
    gate_up = rng.normal(size=(m, 2 * f)) * 3.0
    return jnp.asarray(x, dtype), jnp.asarray(gate_up, dtype)


@pytest.mark.parametrize("m,d,f", [(64, 256, 96), (6, 48, 48), (3, 768, 1536), (16, 32, 2048)])
def test_kernel_matches_oracle(m, d, f):
    """Interpret mode, float32: several row blocks, a d_model that is not a power of two (read in chunks),
    an F that is several column blocks."""
    x, gate_up = _case(np.random.default_rng(m + d + f), m, d, f)
    want = _oracle(x, gate_up, 1e-5)
    np.testing.assert_allclose(np.asarray(swiglu.normed_swiglu(x, gate_up, 1e-5, interpret=True)), want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(swiglu.reference(x, gate_up, 1e-5)), want, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise_one_line_errors():
    with pytest.raises(ValueError, match="d_ff 40 has no power-of-two factor >= 16"):
        swiglu.normed_swiglu(jnp.ones((4, 32)), jnp.ones((4, 80)), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="d_model 24 has no power-of-two factor"):
        swiglu.normed_swiglu(jnp.ones((4, 24)), jnp.ones((4, 64)), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="want gate_up"):
        swiglu.normed_swiglu(jnp.ones((4, 32)), jnp.ones((3, 64)), 1e-5, interpret=True)


def test_folded_norms_give_the_same_layer():
    """fold_norms: the MLP and q/k/v projection with the norm weights folded (un-normed input, the row scale
    after the matmul, by the kernel) equal the unfolded layer's, float32."""
    rng = np.random.default_rng(0)
    d, f, h, hd = 32, 48, 4, 8
    w = lambda *shape: rng.normal(size=shape) / np.sqrt(shape[0])  # noqa: E731 (unit-scale outputs)
    p = {"attn_norm": rng.uniform(0.5, 1.5, d), "mlp_norm": rng.uniform(0.5, 1.5, d), "wq": w(d, h, hd),
         "wk": w(d, 2, hd), "wv": w(d, 2, hd), "w_gate": w(d, f), "w_up": w(d, f), "w_down": w(f, d)}
    p = decode.fuse_projections({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})
    folded = decode.fold_norms(p)
    assert "attn_norm" not in folded and "mlp_norm" not in folded
    cfg = type("Cfg", (), {"norm_eps": 1e-5})()
    x = jnp.asarray(rng.normal(size=(2, 3, d)) * 2.0, jnp.float32)
    np.testing.assert_allclose(np.asarray(decode.project_qkv(folded, x, cfg)),
                               np.asarray(decode.project_qkv(p, x, cfg)), rtol=1e-5, atol=1e-5)
    want = decode.mlp(p, x, cfg)
    np.testing.assert_allclose(np.asarray(decode.mlp(folded, x, cfg)), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decode.mlp(folded, x, cfg, kernel=True)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    with_bias = decode.fold_norms({**p, "bq": jnp.zeros((h, hd))})  # the scale must precede a bias
    assert "attn_norm" in with_bias and "mlp_norm" not in with_bias


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_k_down_projection_matches_oracle(splits):
    """The decode MLP's down projection as products over slices of d_ff equals x @ w in float64 (float32
    inputs: 1e-5; bf16 inputs: relative L2 error < 1e-2 on the same rounded inputs)."""
    rng = np.random.default_rng(splits)
    x, w = rng.normal(size=(5, 1, 96)), rng.normal(size=(96, 40)) / np.sqrt(96)
    want = x @ w
    got = decode._split_k_dense(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), splits)
    assert got.shape == (5, 1, 40) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = np.asarray(decode._split_k_dense(xb, wb, splits), np.float64)
    want = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.gpu
def test_kernel_on_gpu_matches_oracle():
    """Triton-lowered, bf16: the 1b and 124m decode shapes and a ragged one."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(0)
    for m, d, f in [(64, 2048, 5632), (64, 768, 3072), (24, 512, 1040)]:
        x, gate_up = _case(rng, m, d, f, jnp.bfloat16)
        got = np.asarray(jax.jit(swiglu.normed_swiglu, static_argnums=2)(x, gate_up, 1e-5), np.float64)
        want = _oracle(np.asarray(x.astype(jnp.float32)), np.asarray(gate_up.astype(jnp.float32)), 1e-5)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-2, (m, d, f, err)
