"""One attention entry point for the whole stack; `impl` picks the backend.

impl: "xla" (pure jnp reference, runs anywhere), "cudnn" (jax.nn.dot_product_attention on a GPU),
"pallas" (our flash kernel: Triton-lowered Pallas on a GPU, interpret mode on the CPU for tests),
On a TPU "pallas" is jax's splash-attention kernel behind the same contract (kernels/flash_attention/
pallas_tpu.py). "auto": our kernel wherever it supports the shape (GPU and TPU), else cuDNN on a GPU and
"xla" on a TPU, saying once in the log why; "xla" on the CPU.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.kernels import swiglu
from jaxllm.kernels.flash_attention import decode, pallas_gpu, reference
from jaxllm.parallel import rules

log = logging.getLogger(__name__)
IMPLS = ("auto", "xla", "cudnn", "pallas")
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def unsupported_reason(q: jax.Array, k: jax.Array, kv_segment_ids: jax.Array | None = None) -> str | None:
    """Why our Pallas kernel can't take this call on this backend (None when it can)."""
    backend = jax.default_backend()
    if backend == "tpu":
        from jaxllm.kernels.flash_attention import pallas_tpu  # noqa: PLC0415 (TPU only)

        if kv_segment_ids is not None:
            return "separate kv_segment_ids (the TPU splash path takes one segment_ids)"
        return pallas_tpu.unsupported_reason(q, k)
    return pallas_gpu.unsupported_reason(q, k, backend)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array | None = None,
                 kv_segment_ids: jax.Array | None = None) -> str:
    """The backend `auto` stands for on this platform and shape (q: [B, T, H, D], k: [B, S, K, D])."""
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


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    kv_length: jax.Array | None = None,
) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, S, K, D]; segment_ids: [B, T] (0 = padding). Returns [B, T, H, D].

    Position-based causality (q_positions / kv_positions) is for KV-cache decoding: one new token per row
    (T = 1) with kv_length (the cache columns written so far) goes to our Pallas decode kernel under "auto" on a
    GPU and under "pallas" on a GPU or the CPU (interpret mode; kernels/flash_attention/decode.py); everything
    else there, and a TPU, uses "xla".
    """
    if q_positions is not None:
        if _decode_kernel_takes(impl, q, k, kv_length):
            return _per_shard(decode.decode_attention, (q, k, v, q_positions, kv_positions, kv_segment_ids, kv_length),
                              (Q_AXES, KV_AXES, KV_AXES, ("batch", None), ("batch", "seq"), ("batch", "seq"), ()))
        return reference.attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   causal=causal, q_positions=q_positions, kv_positions=kv_positions)
    impl = resolve_impl(impl, q, k, kv_segment_ids)
    if impl == "xla":
        return reference.attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   causal=causal, q_positions=q_positions, kv_positions=kv_positions)
    if impl == "cudnn":
        mask = None
        if segment_ids is not None:
            mask = reference.mask(q.shape[1], k.shape[1], segment_ids=segment_ids,
                                  kv_segment_ids=kv_segment_ids, causal=False)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    reason = unsupported_reason(q, k, kv_segment_ids)
    if reason is not None:
        raise ValueError(f"attention impl 'pallas' can't run this shape: {reason}; use impl='auto' or 'xla'")
    return _per_shard(lambda q, k, v, s, ks: _pallas(q, k, v, s, ks, causal), (q, k, v, segment_ids, kv_segment_ids),
                      (Q_AXES, KV_AXES, KV_AXES, ("batch", "seq"), ("batch", "seq")))


def decode_kernels_enabled(impl: str) -> bool:
    """Whether impl on this backend may use our Pallas decode kernels (attention, the decode step, SwiGLU,
    top-k): auto on a GPU, pallas on a GPU or the CPU (interpret mode, for tests); never on a TPU (no TPU
    decode kernels)."""
    backend = jax.default_backend()
    return impl in ("auto", "pallas") and backend != "tpu" and (impl == "pallas" or backend == "gpu")


def _decode_kernel_takes(impl: str, q: jax.Array, k: jax.Array, kv_length: jax.Array | None) -> bool:
    """Whether a KV-cache attention call goes to the decode kernel (else the "xla" reference)."""
    if kv_length is None or q.shape[1] != 1 or not decode_kernels_enabled(impl):
        return False
    reason = decode.unsupported_reason(q, k, gpu=jax.default_backend() == "gpu")
    if reason is not None:
        _say_once(f"attention: decoding falls back from the Pallas decode kernel to xla: {reason}")
    return reason is None


def decode_step_takes(impl: str, qkv_shape: tuple[int, ...], n_heads: int, cache_shape: tuple[int, ...],
                      norm_width: int | None = None) -> bool:
    """Whether a decode step (one new token per row, fused q/k/v projection qkv [B, H+2K, D]) runs as one
    kernel (decode.decode_step: RoPE, cache write and attention; with norm_width, the width of an un-normed
    input whose RMSNorm scale the kernel applies). Same backends as the decode kernel; a shape it can't take
    runs RoPE, the cache write and `attention` as separate ops, saying once why."""
    if not decode_kernels_enabled(impl):
        return False
    mesh = rules.active_mesh()
    shards = 1 if mesh is None else _ways(mesh, "kv_heads")
    b, rows, d = qkv_shape
    if n_heads % shards or cache_shape[2] % shards:
        reason = f"{n_heads} query / {cache_shape[2]} KV heads do not split over {shards} devices"
    else:
        local = (b, (n_heads + 2 * cache_shape[2]) // shards, d)
        reason = decode.step_unsupported_reason(local, n_heads // shards,
                                                (*cache_shape[:2], cache_shape[2] // shards, d),
                                                gpu=jax.default_backend() == "gpu", norm_width=norm_width)
    if reason is not None:
        _say_once(f"attention: a decode step runs as separate RoPE, cache-write and attention ops: {reason}")
    return reason is None


def decode_step(qkv: jax.Array, n_heads: int, cos: jax.Array, sin: jax.Array, cache: tuple[jax.Array, jax.Array],
                q_positions: jax.Array, kv_positions: jax.Array, kv_segment_ids: jax.Array, index: jax.Array,
                norm_x: jax.Array | None = None, eps: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """decode.decode_step (see there for shapes and norm_x) on each device's shard under a mesh: batch split,
    and heads split by giving each device its own query heads' and KV heads' rows of qkv."""
    mesh = rules.active_mesh()
    if mesh is None:
        return decode.decode_step(qkv, n_heads, cos, sin, *cache, q_positions, kv_positions, kv_segment_ids, index,
                                  norm_x=norm_x, eps=eps)
    kh = cache[0].shape[2]
    q, k, v = jnp.split(qkv, [n_heads, n_heads + kh], axis=1)  # each device takes its heads of each

    def local(q, k, v, cos, sin, cache_k, cache_v, q_positions, kv_positions, kv_segment_ids, index, norm_x):
        return decode.decode_step(jnp.concatenate([q, k, v], axis=1), q.shape[1], cos, sin, cache_k, cache_v,
                                  q_positions, kv_positions, kv_segment_ids, index, norm_x=norm_x, eps=eps)

    heads, kv_heads, row = ("batch", "heads", "head_dim"), ("batch", "kv_heads", "head_dim"), ("batch", None)
    return _per_shard(local, (q, k, v, cos, sin, *cache, q_positions, kv_positions, kv_segment_ids, index, norm_x),
                      (heads, kv_heads, kv_heads, row, row, KV_AXES, KV_AXES, row, ("batch", "seq"),
                       ("batch", "seq"), (), row), out_axes=(heads, KV_AXES, KV_AXES))


def decode_mlp_takes(impl: str, rows: int, d_model: int, d_ff: int) -> bool:
    """Whether a decode step's MLP runs its RMSNorm scale and SwiGLU as one Pallas kernel (kernels/swiglu.py,
    with the norm weight folded): the decode kernels' backends, on one device (under a mesh XLA runs it)."""
    if not decode_kernels_enabled(impl) or rules.active_mesh() is not None:
        return False
    reason = swiglu.unsupported_reason(rows, d_model, d_ff)
    if reason is not None:
        _say_once(f"decoding: the MLP's norm scale and SwiGLU run as XLA ops: {reason}")
    return reason is None


def _ways(mesh, logical_axis: str) -> int:
    """How many devices split a logical axis on this mesh."""
    entry = _mesh_spec(mesh, (logical_axis,))[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[n] for n in names]))


def _pallas(q, k, v, segment_ids, kv_segment_ids, causal):
    if jax.default_backend() == "tpu":
        from jaxllm.kernels.flash_attention import pallas_tpu  # noqa: PLC0415 (TPU only)

        return pallas_tpu.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    if jax.default_backend() == "gpu":
        reason = pallas_gpu.mosaic_forward_reason(q.shape, k.shape, q.dtype, causal)
        if reason is not None:
            _say_once(f"attention: the flash forward runs as the portable Triton kernel, not Mosaic GPU: {reason}")
        reason = pallas_gpu.mosaic_backward_reason(q.shape, k.shape, q.dtype, causal)
        if reason is not None:
            _say_once(f"attention: gradients, where taken, run the portable Triton backward, not Mosaic GPU: {reason}")
    return pallas_gpu.flash_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                      causal=causal)


def _mesh_spec(mesh, logical_axes: tuple[str, ...]) -> P:
    """rules.spec limited to the axes this mesh has (size-1 or absent axes replicate)."""
    names = set(mesh.axis_names)
    out = []
    for entry in rules.spec(logical_axes):
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a in names)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)


Q_AXES, KV_AXES = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")


def _per_shard(fn, args: tuple, axes: tuple, out_axes: tuple | None = None):
    """fn(*args), a Pallas kernel, on each device's shard under a mesh (batch and heads split, sequence whole);
    axes: each argument's logical axes (() for a replicated scalar); the output is laid out like args[0] (q),
    or, for several outputs, by out_axes (a tuple of logical axes per output).

    A pallas_call has no partitioning rule, so without this XLA would gather the whole batch to every device.
    """
    mesh = rules.active_mesh()
    if mesh is None:
        return fn(*args)
    specs = tuple(None if x is None else _mesh_spec(mesh, a) for x, a in zip(args, axes))
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit meshes: move the data first
        args = tuple(x if x is None else jax.reshard(x, spec) for x, spec in zip(args, specs))
    out_specs = specs[0] if out_axes is None else tuple(_mesh_spec(mesh, a) for a in out_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
