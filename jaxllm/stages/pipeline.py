"""`jaxllm pipeline`: pretrain -> SFT -> reward model -> PPO on the built-in data with tiny settings (CPU).

Each stage is the ordinary stage with overrides (SIZES), writes runs/<name>-<stage>/, and starts from the
previous stage's run. A finished stage leaves pipeline_done.json (its final metric and wall time) and is
skipped on a re-run; an interrupted one resumes from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from jaxllm import config as config_lib
from jaxllm.logging import read_metrics

log = logging.getLogger(__name__)
STAGES = ("pretrain", "sft", "reward", "ppo")
DONE = "pipeline_done.json"


def _model(d: int, layers: int, heads: int, d_ff: int, vocab: int, seq: int) -> list[str]:
    return [f"model.vocab_size={vocab}", f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}",
            f"model.n_kv_heads={max(1, heads // 2)}", f"model.d_ff={d_ff}", f"model.max_seq_len={seq}",
            "model.dtype=float32"]


# Per size: the overrides of each stage (model and init.run / policy.run are added by `run`).
SIZES = {
    "tiny": {
        "model": _model(64, 2, 4, 192, 1024, 128),
        "pretrain": ["data.seq_len=64", "data.max_documents=2000", "train.steps=300", "train.batch_size=16",
                     "train.eval_every=150", "train.eval_batches=4", "train.sample_every=0", "checkpoint.every=150",
                     "optim.lr=3e-3", "optim.warmup_steps=20"],
        "sft": ["data.seq_len=96", "train.steps=200", "train.batch_size=16", "train.eval_every=100",
                "train.eval_batches=4", "checkpoint.every=100", "optim.lr=1e-3", "optim.warmup_steps=10"],
        "reward": ["data.seq_len=96", "train.steps=120", "train.batch_size=16", "train.eval_every=60",
                   "train.eval_batches=8", "checkpoint.every=60", "optim.lr=3e-4", "optim.warmup_steps=10",
                   "loss.center_coef=0.01"],
        "ppo": ["train.steps=12", "train.batch_size=16", "train.sample_every=4", "checkpoint.every=4",
                "sampling.max_new_tokens=24", "data.max_prompt_tokens=40", "ppo.epochs=2", "ppo.minibatch_size=8",
                "ppo.kl_coef=0.05", "policy_optim.lr=3e-5", "critic_optim.lr=1e-4"],
    },
    "smoke": {
        "model": _model(32, 1, 2, 64, 512, 64),
        "pretrain": ["data.seq_len=32", "data.max_documents=60", "data.heldout_fraction=0.1", "train.steps=2",
                     "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "train.num_samples=1",
                     "train.sample_tokens=2", "checkpoint.every=2", "optim.warmup_steps=1"],
        "sft": ["data.seq_len=48", "data.max_modules=30", "data.heldout_fraction=0.2", "train.steps=2",
                "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "train.num_samples=1",
                "train.sample_tokens=2", "checkpoint.every=2", "optim.warmup_steps=1"],
        "reward": ["data.seq_len=48", "data.max_modules=30", "data.heldout_fraction=0.2", "train.steps=2",
                   "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "checkpoint.every=2",
                   "optim.warmup_steps=1"],
        "ppo": ["data.max_modules=30", "train.steps=1", "train.batch_size=4", "train.num_samples=1",
                "checkpoint.every=1", "sampling.max_new_tokens=4", "data.max_prompt_tokens=40", "ppo.epochs=1",
                "ppo.minibatch_size=4"],
    },
}


def final_metric(stage: str, run_dir: Path) -> dict:
    """The stage's headline number(s) from its run directory."""
    if stage in ("pretrain", "sft"):
        ev = read_metrics(run_dir, "eval")
        return {"eval_loss": ev[-1]["loss"] if ev else float("nan")}
    if stage == "reward":
        stats = json.loads((run_dir / "reward_stats.json").read_text())
        return {"heldout_accuracy": stats["heldout_accuracy"]}
    rows = read_metrics(run_dir, "train")
    k = max(1, min(3, len(rows) // 2))
    return {"reward_first": float(np.mean([r["score_mean"] for r in rows[:k]])),
            "reward_last": float(np.mean([r["score_mean"] for r in rows[-k:]])),
            "kl_ref_last": rows[-1]["kl_ref"]}


def _run_stage(stage: str, overrides: list[str]) -> Path:
    if stage == "pretrain":
        from jaxllm.stages import pretrain
        return pretrain.run(config_lib.load(None, overrides))
    if stage == "sft":
        from jaxllm.stages import sft
        return sft.run(sft.load(None, overrides))
    if stage == "reward":
        from jaxllm.stages import reward
        return reward.run(reward.load(None, overrides))
    from jaxllm.stages import ppo
    return ppo.run(ppo.load(None, overrides))


def stage_overrides(stage: str, size: str, name: str, runs_dir: str) -> list[str]:
    sizes = SIZES[size]
    own = [f"train.name={name}-{stage}", f"train.runs_dir={runs_dir}", "train.progress=false"]
    prev = {"sft": "pretrain", "reward": "sft"}.get(stage)
    if stage == "pretrain":
        own += sizes["model"]
    elif prev:
        own.append(f"init.run={Path(runs_dir) / f'{name}-{prev}'}")
    else:
        own += [f"policy.run={Path(runs_dir) / f'{name}-sft'}", f"reward.run={Path(runs_dir) / f'{name}-reward'}"]
    return sizes[stage] + own


def run(name: str = "pipeline", runs_dir: str = "runs", *, size: str = "tiny", out=print) -> list[dict]:
    """Run (or finish) every stage; returns and prints one summary row per stage."""
    if size not in SIZES:
        raise config_lib.ConfigError(f"pipeline size {size!r} is unknown; choose one of {', '.join(SIZES)}")
    summary = []
    for stage in STAGES:
        run_dir = Path(runs_dir) / f"{name}-{stage}"
        done = run_dir / DONE
        if done.is_file():
            row = dict(json.loads(done.read_text()), skipped=True)
            log.info("pipeline: %s is done (%s), skipping", stage, run_dir)
        else:
            log.info("pipeline: %s -> %s", stage, run_dir)
            start = time.perf_counter()
            _run_stage(stage, stage_overrides(stage, size, name, runs_dir))
            row = {"stage": stage, "run": str(run_dir), "seconds": time.perf_counter() - start,
                   **final_metric(stage, run_dir)}
            done.write_text(json.dumps(row, indent=1))
        summary.append(row)
    out(format_summary(summary))
    return summary


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<9} {'seconds':>8}  final metric                       run"]
    for r in rows:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("stage", "run", "seconds", "skipped"))
        secs = f"{r['seconds']:.1f}" + ("*" if r.get("skipped") else "")
        lines.append(f"{r['stage']:<9} {secs:>8}  {metrics:<34} {r['run']}")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{'total':<9} {total:>8.1f}" + ("  (* = done earlier, skipped now)" if any(
        r.get("skipped") for r in rows) else ""))
    return "\n".join(lines)
