"""Benchmark the fused decode-step kernel's K/V bandwidth against an XLA pass that only reads the same bytes.

  python scripts/bench_decode_step.py --out bench_decode_step.jsonl      # on the GPU machine

The 1b shape of bench_generate.py (16 query heads over 8 KV heads, head dim 128, d_model 2048, bf16, a cache of
256 columns): `decode.decode_step` with the RMSNorm scale in the kernel, as the generate loop calls it, for
several batch sizes at --index written columns, and for several indexes at batch 64. Each row gives the
kernel's GPU time (jax.profiler, mean over --calls calls of --copies kernels on distinct caches, so the cache
comes from HBM as in the model, where each layer's weights evict the last layer's cache from L2), the K/V bytes
it reads (the `index` written columns) per microsecond, and, measured in the same run, the GPU time of an XLA
fusion that sums the same K and V columns in float32 (a pure read of the same bytes: the baseline). The kernel's
output is checked against RoPE + the float32 reference attention first (relative L2 error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.decode import attention as decode
from jaxllm.kernels.flash_attention import reference
from jaxllm.models import rope

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_generate import gpu_events  # noqa: E402 ((line, name, start ns, duration ns) of a trace's GPU events)

H, KH, D, DM, S = 16, 8, 128, 2048, 256  # the 1b model's decode shape


def case(b: int, index: int, copies: int, seed: int = 0):
    """Random inputs for `copies` distinct caches; every cache column before `index` is a written key."""
    rng = np.random.default_rng(seed)
    bf16 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)  # noqa: E731
    positions = jnp.full((b, 1), index, jnp.int32)
    cos, sin = (t[:, 0] for t in rope.rope_tables(positions, D, 10000.0))  # [B, D/2] each
    fixed = dict(qkv=bf16(b, H + 2 * KH, D), cos=cos, sin=sin, q_positions=positions,
                 kv_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (b, S)),
                 kv_segment_ids=jnp.ones((b, S), jnp.int32), index=jnp.int32(index))
    return fixed, [(bf16(b, S, KH, D), bf16(b, S, KH, D)) for _ in range(copies)]


def rel_error(fixed: dict, cache: tuple) -> float:
    """The kernel (no norm scale) against the float32 oracle (reference.decode_step), relative L2 error."""
    f = fixed
    args = (f["q_positions"], f["kv_positions"], f["kv_segment_ids"], f["index"])
    got = decode.decode_step(f["qkv"], H, f["cos"], f["sin"], *cache, *args)[0].astype(jnp.float32)
    want = reference.decode_step(f["qkv"], H, *cache, *args)[0]
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def kernel_us(fn, arg, calls: int, per_call: int, name: str | None, feed_back: bool) -> tuple[float, object]:
    """Mean GPU microseconds per kernel named `name` (None: every kernel) over `calls` calls of fn, each running
    per_call of them, and the argument after them; feed_back: fn's result is its next argument (donated caches)."""
    for i in range(calls + 2):  # two warm-ups (compilation out), then the profiled calls
        if i == 2:
            trace_dir = tempfile.mkdtemp()
            jax.profiler.start_trace(trace_dir)
        out = jax.block_until_ready(fn(arg))
        arg = out if feed_back else arg
    jax.profiler.stop_trace()
    events = [e for e in gpu_events(trace_dir) if "Stream" in e[0] and (name is None or name in e[1])]
    shutil.rmtree(trace_dir, ignore_errors=True)
    return sum(dur for *_, dur in events) / 1e3 / (calls * per_call), arg


def measure(b: int, index: int, args) -> dict:
    """One row: the check, then the kernel's and the read-only pass's GPU time at batch b, `index` columns."""
    fixed, caches = case(b, index, args.copies)
    err = rel_error(fixed, caches[0])
    f = fixed

    def steps(caches):  # the norm scale in the kernel, as transformer's decode path calls it
        x = jnp.ones((b, DM), jnp.bfloat16)
        return [decode.decode_step(f["qkv"], H, f["cos"], f["sin"], ck, cv, f["q_positions"], f["kv_positions"],
                                   f["kv_segment_ids"], f["index"], norm_x=x)[1:] for ck, cv in caches]

    step = jax.jit(steps, donate_argnums=0)
    us, caches = kernel_us(step, caches, args.calls, len(caches), "decode_step", feed_back=True)
    read = jax.jit(lambda caches: [jnp.sum(c[:, :index].astype(jnp.float32), axis=1) for pair in caches for c in pair])
    xla_us, _ = kernel_us(read, caches, args.calls, len(caches), None, feed_back=False)
    kv_bytes = 2 * b * index * KH * D * 2
    rate = lambda t: kv_bytes / t / 1e6 if t else float("nan")  # noqa: E731 (no GPU events off a GPU)
    return {"bench": "decode_step", "batch": b, "index": index, "cache": S, "us": us, "rel_err": err,
            "kv_tb_per_s": rate(us), "xla_read_us": xla_us, "xla_read_tb_per_s": rate(xla_us),
            "card": jax.devices()[0].device_kind, "jax": jax.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decode_step.jsonl")
    ap.add_argument("--batches", default="16,32,64,128", help="batch sizes at --index")
    ap.add_argument("--index", type=int, default=192, help="cache columns written (of 256): the generate loop's mean")
    ap.add_argument("--indexes", default="16,64,128,250", help="more indexes, at batch 64")
    ap.add_argument("--copies", type=int, default=4, help="distinct caches per call (cold L2)")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    points = [(int(b), args.index) for b in args.batches.split(",")]
    points += [(64, int(i)) for i in filter(None, args.indexes.split(",")) if (64, int(i)) not in points]
    print("| batch | index | kernel us | K/V TB/s | XLA read-only us | XLA TB/s | rel. error |\n"
          "|---|---|---|---|---|---|---|")
    for b, index in points:
        row = measure(b, index, args)
        print(f"| {b} | {index} | {row['us']:.2f} | {row['kv_tb_per_s']:.2f} | {row['xla_read_us']:.2f} | "
              f"{row['xla_read_tb_per_s']:.2f} | {row['rel_err']:.1e} |", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
