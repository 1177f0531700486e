"""Attention benchmark: our Pallas flash kernel vs cuDNN vs XLA, in one run on one GPU.

    python scripts/bench_attention.py --out bench.jsonl [--seqs 1024,2048,...] [--dims 64,128] [--sweep]
                                      [--impls pallas,triton,cudnn,xla]

Checks every kernel against the float32 reference first (forward and gradients, with segment ids, GQA and
ragged lengths), then times forward and forward+backward (warm-up 2, median of --iters calls) for
bf16, 16 heads, 16k tokens per batch, causal and not: ours as `auto` runs it (`pallas`: the Mosaic GPU forward
and backward on Hopper), ours with the portable Triton kernels forced (`triton`), cuDNN and XLA. FLOPs:
forward 4*B*H*S^2*D (halved when causal),
forward+backward 3.5x forward. Prints one table; writes JSON lines. Also reports the compiled temp memory
of forward+backward at the longest S (O(S) check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from jaxllm.kernels.flash_attention import pallas_gpu, reference

TOKENS = 16384
HEADS = 16


def impls(blocks=None):
    """name -> attention(q, k, v, causal, segment_ids) in the [B, T, H, D] layout. "pallas" is ours as `auto`
    runs it (the Mosaic GPU forward and backward on Hopper where they take the shape); "triton" forces the
    portable kernels."""
    return {
        "pallas": lambda q, k, v, c, seg=None: pallas_gpu.flash_attention(q, k, v, causal=c, segment_ids=seg,
                                                                         blocks=blocks),
        "triton": lambda q, k, v, c, seg=None: pallas_gpu.flash_attention(q, k, v, causal=c, segment_ids=seg,
                                                                         blocks=blocks, forward_kernel="triton",
                                                                         backward_kernel="triton"),
        "cudnn": lambda q, k, v, c, seg=None: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                            implementation="cudnn"),
        "xla": lambda q, k, v, c, seg=None: reference.attention(q, k, v, causal=c, segment_ids=seg),
    }


def inputs(b, s, h, kh, d, dtype, seed):
    """Random q [B,S,H,D], k, v [B,S,K,D], output cotangent."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
    return q, k, v, jax.random.normal(ks[3], (b, s, h, d), dtype)


def fwd_bwd(fn, causal, seg=None):
    """jitted (q, k, v, do) -> (o, dq, dk, dv)."""
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal, seg), q, k, v)
        return (o, *vjp(do))
    return jax.jit(run)


def rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def check(blocks_for) -> list[dict]:
    """Ours vs the float32 reference on upcast inputs: segment ids, GQA, ragged S, all head dims."""
    rows = []
    half = (jnp.bfloat16, jnp.float16)
    cases = [(2, 1000, 8, 2, 64, True, True, half), (1, 777, 4, 4, 128, True, False, half),
             (2, 512, 8, 1, 128, False, True, half), (1, 640, 4, 2, 256, True, True, half),
             (1, 2048, 16, 16, 128, True, False, half), (1, 300, 4, 2, 64, True, True, (jnp.float32,)),
             (1, 300, 4, 2, 128, True, True, (jnp.float32,)), (1, 300, 4, 2, 256, False, False, (jnp.float32,))]
    for b, s, h, kh, d, causal, with_seg, dtypes in cases:
        for dtype in dtypes:
            q, k, v, do = inputs(b, s, h, kh, d, dtype, seed=s + d)
            seg = None
            if with_seg:
                seg = jnp.broadcast_to((jnp.arange(s) * 3 // s + 1).astype(jnp.int32), (b, s))
                seg = seg.at[:, -17:].set(0)  # padding tail: fully masked rows
            ours = fwd_bwd(lambda q, k, v, c, sg: pallas_gpu.flash_attention(
                q, k, v, causal=c, segment_ids=sg, blocks=blocks_for(d, jnp.dtype(dtype).itemsize)),
                causal, seg)(q, k, v, do)
            up = [x.astype(jnp.float32) for x in (q, k, v, do)]
            ref = fwd_bwd(lambda q, k, v, c, sg: reference.attention(q, k, v, causal=c, segment_ids=sg),
                          causal, seg)(*up)
            errs = [rel_err(a, r) for a, r in zip(ours, ref)]
            nan = any(bool(jnp.isnan(a.astype(jnp.float32)).any()) for a in ours)
            tol = 2e-2 if dtype != jnp.float32 else 5e-3  # float32 inputs run TF32 matmuls (~3e-4)
            row = dict(kind="check", b=b, s=s, h=h, kh=kh, d=d, causal=causal, seg=with_seg,
                       dtype=jnp.dtype(dtype).name, err_o=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
                       nan=nan, ok=(not nan) and max(errs) < tol)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def time_fn(fn, args, iters):
    """Median seconds per call after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(name, fn, s, d, causal, mode, iters):
    """One timing row (TFLOP/s) or the error that stopped it."""
    b = max(1, TOKENS // s)
    q, k, v, do = inputs(b, s, HEADS, HEADS, d, jnp.bfloat16, seed=1)
    flops = 4 * b * HEADS * s * s * d * (0.5 if causal else 1.0) * (3.5 if mode == "fwd+bwd" else 1.0)
    row = dict(kind="time", impl=name, s=s, d=d, b=b, h=HEADS, causal=causal, mode=mode, dtype="bfloat16")
    try:
        if mode == "fwd":
            jf = jax.jit(lambda q, k, v: fn(q, k, v, causal))
            sec = time_fn(jf, (q, k, v), iters)
        else:
            sec = time_fn(fwd_bwd(fn, causal), (q, k, v, do), iters)
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
    except Exception as e:  # noqa: BLE001 (a backend that can't run a shape is a row, not a crash)
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print(json.dumps(row), flush=True)
    return row


def memory_row(s, d):
    """Compiled temp bytes of forward+backward at one long sequence, ours vs XLA (O(S) vs O(S^2))."""
    q, k, v, do = inputs(1, s, HEADS, HEADS, d, jnp.bfloat16, seed=2)
    row = dict(kind="memory", s=s, d=d, h=HEADS, s2_f32_bytes_per_head=s * s * 4)
    for name, fn in impls().items():
        try:
            stats = fwd_bwd(fn, True).lower(q, k, v, do).compile().memory_analysis()
            row[f"{name}_temp_bytes"] = int(stats.temp_size_in_bytes)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_temp_bytes"] = f"{type(e).__name__}"
    print(json.dumps(row), flush=True)
    return row


def sweep_d64(iters, s=4096) -> list[dict]:
    """A few tile shapes for d64 (causal, S 4096): fwd and fwd+bwd."""
    B = pallas_gpu.Blocks
    configs = [pallas_gpu.default_blocks(64),
               B(q=128, k=128, warps=4, stages=3, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2),
               B(q=128, k=64, warps=8, stages=3, bwd_q=64, bwd_k=128, bwd_warps=4, bwd_stages=2),
               B(q=128, k=64, warps=4, stages=3, bwd_q=128, bwd_k=64, bwd_warps=8, bwd_stages=2, dq_q=128, dq_k=64)]
    rows = []
    for blocks in configs:
        for mode in ("fwd", "fwd+bwd"):
            row = bench_one("pallas", impls(blocks)["pallas"], s, 64, True, mode, iters)
            row["blocks"] = str(blocks)
            rows.append(row)
    for mode in ("fwd", "fwd+bwd"):
        rows.append(bench_one("cudnn", impls()["cudnn"], s, 64, True, mode, iters))
    return rows


def sweep(iters, s=4096) -> list[dict]:
    """Backward block configs for the target case (d128, causal, fwd+bwd), forward settings as default."""
    B = pallas_gpu.Blocks
    fwd = dict(q=128, k=64, warps=8, stages=3)
    configs = [pallas_gpu.default_blocks(128),
               B(**fwd, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=3),
               B(**fwd, bwd_q=32, bwd_k=128, bwd_warps=4, bwd_stages=3, dq_q=128, dq_k=32, dq_stages=3),
               B(**fwd, bwd_q=32, bwd_k=128, bwd_warps=8, bwd_stages=2, dq_q=128, dq_k=64, dq_warps=8),
               B(**fwd, bwd_q=64, bwd_k=128, bwd_warps=8, bwd_stages=2, dq_q=128, dq_k=64, dq_warps=8),
               B(**fwd, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2, dq_q=128, dq_k=64, dq_warps=8),
               B(**fwd, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2, dq_q=128, dq_k=32, dq_warps=4, dq_stages=3),
               B(q=128, k=64, warps=4, stages=3, bwd_q=64, bwd_k=64, bwd_warps=4, bwd_stages=2)]
    rows = []
    for blocks in configs:
        row = bench_one("pallas", impls(blocks)["pallas"], s, 128, True, "fwd+bwd", iters)
        row["blocks"] = str(blocks)
        rows.append(row)
    for name in ("pallas", "cudnn"):
        rows.append(bench_one(name, impls()[name], s, 128, True, "fwd", iters))
    rows[-2]["blocks"] = str(pallas_gpu.default_blocks(128))
    return rows


def table(rows):
    """One printed table: TFLOP/s per impl, and ours / cuDNN."""
    got = {(r["impl"], r["s"], r["d"], r["causal"], r["mode"]): r for r in rows if r["kind"] == "time"}
    keys = sorted({k[1:] for k in got}, key=lambda k: (k[3], k[1], not k[2], k[0]))
    names = ("pallas", "triton", "cudnn", "xla")
    print(f"\n{'mode':8} {'d':>4} {'causal':>6} {'S':>6} | " + " ".join(f"{n:>7}" for n in names) + " | ours/cudnn")
    for s, d, causal, mode in keys:
        vals = [got.get((n, s, d, causal, mode), {}).get("tflops") for n in names]
        cells = [f"{x:7.1f}" if x else f"{'-':>7}" for x in vals]
        ratio = f"{vals[0] / vals[2]:.2f}x" if vals[0] and vals[2] else "-"
        print(f"{mode:8} {d:>4} {str(causal):>6} {s:>6} | {' '.join(cells)} | {ratio}")


def card_name() -> str:
    """nvidia-smi's name for the GPU, or the JAX device kind where nvidia-smi is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return jax.devices()[0].device_kind


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_attention.jsonl")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--causal", default="1,0", help="1 = causal, 0 = not; comma-separated")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch (B = tokens / S)")
    ap.add_argument("--xla-max-seq", type=int, default=8192, help="XLA materialises [S, S]: skip longer S")
    ap.add_argument("--sweep", action="store_true", help="also time a few block configs (d128 causal S4096)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    ap.add_argument("--sweep-d64", action="store_true", help="with --sweep: sweep d64 tiles instead of d128")
    ap.add_argument("--impls", default="pallas,triton,cudnn,xla", help="which implementations to time")
    args = ap.parse_args()
    globals()["TOKENS"] = args.tokens  # a script-level setting, read by bench_one
    env = dict(kind="env", card=card_name(), jax=jax.__version__, jaxlib=jax.lib.__version__,
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(env), flush=True)
    rows = [env]
    if not args.skip_check:
        rows += check(pallas_gpu.default_blocks)
        if not all(r["ok"] for r in rows if r["kind"] == "check"):
            print("CHECK FAILED: not timing a wrong kernel")
    if args.sweep:
        rows += sweep_d64(args.iters) if args.sweep_d64 else sweep(args.iters)
        if args.sweep_only:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            return
    for d in map(int, args.dims.split(",")):
        for causal in [c == "1" for c in args.causal.split(",")]:
            for s in map(int, args.seqs.split(",")):
                for mode in ("fwd", "fwd+bwd"):
                    for name, fn in impls().items():
                        if name not in args.impls.split(",") or (name == "xla" and s > args.xla_max_seq):
                            continue
                        rows.append(bench_one(name, fn, s, d, causal, mode, args.iters))
    rows.append(memory_row(max(map(int, args.seqs.split(","))), 128))
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table(rows)


if __name__ == "__main__":
    main()
