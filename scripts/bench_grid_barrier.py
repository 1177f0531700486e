"""What a kernel boundary costs next to a grid-wide barrier inside one kernel (Mosaic GPU; the question behind a
persistent decode-layer kernel, docs/benchmarks.md).

  python scripts/bench_grid_barrier.py --out bench_grid_barrier.jsonl      # on a Hopper GPU

1. A grid barrier over one CTA per SM: each CTA adds 1 to a global semaphore and waits, without decrementing,
   until it reads ctas * (round + 1); at the end each CTA signals an exit semaphore and CTA 0, once every CTA has
   exited, takes the counter back to 0 for the next call. Wall time of 1 vs --rounds barriers (median of 30) gives
   microseconds per barrier; beside it, an empty kernel's cost in a chain inside a `fori_loop`. (Nothing is
   computed to check: a barrier that did not wait, or a counter not taken back to 0 between the timed calls,
   would show as a per-barrier time near 0; one that never released would hang the call.)
2. Two dependent streaming phases shaped like the 1b decode's o then gate/up weights (each CTA reads its slice
   of A, then of B, through TMA into a shared-memory ring, nothing computed): as two kernels, as one kernel with
   no dependency between them (the bound), with the grid barrier between them, and with B's first blocks issued
   before the barrier. GPU kernel time from the profiler, over --copies distinct buffers per call (cold L2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_fn  # noqa: E402 (median seconds after two warm-ups)
from bench_decode_step import kernel_us  # noqa: E402 (mean profiler kernel time)

R, C, SLOTS = 32, 128, 8  # a block: 32 x 128 bf16 (8 KB); blocks in flight per ring
# Blocks per CTA of A and B: 8.7 MB and 47.6 MB over 132 CTAs (the 1b o and gate/up weights); NA <= SLOTS, so
# all of A is issued at once.
NA, NB = 8, 44


def _plgpu():
    import jax.experimental.pallas as pl  # noqa: PLC0415 (GPU only)
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

    return pl, plgpu


def _barrier(plgpu, sems, ctas: int, r) -> None:
    plgpu.semaphore_signal(sems.at[0], 1, memory_scope="gpu")
    plgpu.semaphore_wait(sems.at[0], ctas * (r + 1), decrement=False, memory_scope="gpu")


def _exit(pl, plgpu, sems, ctas: int, rounds: int) -> None:
    """Every CTA checks out; CTA 0 then takes the round counter back to 0 (no CTA reads it any more)."""
    plgpu.semaphore_signal(sems.at[1], 1, memory_scope="gpu")

    @pl.when(lax.axis_index("sm") == 0)
    def _():
        plgpu.semaphore_wait(sems.at[1], ctas, memory_scope="gpu")
        plgpu.semaphore_wait(sems.at[0], ctas * rounds, memory_scope="gpu")


def _kernel(body, ctas: int, name: str):
    _, plgpu = _plgpu()
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ctas, 128), jnp.float32), grid=(ctas,),
                        grid_names=("sm",), kernel_name=name)


def barrier_kernel(rounds: int, ctas: int):
    pl, plgpu = _plgpu()

    def body(x_ref, o_ref):
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))
        lax.fori_loop(0, rounds, lambda r, c: (_barrier(plgpu, sems, ctas, r), c)[1], 0)
        _exit(pl, plgpu, sems, ctas, rounds)

    return _kernel(body, ctas, f"jaxllm_grid_barrier_{rounds}")


def _stream(plgpu, ref, i, n: int, smem, bars, first: int = 0) -> None:
    """CTA i's blocks first..n-1 of ref (blocks 0..first-1 already issued into slots 0..first-1), <= SLOTS in flight."""
    for j in range(first, n):
        if j >= SLOTS:
            plgpu.barrier_wait(bars.at[j % SLOTS])
        plgpu.copy_gmem_to_smem(ref.at[i, j], smem.at[j % SLOTS], bars.at[j % SLOTS])
    for j in range(max(n - SLOTS, 0), n):
        plgpu.barrier_wait(bars.at[j % SLOTS])


def phase_kernel(mode: str, ctas: int):
    """mode: a, b (one phase), ab (both, no dependency), barrier (grid barrier between), prefetch (B's first
    SLOTS blocks issued before A is waited for and before the barrier)."""
    pl, plgpu = _plgpu()

    def body(a_ref, b_ref, c_ref, o_ref):
        i = lax.axis_index("sm")

        def scoped(sa, ba, sb, bb):
            if mode in ("a", "ab"):
                _stream(plgpu, a_ref, i, NA, sa, ba)
            if mode in ("b", "ab"):
                _stream(plgpu, b_ref, i, NB, sb, bb)
            if mode in ("barrier", "prefetch"):
                sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))
                early = SLOTS if mode == "prefetch" else 0
                for j in range(NA):
                    plgpu.copy_gmem_to_smem(a_ref.at[i, j], sa.at[j % SLOTS], ba.at[j % SLOTS])
                for j in range(early):
                    plgpu.copy_gmem_to_smem(b_ref.at[i, j], sb.at[j], bb.at[j])
                for j in range(NA):
                    plgpu.barrier_wait(ba.at[j % SLOTS])
                _barrier(plgpu, sems, ctas, 0)
                _stream(plgpu, b_ref, i, NB, sb, bb, first=early)
                _exit(pl, plgpu, sems, ctas, 1)

        pl.run_scoped(scoped, plgpu.SMEM((SLOTS, R, C), jnp.bfloat16), plgpu.Barrier(num_barriers=SLOTS),
                      plgpu.SMEM((SLOTS, R, C), jnp.bfloat16), plgpu.Barrier(num_barriers=SLOTS))

    return _kernel(body, ctas, f"jaxllm_phases_{mode}")


def wall_us(fn, args, iters: int = 30) -> float:
    """Median wall microseconds per call after two warm-ups."""
    return time_fn(fn, args, iters) * 1e6


def barrier_rows(ctas: int, rounds: int) -> list[dict]:
    x = jnp.zeros((ctas, 128), jnp.float32)
    one, many = (wall_us(jax.jit(barrier_kernel(n, ctas)), (x,)) for n in (1, rounds))
    empty = _kernel(lambda x_ref, o_ref: None, ctas, "jaxllm_empty")
    four = lambda i, x: empty(empty(empty(empty(x))))  # noqa: E731
    loop1, loop64 = (wall_us(jax.jit(lambda x, n=n: lax.fori_loop(0, n, four, x)), (x,)) for n in (1, 64))
    return [{"bench": "grid_barrier", "ctas": ctas, "us_per_barrier": (many - one) / (rounds - 1)},
            {"bench": "empty_kernel_in_loop", "ctas": ctas, "us_per_kernel": (loop64 - loop1) / (63 * 4)}]


def phase_rows(ctas: int, copies: int, calls: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), 2 * copies)
    bufs = [(jax.random.normal(keys[2 * k], (ctas, NA, R, C), jnp.bfloat16),
             jax.random.normal(keys[2 * k + 1], (ctas, NB, R, C), jnp.bfloat16)) for k in range(copies)]
    c0 = jnp.zeros((ctas, 128), jnp.float32)
    ka, kb = phase_kernel("a", ctas), phase_kernel("b", ctas)
    variants = {"two kernels": lambda a, b, c: kb(a, b, ka(a, b, c))}
    variants.update({mode: phase_kernel(mode, ctas) for mode in ("ab", "barrier", "prefetch")})
    rows = []
    for name, k in variants.items():
        fn = jax.jit(lambda bufs, k=k: [k(a, b, c0) for a, b in bufs])
        us, _ = kernel_us(fn, bufs, calls, copies, "jaxllm_phases", feed_back=False)
        rows.append({"bench": "two_phases", "variant": name, "ctas": ctas, "kernel_us": us,
                     "mb": ctas * (NA + NB) * R * C * 2 / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_grid_barrier.jsonl")
    ap.add_argument("--rounds", type=int, default=257)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("bench_grid_barrier.py needs a Hopper GPU (Mosaic GPU kernels); this machine has none")
    ctas = jax.devices()[0].core_count  # one CTA per SM: every CTA resident, as a grid barrier needs
    rows = barrier_rows(ctas, args.rounds) + phase_rows(ctas, args.copies, args.calls)
    card = {"card": jax.devices()[0].device_kind, "jax": jax.__version__}
    with open(args.out, "a") as f:
        for row in rows:
            print(json.dumps({**row, **card}), flush=True)
            f.write(json.dumps({**row, **card}) + "\n")


if __name__ == "__main__":
    main()
