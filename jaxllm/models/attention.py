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
from jax.sharding import PartitionSpec as P

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


def _decode_kernel_takes(impl: str, q: jax.Array, k: jax.Array, kv_length: jax.Array | None) -> bool:
    """Whether a KV-cache attention call goes to the decode kernel (else the "xla" reference)."""
    if impl not in ("auto", "pallas") or kv_length is None or q.shape[1] != 1:
        return False
    backend = jax.default_backend()
    if backend == "tpu" or (impl == "auto" and backend != "gpu"):  # no TPU decode kernel; CPU: tests only
        return False
    reason = decode.unsupported_reason(q, k, gpu=backend == "gpu")
    if reason is not None:
        _say_once(f"attention: decoding falls back from the Pallas decode kernel to xla: {reason}")
    return reason is None


def _pallas(q, k, v, segment_ids, kv_segment_ids, causal):
    if jax.default_backend() == "tpu":
        from jaxllm.kernels.flash_attention import pallas_tpu  # noqa: PLC0415 (TPU only)

        return pallas_tpu.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal)
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


def _per_shard(fn, args: tuple, axes: tuple):
    """fn(*args), a Pallas kernel, on each device's shard under a mesh (batch and heads split, sequence whole);
    axes: each argument's logical axes (() for a replicated scalar); the output is laid out like args[0] (q).

    A pallas_call has no partitioning rule, so without this XLA would gather the whole batch to every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return fn(*args)
    specs = tuple(None if x is None else _mesh_spec(mesh, a) for x, a in zip(args, axes))
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit meshes: move the data first
        args = tuple(x if x is None else jax.reshard(x, spec) for x, spec in zip(args, specs))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
