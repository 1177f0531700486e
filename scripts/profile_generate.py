"""Where a decode step's time goes: kernel counts and GPU time per kernel of one `sampling.generate` call.

  python scripts/profile_generate.py --config 1b --attention-impl auto,xla --out $OUT/profile

For each attention implementation it prints the median call time (batch 64, prompt 128, 128 new tokens,
temperature 1 / top-k 50 as bench_generate.py), then traces one call with `jax.profiler` and prints: kernels
launched per decode step, GPU-busy time vs wall time, and the kernels that took the most GPU time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate  # noqa: E402

from jaxllm.generate import sampling  # noqa: E402


def gpu_events(trace_dir: str) -> list[tuple[str, str, int, int]]:
    """(line name, event name, start ns, duration ns) of every event on the GPU planes of the trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                out.append((line.name, event.name, int(event.start_ns), int(event.duration_ns)))
    return out


def summarise(events, steps: int, wall_s: float, top: int) -> dict:
    by_line = collections.Counter(line for line, *_ in events)
    stream = [e for e in events if "Stream" in e[0]] or events
    kernels = collections.defaultdict(lambda: [0, 0])
    for _, name, _, dur in stream:
        kernels[name][0] += 1
        kernels[name][1] += dur
    busy = sum(d for *_, d in stream)
    span = (max(s + d for _, _, s, d in stream) - min(s for _, _, s, _ in stream)) if stream else 0
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    return {"lines": dict(by_line), "kernel_events": len(stream), "kernels_per_step": len(stream) / steps,
            "gpu_busy_ms": busy / 1e6, "gpu_span_ms": span / 1e6, "wall_ms": wall_s * 1e3,
            "top": [{"name": n[:120], "count": c, "total_ms": t / 1e6, "mean_us": t / c / 1e3} for n, (c, t) in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="1b")
    parser.add_argument("--attention-impl", default="auto,xla",
                        help="comma-separated model.attention_impl values, each with an optional +triton or "
                        "+cublas suffix (the matmul backend)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="/tmp/profile_generate")
    args = parser.parse_args()
    cfg = bench_generate.model_config(args.config)
    _, params = bench_generate.init_params(cfg)
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (64, 128)).astype(np.int32)
    batch = (jnp.asarray(prompts), jnp.full((64,), 128, jnp.int32))
    config = sampling.SamplingConfig(max_new_tokens=128, temperature=1.0, top_k=50, prompt_bucket=128)
    params = jax.block_until_ready(sampling.prepare(params, cfg))  # prepared once, as bench_generate.py does
    for variant in args.attention_impl.split(","):
        # "+triton": XLA's Triton GEMMs, "+cublas": without them; no suffix: what sampling.generate_jit picks
        impl, gemm = (variant.split("+") + [""])[:2]
        model_cfg = dataclasses.replace(cfg, attention_impl=impl)
        options = {"triton": {}, "cublas": {"xla_gpu_enable_triton_gemm": False}}.get(gemm)
        if gemm:
            jitted = jax.jit(sampling.generate_arrays, static_argnames=("model_cfg", "config"),
                             compiler_options=options)
        else:
            jitted = sampling.generate_jit(jax.default_backend(), cfg.d_model)

        def call():
            jax.block_until_ready(jitted(params, model_cfg, *batch, jax.random.key(1), config))

        seconds = bench_generate.timed(call, args.reps)
        trace_dir = os.path.join(args.out, variant)
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
        record = {"config": args.config, "attention_impl": variant, "median_s": seconds,
                  "new_tokens_per_s": 64 * 128 / seconds, "card": jax.devices()[0].device_kind}
        try:
            record.update(summarise(gpu_events(trace_dir), 128, wall, args.top))
        except Exception as e:  # noqa: BLE001 (a diagnostic: report and go on)
            record["profile_error"] = repr(e)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
