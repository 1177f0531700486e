"""FSDP scaling: training tokens/s per GPU on 1, 2, 4 ... devices of one host (weak scaling: each device
keeps the config's per-device batch), against the 1-device run measured in the same process.

  python scripts/bench_fsdp.py                          # configs/1b.yaml on 1, 2, 4 GPUs
  python scripts/bench_fsdp.py --devices 1,2 --overlap  # with XLA's latency-hiding scheduler
  python scripts/bench_fsdp.py --tiny                   # a tiny model on 4 simulated CPU devices (smoke test)

Prints one table and appends JSON lines (card, versions, date, step time, tokens/s, per-device tokens/s,
scaling efficiency vs 1 device, MFU) to --out. Target (shared BENCHMARKS.md): >= 90% per-GPU throughput.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

TINY = {"model.vocab_size": 256, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 64, "data.seq_len": 64,
        "train.batch_size": 4}
# configs/1b.yaml's model (BENCHMARKS.md's 1b shape), used when that file is not found.
ONE_B = {"model.vocab_size": 32000, "model.d_model": 2048, "model.n_layers": 16, "model.n_heads": 16,
         "model.n_kv_heads": 8, "model.d_ff": 5632, "model.max_seq_len": 2048, "model.tie_embeddings": False,
         "model.remat": "save_matmuls", "data.seq_len": 2048, "train.batch_size": 8}
PEAK_FLOPS = 989e12  # H100 / H200 dense bf16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/1b.yaml")
    p.add_argument("--devices", default="1,2,4", help="device counts to run, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--batch-per-device", type=int, default=0, help="0: train.batch_size of the config")
    p.add_argument("--mesh", default="fsdp", choices=("fsdp", "data"), help="shard params (fsdp) or replicate")
    p.add_argument("--overlap", action="store_true", help="XLA_FLAGS latency-hiding scheduler (GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny model on 4 simulated CPU devices")
    p.add_argument("--out", default="bench_fsdp.jsonl")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args()


def set_xla_flags(args) -> None:
    """Before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if args.tiny and "device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=4"
    if args.overlap:
        flags += " --xla_gpu_enable_latency_hiding_scheduler=true"
    os.environ["XLA_FLAGS"] = flags.strip()


def load_config(args):
    from jaxllm import config as config_lib

    if args.tiny:
        return config_lib.load(None, [f"{k}={v}" for k, v in TINY.items()] + args.overrides)
    if Path(args.config).is_file():
        return config_lib.load(args.config, args.overrides)
    print(f"{args.config} not found; using the built-in 1b shape", file=sys.stderr)
    return config_lib.load(None, [f"{k}={v}" for k, v in ONE_B.items()] + args.overrides)


def matmul_params(m) -> int:
    """Matmul parameters incl. the LM head (BENCHMARKS.md's N)."""
    from jaxllm.config import head_dim

    hd = head_dim(m)
    per_layer = m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
    return m.n_layers * per_layer + m.d_model * m.vocab_size


def random_batch(cfg, rows: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    t = cfg.data.seq_len
    return {"tokens": rng.integers(0, cfg.model.vocab_size, (rows, t), dtype=np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
            "segment_ids": np.ones((rows, t), np.int32), "loss_mask": np.ones((rows, t), np.int32)}


def run_one(cfg, n: int, args, check_batch: dict) -> dict:
    """Median step time on n devices; also the forward loss on check_batch (for the cross-n check)."""
    from functools import partial

    import jax
    import numpy as np

    from jaxllm import config as config_lib, optim
    from jaxllm.config import MeshConfig
    from jaxllm.parallel import memory, mesh as mesh_lib, rules
    from jaxllm.stages import pretrain
    from jaxllm.train import step as step_lib

    shape = (1, n, 1) if args.mesh == "fsdp" else (n, 1, 1)
    mesh = mesh_lib.make_mesh(MeshConfig(*shape), devices=jax.devices()[:n])
    per_dev = args.batch_per_device or cfg.train.batch_size
    cfg = config_lib.replace(cfg, **{"train.batch_size": per_dev * n})
    optimizer = optim.adamw(cfg.optim, cfg.train.steps)
    make, abstract, shardings = pretrain.plan_state(cfg, optimizer, mesh)
    mem = memory.report(abstract, shardings, mesh, cfg.model, batch_size=cfg.train.batch_size,
                        seq_len=cfg.data.seq_len, accum_steps=cfg.optim.accum_steps)
    with jax.set_mesh(mesh):
        state = rules.init_sharded(make, shardings)
        loss = partial(pretrain.loss_fn, cfg=cfg)
        check = jax.jit(lambda p, b: loss(p, b, None)[0])(state.params, rules.host_batch_to_global(check_batch, mesh))
        step = step_lib.make_train_step(loss, optimizer, state_shardings=shardings,
                                        batch_sharding=rules.batch_sharding(mesh))
        batches = [rules.host_batch_to_global(random_batch(cfg, cfg.train.batch_size, i), mesh) for i in range(2)]
        for i in range(2):  # warm-up: compilation out of the numbers
            state, metrics = step(state, batches[i % 2])
        jax.block_until_ready(state)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    last_loss = float(metrics["loss"])
    del state, batches
    sec = float(np.median(times))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    m = cfg.model
    flops_per_token = 6 * matmul_params(m) + 12 * m.n_layers * m.d_model * cfg.data.seq_len * 0.5
    return {"devices": n, "mesh": list(shape), "global_batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
            "step_s": sec, "tokens_per_s": tokens / sec, "tokens_per_s_per_device": tokens / sec / n,
            "mfu": tokens / sec / n * flops_per_token / PEAK_FLOPS, "check_loss": float(check),
            "last_loss": last_loss, "memory_per_device_mib": {k: v / 2**20 for k, v in mem.items()}}


def main() -> int:
    args = parse_args()
    set_xla_flags(args)
    import jax
    import jaxlib
    import numpy as np

    cfg = load_config(args)
    counts = [int(x) for x in args.devices.split(",")]
    if max(counts) > jax.device_count():
        print(f"only {jax.device_count()} devices; dropping counts above that", file=sys.stderr)
        counts = [c for c in counts if c <= jax.device_count()]
    check_batch = random_batch(cfg, math.lcm(*counts), 99)  # forward-loss check: same rows on every count
    head = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "card": jax.devices()[0].device_kind, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "config": "tiny" if args.tiny else args.config, "overlap": args.overlap, "mesh_kind": args.mesh}
    rows = []
    for n in counts:
        row = {**head, **run_one(cfg, n, args, check_batch)}
        rows.append(row)
        base = rows[0]
        row["scaling_efficiency"] = row["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
        tol = 1e-4 if cfg.model.dtype == "float32" else 2e-2
        if not np.isfinite(row["last_loss"]) or abs(row["check_loss"] - base["check_loss"]) > tol * base["check_loss"]:
            print(f"CHECK FAILED on {n} devices: loss {row['check_loss']} vs {base['check_loss']} on 1st count",
                  file=sys.stderr)
            row["check_failed"] = True
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"\n{head['card']}, jax {head['jax']}, {head['date']}, {head['config']}, mesh={args.mesh}, "
          f"overlap={args.overlap}")
    print(f"{'devices':>7} {'global batch':>12} {'step ms':>9} {'tokens/s':>12} {'tok/s/device':>13} "
          f"{'efficiency':>10} {'MFU':>6} {'mem/device GiB':>15}")
    for r in rows:
        print(f"{r['devices']:>7} {r['global_batch']:>12} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>12,.0f} "
              f"{r['tokens_per_s_per_device']:>13,.0f} {r['scaling_efficiency']:>10.1%} {r['mfu']:>6.1%} "
              f"{r['memory_per_device_mib']['total'] / 1024:>15.2f}")
    return 1 if any(r.get("check_failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
