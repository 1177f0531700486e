"""Seconds per PPO iteration with the rollout / scoring / update split (issue 9's GPU report).

Policy, frozen reference, critic (policy-shaped backbone + value head) and reward model (backbone + scalar head),
all randomly initialised at the config's shape, bf16 compute; 64 prompts of 128 random tokens, 128 new tokens
sampled at temperature 1 with no stop token (every response is full length). Each phase ends with
block_until_ready; 2 warm-up iterations, then the median of --iters.

    python scripts/bench_ppo.py --config configs/124m.yaml      (GPU)
    python scripts/bench_ppo.py --tiny                          (CPU smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import config as config_lib, models, optim  # noqa: E402
from jaxllm.generate import sampling  # noqa: E402
from jaxllm.models import heads  # noqa: E402
from jaxllm.rl import ppo, ppo_loop  # noqa: E402
from jaxllm.stages.ppo import make_generate  # noqa: E402

TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32"]


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/124m.yaml")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    return parser.parse_args()


def _report(record: dict, out: str) -> None:
    """Print the record and a per-phase table; append the record to out (JSONL) when given."""
    med, total = record["seconds"], record["total_s"]
    print(json.dumps(record))
    print(f"{'phase':<16} {'seconds':>8} {'share':>6}")
    for k, v in med.items():
        print(f"{k:<16} {v:>8.3f} {v / total:>6.1%}")
    print(f"{'iteration':<16} {total:>8.3f}")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    args = _args()
    if args.tiny:
        cfg, args.prompts, args.prompt_len, args.new_tokens, args.iters = config_lib.load(None, TINY), 8, 8, 8, 2
    else:
        cfg = config_lib.load(args.config)
    m = cfg.model
    pcfg = ppo.PPOConfig()
    _, policy = models.init(m, 0)
    reference = jax.tree.map(jnp.copy, policy)
    critic = heads.from_backbone(jax.tree.map(jnp.copy, policy), m, 1)
    reward_params = heads.from_backbone(models.init(m, 2)[1], m, 3, std=0.02)
    opt_cfg = config_lib.replace(cfg.optim, lr=1e-6, warmup_steps=0)
    steps = 1000
    policy_opt, value_opt = optim.adamw(opt_cfg, steps), optim.adamw(opt_cfg, steps)
    state = ppo.create_state(policy, critic, policy_opt, value_opt, pcfg, 0)
    s_cfg = sampling.SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    generate = make_generate(m, s_cfg)
    forward = ppo_loop.make_rollout_forward(pcfg, policy_model=m, value_model=m)
    update = ppo.make_ppo_update(pcfg, policy_model=m, value_model=m, policy_optimizer=policy_opt,
                                 value_optimizer=value_opt)
    score_fn = jax.jit(lambda p, b: heads.score(p, m, b["tokens"], (b["segment_ids"] > 0).astype(jnp.int32)))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, m.vocab_size, (args.prompts, args.prompt_len)), jnp.int32)
    prompt_mask = jnp.ones_like(prompts)
    rows = []
    for it in range(2 + args.iters):
        key = jax.random.PRNGKey(it)
        (tokens, sample_lp, response_mask), t_gen = timed(lambda: generate(state.policy_params, prompts,
                                                                           prompt_mask, key))
        batch = ppo_loop.sequence_batch(prompt_mask, tokens, response_mask)
        (logprobs, ref_lp, values), t_fwd = timed(lambda: forward(state.policy_params, reference,
                                                                  state.value_params, batch))
        scores, t_score = timed(lambda: score_fn(reward_params, batch))
        rollout = dict(batch, logprobs=logprobs, ref_logprobs=ref_lp, values=values)

        def adv_and_update():
            r, _ = ppo_loop._advantages(rollout, scores, state.kl.kl_coef, None, cfg=pcfg)
            return update(state, r, key)

        (state, metrics), t_upd = timed(adv_and_update)
        if it >= 2:
            rows.append({"generate": t_gen, "ref_and_values": t_fwd, "reward": t_score, "update": t_upd})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    total = sum(med.values())
    device = jax.devices()[0]
    record = {"bench": "ppo_iteration", "card": getattr(device, "device_kind", str(device)), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "config": "tiny" if args.tiny else args.config,
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "epochs": pcfg.epochs, "minibatch": pcfg.minibatch_size, "seconds": med, "total_s": total,
              "finite_metrics": bool(all(np.isfinite(float(v)) for v in metrics.values()))}
    _report(record, args.out)


if __name__ == "__main__":
    main()
