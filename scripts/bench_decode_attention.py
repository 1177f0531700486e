"""Benchmark the Pallas decode-attention kernel against the XLA path on the decode shapes of bench_generate.py.

  python scripts/bench_decode_attention.py --out bench_decode_attention.jsonl      # on the GPU machine

One new query per row (batch 64) against a cache of 256 columns of which `--length` are written; the 124m
(12 KV heads, d64, no GQA) and 1b (8 KV heads of 2 query heads, d128) shapes, bf16. For each launch setting
(largest key block, warps, stages) it prints microseconds per call and the bandwidth of the K/V bytes read,
after checking the output against the float32 reference (relative L2 error). Protocol: two warm-ups, then
the median of --iters calls, each ended with a device sync (shared BENCHMARKS.md). Each call runs the kernel
--chain times in a row inside one jit (each output is the next query), so host dispatch does not hide it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.decode import attention as decode
from jaxllm.kernels.flash_attention import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_fn  # noqa: E402 (median seconds after two warm-ups)

SHAPES = {"124m": (64, 12, 12, 64), "1b": (64, 16, 8, 128)}  # batch, query heads, KV heads, head dim


def case(b, h, kh, d, s, length, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.bfloat16) for _ in range(2))
    cols = np.arange(s)[None].repeat(b, 0)
    kv_seg = jnp.asarray((cols < length).astype(np.int32))
    return q, k, v, jnp.full((b, 1), length - 1, jnp.int32), jnp.asarray(cols, jnp.int32), kv_seg


def chained(attend, chain: int):
    """jit of `chain` dependent calls: the output of one is the query of the next (nothing to hoist or skip)."""
    def run(q, *rest):
        return jax.lax.fori_loop(0, chain, lambda _, q: attend(q, *rest).astype(q.dtype), q)
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decode_attention.jsonl")
    ap.add_argument("--length", type=int, default=192, help="cache columns written (of 256)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--chain", type=int, default=100, help="kernel calls per timed jit call")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--stages", default="2,3")
    args = ap.parse_args()
    rows = []
    for name, (b, h, kh, d) in SHAPES.items():
        inputs = case(b, h, kh, d, 256, args.length)
        q, k, v, q_pos, kv_pos, kv_seg = inputs
        length = jnp.int32(args.length)
        want = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids=jnp.ones((b, 1)),
                                   kv_segment_ids=kv_seg, q_positions=q_pos, kv_positions=kv_pos)
        kv_bytes = 2 * b * args.length * kh * d * 2
        xla = lambda q, k, v, qp, kp, ks: reference.attention(  # noqa: E731
            q, k, v, segment_ids=jnp.ones((q.shape[0], 1), jnp.int32), kv_segment_ids=ks, q_positions=qp,
            kv_positions=kp)
        variants = [("xla", None, xla, inputs), ("ours", "default", decode.decode_attention, (*inputs, length))]
        ints = [[int(x) for x in a.split(",")] for a in (args.blocks, args.warps, args.stages)]
        for blk, warps, stages in itertools.product(*ints):
            setting = dict(block=blk, warps=warps, stages=stages)
            fn = lambda *a, setting=setting: decode.decode_attention(*a, **setting)  # noqa: E731
            variants.append(("ours", setting, fn, (*inputs, length)))
        for impl, setting, fn, fn_args in variants:
            try:
                out = jax.jit(fn)(*fn_args).astype(jnp.float32)
                err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
                us = time_fn(chained(fn, args.chain), fn_args, args.iters) * 1e6 / args.chain
            except Exception as e:  # noqa: BLE001 (a launch setting that does not compile: report it)
                print(f"# {name} {impl} {setting}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row = {"bench": "decode_attention", "shape": name, "impl": impl, "setting": setting, "us": us,
                   "rel_err": err, "kv_gb_per_s": kv_bytes / us / 1e3, "length": args.length,
                   "card": jax.devices()[0].device_kind, "jax": jax.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    for name in SHAPES:
        best = sorted((r for r in rows if r["shape"] == name), key=lambda r: r["us"])[:6]
        print(f"# {name} fastest:", [(r["impl"], r["setting"], round(r["us"], 1)) for r in best], flush=True)
        print(f"# {name} xla / default:", [round(r["us"], 1) for r in rows if r["shape"] == name
                                           and r["setting"] in (None, "default")], flush=True)


if __name__ == "__main__":
    main()
