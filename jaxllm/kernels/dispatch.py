"""Which kernel takes which call on which hardware: every choice between our kernels and their fallbacks.

Each kernel file says what shapes it can take (its `unsupported_reason`, the message it raises with); this
module decides, per call, whether that kernel runs here, and names the fallback once in the log when it
doesn't. `TABLE` says the same in words; docs/attention.md carries it (`table_markdown()`, checked by a test).
"""

from __future__ import annotations

import logging

import jax

from jaxllm.kernels.decode import attention as decode_attention, swiglu, topk
from jaxllm.kernels.flash_attention import pallas_gpu
from jaxllm.parallel import rules, shard

log = logging.getLogger(__name__)
IMPLS = ("auto", "xla", "cudnn", "pallas")
_said: set[str] = set()

# Decode's matmuls are skinny (batch rows times a weight matrix): on a GPU, cuBLAS ran them faster than XLA's
# Triton GEMMs for the 1b model (d_model 2048) and slower for 124m (768) on an H200 (docs/benchmarks.md), so
# generation turns Triton GEMMs off from this width.
CUBLAS_MIN_D_MODEL = 1536


# kernel (file under kernels/) | when (the function here that decides) | hardware | fallback
TABLE = (
    ("flash attention (`flash_attention/pallas_gpu.py`; `pallas_tpu.py` on a TPU)",
     "`resolve_impl`: impl auto or pallas, a shape the kernel takes (dtype, head dim 64/128/256 on a GPU)",
     "GPU, TPU; CPU in interpret mode (pallas only)", "auto: cuDNN on a GPU, xla on a TPU; xla on the CPU"),
    ("Mosaic GPU flash forward (`flash_attention/mosaic_gpu.py`)",
     "`say_flash_variants` / `pallas_gpu.mosaic_forward_reason`: bf16/fp16, head dim 64/128, padded lengths",
     "Hopper (compute capability 9.x), CUDA runtime not 12.8-12.9.0 for causal", "the portable Triton forward"),
    ("Mosaic GPU flash backward (`flash_attention/mosaic_gpu_backward.py`)",
     "`say_flash_variants` / `pallas_gpu.mosaic_backward_reason`: bf16/fp16, head dim 128, no deterministic ops",
     "Hopper (compute capability 9.x), CUDA runtime not 12.8-12.9.0 for causal", "the portable Triton backward"),
    ("decode attention (`decode/attention.py`)",
     "`decode_attention_takes`: one new token per row, <= 16 query heads per KV head, cache length % 16 == 0",
     "GPU (auto, pallas; head dim 64/128/256); CPU in interpret mode (pallas)", "xla reference"),
    ("fused decode step (`decode/attention.py`)",
     "`decode_step_takes`: fused q/k/v of one new token, heads that split evenly over the mesh",
     "GPU (auto, pallas); CPU in interpret mode (pallas)", "RoPE, cache write and attention as separate ops"),
    ("normed SwiGLU (`decode/swiglu.py`)",
     "`decode_mlp_takes`: a decode step's MLP with the norm folded, d_model and d_ff with a 2^k >= 16 factor, "
     "one device", "GPU (auto, pallas); CPU in interpret mode (pallas)", "XLA ops"),
    ("top-k sampling (`decode/topk.py`)",
     "`top_k_takes`: top_k > 0, temperature > 0, a vocabulary the kernel takes, one device",
     "GPU (auto, pallas); CPU in interpret mode (pallas)", "XLA's reductions and sorts"),
    ("cuBLAS for decode matmuls (XLA's Triton GEMMs off)", "`cublas_for_decode`: d_model >= CUBLAS_MIN_D_MODEL",
     "GPU", "XLA's Triton GEMMs"),
)


def table_markdown() -> str:
    """TABLE as the Markdown table in docs/attention.md."""
    rows = ["| kernel | when | hardware | fallback |", "|---|---|---|---|"]
    return "\n".join(rows + [f"| {' | '.join(row)} |" for row in TABLE]) + "\n"


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


# ---------------------------------------------------------------------------------------------------------
# Training attention: flash kernels.


def unsupported_reason(q: jax.Array, k: jax.Array, kv_segment_ids: jax.Array | None = None) -> str | None:
    """Why our Pallas flash kernel can't take this call on this backend (None when it can)."""
    backend = jax.default_backend()
    if backend == "tpu":
        from jaxllm.kernels.flash_attention import pallas_tpu  # noqa: PLC0415 (TPU only)

        if kv_segment_ids is not None:
            return "separate kv_segment_ids (the TPU splash path takes one segment_ids)"
        return pallas_tpu.unsupported_reason(q, k)
    return pallas_gpu.unsupported_reason(q, k, backend)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array | None = None,
                 kv_segment_ids: jax.Array | None = None) -> str:
    """The backend `auto` stands for on this platform and shape (q: [B, T, H, D], k: [B, S, K, D]): our kernel
    wherever it takes the shape (GPU and TPU), else cuDNN on a GPU and xla on a TPU, saying once why; xla on
    the CPU."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        return "xla"
    reason = unsupported_reason(q, q if k is None else k, kv_segment_ids)
    if reason is None:
        return "pallas"
    fallback = "cudnn" if backend == "gpu" else "xla"
    _say_once(f"attention: impl=auto falls back from pallas to {fallback}: {reason} (q {q.shape} {q.dtype})")
    return fallback


def say_flash_variants(q: jax.Array, k: jax.Array, causal: bool) -> None:
    """On a GPU, say once when the flash kernel's forward or backward runs as the portable Triton kernel
    rather than the Hopper (Mosaic GPU) one, and why (pallas_gpu.flash_attention's forward_kernel /
    backward_kernel="auto" make that choice with the same reasons)."""
    if jax.default_backend() != "gpu":
        return
    reason = pallas_gpu.mosaic_forward_reason(q.shape, k.shape, q.dtype, causal)
    if reason is not None:
        _say_once(f"attention: the flash forward runs as the portable Triton kernel, not Mosaic GPU: {reason}")
    reason = pallas_gpu.mosaic_backward_reason(q.shape, k.shape, q.dtype, causal)
    if reason is not None:
        _say_once(f"attention: gradients, where taken, run the portable Triton backward, not Mosaic GPU: {reason}")


# ---------------------------------------------------------------------------------------------------------
# Decoding: attention against a KV cache, the fused decode step, SwiGLU, top-k, cuBLAS.


def decode_kernels_enabled(impl: str) -> bool:
    """Whether impl on this backend may use our Pallas decode kernels (attention, the decode step, SwiGLU,
    top-k): auto on a GPU, pallas on a GPU or the CPU (interpret mode, for tests); never on a TPU (no TPU
    decode kernels)."""
    backend = jax.default_backend()
    return impl in ("auto", "pallas") and backend != "tpu" and (impl == "pallas" or backend == "gpu")


def decode_attention_takes(impl: str, q: jax.Array, k: jax.Array, kv_length: jax.Array | None) -> bool:
    """Whether a KV-cache attention call goes to the decode kernel (else the "xla" reference)."""
    if kv_length is None or q.shape[1] != 1 or not decode_kernels_enabled(impl):
        return False
    reason = decode_attention.unsupported_reason(q, k, gpu=jax.default_backend() == "gpu")
    if reason is not None:
        _say_once(f"attention: decoding falls back from the Pallas decode kernel to xla: {reason}")
    return reason is None


def decode_step_takes(impl: str, qkv_shape: tuple[int, ...], n_heads: int, cache_shape: tuple[int, ...],
                      norm_width: int | None = None) -> bool:
    """Whether a decode step (one new token per row, fused q/k/v projection qkv [B, H+2K, D]) runs as one
    kernel (decode_step: RoPE, cache write and attention; with norm_width, the width of an un-normed input
    whose RMSNorm scale the kernel applies). Same backends as the decode kernel; a shape it can't take runs
    RoPE, the cache write and `attention` as separate ops, saying once why."""
    if not decode_kernels_enabled(impl):
        return False
    mesh = rules.active_mesh()
    shards = 1 if mesh is None else shard.ways(mesh, "kv_heads")
    b, rows, d = qkv_shape
    if n_heads % shards or cache_shape[2] % shards:
        reason = f"{n_heads} query / {cache_shape[2]} KV heads do not split over {shards} devices"
    else:
        local = (b, (n_heads + 2 * cache_shape[2]) // shards, d)
        reason = decode_attention.step_unsupported_reason(local, n_heads // shards,
                                                          (*cache_shape[:2], cache_shape[2] // shards, d),
                                                          gpu=jax.default_backend() == "gpu", norm_width=norm_width)
    if reason is not None:
        _say_once(f"attention: a decode step runs as separate RoPE, cache-write and attention ops: {reason}")
    return reason is None


def decode_mlp_takes(impl: str, rows: int, d_model: int, d_ff: int) -> bool:
    """Whether a decode step's MLP runs its RMSNorm scale and SwiGLU as one Pallas kernel (decode/swiglu.py,
    with the norm weight folded): the decode kernels' backends, on one device (under a mesh XLA runs it)."""
    if not decode_kernels_enabled(impl) or rules.active_mesh() is not None:
        return False
    reason = swiglu.unsupported_reason(rows, d_model, d_ff)
    if reason is not None:
        _say_once(f"decoding: the MLP's norm scale and SwiGLU run as XLA ops: {reason}")
    return reason is None


def top_k_takes(impl: str, vocab_size: int, top_k: int, temperature: float) -> bool:
    """Whether the sampler draws top-k through the Pallas kernel (decode/topk.py): the decode kernels'
    backends, on one device, a shape the kernel takes (else XLA's reductions and sorts)."""
    return (top_k > 0 and temperature > 0.0 and rules.active_mesh() is None and decode_kernels_enabled(impl)
            and topk.unsupported_reason(vocab_size, top_k) is None)


def cublas_for_decode(backend: str, d_model: int) -> bool:
    """Whether generation compiles with XLA's Triton GEMMs off (cuBLAS takes the skinny decode matmuls)."""
    return backend == "gpu" and d_model >= CUBLAS_MIN_D_MODEL
