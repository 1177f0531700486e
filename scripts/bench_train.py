"""Pre-training step throughput: jaxllm vs a PyTorch + Hugging Face LlamaForCausalLM peer, same card, same run.

Follows shared BENCHMARKS.md: 2 warm-ups, median of >= 20 steps each ended with block_until_ready, random tokens.
MFU = tokens/s * (6 N + 6 L d S) / peak, N = matmul parameters incl. the LM head, attention halved for causal.

    python scripts/bench_train.py --configs 124m 1b --impls xla cudnn pallas --torch   (GPU)
    python scripts/bench_train.py --tiny                                              (CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to the torch peer

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm.stages import pretrain  # noqa: E402
from jaxllm.train import step as step_lib  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (BENCHMARKS.md uses 989e12)


def matmul_params(m) -> int:
    hd = m.head_dim or m.d_model // m.n_heads
    attn = m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads)
    mlp = 3 * m.d_model * m.d_ff
    return m.n_layers * (attn + mlp) + m.d_model * m.vocab_size  # LM head (the embedding lookup is no matmul)


def flops_per_token(cfg) -> float:
    m = cfg.model
    return 6 * matmul_params(m) + 12 * m.n_layers * m.d_model * cfg.data.seq_len * 0.5


def random_batch(cfg, seed: int = 0) -> dict:
    b, t = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32)
    return {"tokens": jnp.asarray(tokens), "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}


def time_steps(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def bench_jax(cfg, n_steps: int) -> dict:
    _, optimizer, state = pretrain.init_state(cfg, 1000)
    train_step = step_lib.make_train_step(partial(pretrain.loss_fn, cfg=cfg), optimizer)
    batch = random_batch(cfg)
    box = {"state": state}

    def one():
        box["state"], metrics = train_step(box["state"], batch)
        return metrics["loss"]

    losses = [float(one()) for _ in range(2)]  # warm-up (compile) + a finite-loss check
    assert all(np.isfinite(losses)), losses
    return {"median_s": statistics.median(time_steps(one, n_steps))}


def bench_torch(cfg, n_steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                     num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                     max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_embeddings,
                     attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).cuda()  # float32 master weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model)
    tokens = torch.randint(0, m.vocab_size, (cfg.train.batch_size, cfg.data.seq_len), device="cuda")

    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        one()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["124m", "1b"])
    parser.add_argument("--impls", nargs="*", default=["auto"], help="attention impls to time (none: peer only)")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch + HF peer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny config")
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = jax.devices()[0]
    card = getattr(device, "device_kind", str(device))
    peak = next((v for k, v in PEAK.items() if k in card), None)
    rows = []
    names = ["tiny"] if args.tiny else args.configs
    for name in names:
        path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
        base = config_lib.load(path, args.overrides)
        runs = [("jaxllm", impl) for impl in args.impls] + ([("torch", "sdpa")] if args.torch else [])
        for system, impl in runs:
            cfg = config_lib.replace(base, **{"model.attention_impl": impl}) if system == "jaxllm" else base
            try:
                res = bench_jax(cfg, args.steps) if system == "jaxllm" else bench_torch(cfg, args.steps)
            except Exception as e:  # report and go on: one failing variant must not hide the others
                rows.append({"config": name, "system": system, "impl": impl, "error": str(e).splitlines()[0][:200]})
                continue
            tok_s = cfg.train.batch_size * cfg.data.seq_len / res["median_s"]
            mfu = tok_s * flops_per_token(cfg) / peak if peak else float("nan")
            rows.append({"config": name, "system": system, "impl": impl, "card": card, "jax": jax.__version__,
                         "step_ms": res["median_s"] * 1e3, "tokens_per_s": tok_s, "mfu": mfu,
                         "date": time.strftime("%Y-%m-%d")})
    print(f"{'config':<6} {'system':<7} {'impl':<7} {'step ms':>9} {'tokens/s':>11} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<6} {r['system']:<7} {r['impl']:<7} error: {r['error']}")
        else:
            print(f"{r['config']:<6} {r['system']:<7} {r['impl']:<7} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.0f} "
                  f"{r['mfu']:>6.1%}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
