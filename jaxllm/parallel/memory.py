"""Per-device memory report at start-up: parameters, optimizer state (exact, from the shardings) and an
activation estimate (a formula, labelled as such), next to the device's memory limit when it reports one."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import ModelConfig, head_dim
from jaxllm.parallel import rules


def activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, tensor: int = 1) -> int:
    """Estimated bytes of activations kept for the backward pass on one device.

    rows: batch rows on this device (per microbatch); tensor: ways heads / mlp / vocab are split.
    Per layer and token the forward saves, in the compute dtype: the layer input and two norms (3D),
    q, k, v and the attention output ((2H + 2K)·hd), the gate, up and product of the MLP (3F), plus the
    float32 attention probabilities of the XLA path (H·T). remat="full" keeps only the layer input (and one
    layer's working set); "save_matmuls" keeps the matmul outputs. Logits: float32 [rows, T, V] twice (value
    and softmax gradient).
    """
    item = np.dtype(cfg.dtype).itemsize
    hd = head_dim(cfg)
    h, k = cfg.n_heads / tensor, max(cfg.n_kv_heads / tensor, 1)
    tokens = rows * seq_len
    full_layer = tokens * (item * (3 * cfg.d_model + (2 * h + 2 * k) * hd + 3 * cfg.d_ff / tensor)
                           + 4 * h * seq_len)
    if cfg.remat == "full":
        kept = cfg.n_layers * tokens * item * cfg.d_model + full_layer
    elif cfg.remat == "save_matmuls":
        matmuls = tokens * item * ((h + 2 * k) * hd + cfg.d_model + 2 * cfg.d_ff / tensor + cfg.d_model)
        kept = cfg.n_layers * matmuls + full_layer
    else:
        kept = cfg.n_layers * full_layer
    logits = 2 * tokens * 4 * cfg.vocab_size / tensor
    return int(kept + logits)


def report(abstract_state, shardings, mesh: Mesh, cfg: ModelConfig, *, batch_size: int, seq_len: int,
           accum_steps: int = 1) -> dict:
    """Bytes per device: params and opt_state (exact shard sizes), activations (estimate), total, limit."""
    params = rules.shard_bytes(abstract_state.params, shardings.params)
    opt = rules.shard_bytes(abstract_state.opt_state, shardings.opt_state)
    rows = max(batch_size // accum_steps // (mesh.shape["data"] * mesh.shape["fsdp"]), 1)
    acts = activation_bytes(cfg, rows, seq_len, mesh.shape["tensor"])
    out = {"params": params, "opt_state": opt, "grads": params, "activations_estimate": acts,
           "total": 2 * params + opt + acts}
    stats = _memory_stats(mesh.devices.flat[0])
    if stats.get("bytes_limit"):
        out["device_limit"] = int(stats["bytes_limit"])
    return out


def _memory_stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # CPU devices and some runtimes report nothing
        return {}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def format_report(rep: dict) -> str:
    """One line: 'memory per device: params 12.0 MiB, opt_state 24.0 MiB, ... (device limit 80.0 GiB)'."""
    line = "memory per device: " + ", ".join(f"{k} {human(v)}" for k, v in rep.items() if k != "device_limit")
    if "device_limit" in rep:
        line += f" (device limit {human(rep['device_limit'])}"
        line += "; may not fit)" if rep["total"] > rep["device_limit"] else ")"
    return line


def log_report(rep: dict, log) -> None:
    if jax.process_index() == 0:
        log.info(format_report(rep))
