"""PPO (RLHF) stage: `jaxllm ppo --config configs/ppo_tiny.yaml policy.run=runs/sft reward.run=runs/rm`.

Models: the policy and a frozen reference both start from the SFT run (policy.run); the score comes from a
reward run (reward.run, normalised with its reward_stats.json) or a Python function (reward.fn=module:fn,
see rl/rewards.py); the critic is the reward model's backbone + head (critic.init=reward), a copy of the
policy's backbone with a fresh head (critic.init=policy), or a value head on the policy itself
(critic.init=head). Prompts: the built-in instruction set's instructions (data.path=builtin) or a JSONL of
{"prompt": ...} lines, rendered as a user turn plus the assistant prefix with the SFT run's chat template.
Rollouts use the KV-cache sampler (generate/sampling.py) behind ppo_loop's `generate` interface; the math and the
update are rl/ppo.py, the iteration rl/ppo_loop.py.

Run layout, runs/<train.name>/: config.yaml (resolved; `model` is the policy's), tokenizer.json,
checkpoints/<iteration>/ (the whole PPO state), metrics.jsonl, tensorboard/, samples.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib, models, optim, runs
from jaxllm.config import CheckpointConfig, ConfigError, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import formats, instructions, tokenizer as tokenizers
from jaxllm.data.pipeline import DataError
from jaxllm.generate import sampling, textgen
from jaxllm.logging import RunLog
from jaxllm.models import heads
from jaxllm.parallel import mesh as mesh_lib, rules
from jaxllm.rl import ppo, ppo_loop, rewards
from jaxllm.rl.ppo import PPOConfig
from jaxllm.stages import common, reward as reward_stage, sft
from jaxllm.train import loop

log = logging.getLogger(__name__)
CRITIC_INITS = ("auto", "reward", "policy", "head")


@dataclass(frozen=True)
class PolicyConfig:
    run: str = ""  # the SFT run: the policy and the frozen reference start from its weights


@dataclass(frozen=True)
class RewardSourceConfig:
    run: str = ""  # a reward run (jaxllm reward), or
    fn: str = ""  # a Python function module:function(prompts, responses) -> list[float]
    normalize: bool = True  # reward run only: (r - mean) / std from its reward_stats.json


@dataclass(frozen=True)
class CriticConfig:
    init: str = "auto"  # auto (reward if reward.run else policy) | reward | policy | head (value head on policy)


@dataclass(frozen=True)
class PPODataConfig:
    path: str = "builtin"  # builtin (the instruction set's prompts) or a JSONL of {"prompt": ...} lines
    max_modules: int = 0  # builtin: first N stdlib modules (0: all)
    max_prompts: int = 0  # use only the first N prompts (0: all)
    max_prompt_tokens: int = 48  # longer prompts are skipped (counted in the log)


@dataclass(frozen=True)
class PPOSamplingConfig:
    max_new_tokens: int = 32  # responses longer than this are cut (ppo.cut_penalty applies)
    # the temperature is ppo.temperature: the log-probs and the sampler must agree


@dataclass(frozen=True)
class PPOStageConfig:
    policy: PolicyConfig = PolicyConfig()
    reward: RewardSourceConfig = RewardSourceConfig()
    critic: CriticConfig = CriticConfig()
    data: PPODataConfig = PPODataConfig()
    sampling: PPOSamplingConfig = PPOSamplingConfig()
    ppo: PPOConfig = PPOConfig()
    policy_optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0)
    critic_optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0)
    # steps = PPO iterations (stop_at: stop with a checkpoint after that one); batch_size = prompts (rollouts)
    # per iteration; sample_every in iterations
    train: TrainConfig = TrainConfig(name="ppo", steps=100, batch_size=16, sample_every=10, num_samples=3)
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    mesh: MeshConfig = MeshConfig()  # params sharded by the rules table, rollouts and minibatches by batch
    model: ModelConfig = ModelConfig()  # filled from policy.run (ignored on input)


def validate(cfg: PPOStageConfig) -> PPOStageConfig:
    ppo.validate(cfg.ppo)
    if not cfg.policy.run:
        raise ConfigError("policy.run is empty: pass policy.run=runs/<sft run> (the policy starts from it)")
    if bool(cfg.reward.run) == bool(cfg.reward.fn):
        raise ConfigError("give exactly one of reward.run=runs/<reward run> or reward.fn=module:function")
    if cfg.critic.init not in CRITIC_INITS:
        raise ConfigError(f"critic.init={cfg.critic.init!r} is not allowed; choose one of {', '.join(CRITIC_INITS)}")
    if cfg.critic.init == "reward" and not cfg.reward.run:
        raise ConfigError("critic.init=reward needs reward.run (the critic starts from the reward model); "
                          "use critic.init=policy or head with reward.fn")
    if cfg.train.steps <= 0 or cfg.train.batch_size <= 0 or cfg.sampling.max_new_tokens <= 0:
        raise ConfigError("train.steps, train.batch_size and sampling.max_new_tokens must be > 0")
    if cfg.train.batch_size % cfg.ppo.minibatch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (rollouts per iteration) must be a multiple "
                          f"of ppo.minibatch_size={cfg.ppo.minibatch_size}")
    if cfg.checkpoint.every <= 0:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be > 0 (iterations)")
    return cfg


def load(path=None, overrides=()) -> PPOStageConfig:
    return config_lib.load(path, overrides, cls=PPOStageConfig, validator=validate)


def critic_choice(cfg: PPOStageConfig) -> str:
    if cfg.critic.init != "auto":
        return cfg.critic.init
    return "reward" if cfg.reward.run else "policy"


# ---------------------------------------------------------------------------------------------------------
# Prompts.


def prompt_texts(d: PPODataConfig) -> list[str]:
    if d.path == "builtin":
        train, _ = instructions.sft_records(0.05, d.max_modules)  # the SFT run's training split's instructions
        texts = [rec["instruction"] for _, rec in train]
    else:
        texts = textgen.read_prompts(d.path)
    return texts[: d.max_prompts] if d.max_prompts else texts


def encode_prompts(texts: list[str], tok, template: formats.ChatTemplate, model_cfg: ModelConfig,
                   d: PPODataConfig, s: sampling.SamplingConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(tokens [N, P] left-padded, mask [N, P] 1 = real, kept texts): user turn + assistant prefix."""
    ids, kept = [], []
    limit = min(d.max_prompt_tokens, model_cfg.max_seq_len - s.max_new_tokens)
    for text in texts:
        enc = formats.render(tok, template, [{"role": "user", "content": text}], add_generation_prompt=True)
        if len(enc.ids) <= limit:
            ids.append(enc.ids.tolist())
            kept.append(text)
    if not ids:
        raise DataError(f"data.path={d.path}: none of {len(texts)} prompts fits {limit} tokens (data.max_prompt_"
                        f"tokens={d.max_prompt_tokens}, model.max_seq_len - sampling.max_new_tokens); raise them")
    log.info("PPO prompts: %d of %d fit %d tokens", len(ids), len(texts), limit)
    tokens, lengths = sampling.pad_prompts(ids, model_cfg, s)
    mask = (np.arange(tokens.shape[1])[None, :] >= tokens.shape[1] - lengths[:, None]).astype(np.int32)
    return tokens, mask, kept


# ---------------------------------------------------------------------------------------------------------
# Models and the plug points of rl/ppo_loop.py.


def make_generate(model_cfg: ModelConfig, s: sampling.SamplingConfig):
    """ppo_loop's generate: the KV-cache sampler, its output laid out as prompt + response columns.

    Returns tokens [B, P+N], sample_logprobs [B, P+N] (log pi at the temperature, aligned at [:, t]),
    response_mask [B, P+N].
    """

    @jax.jit
    def generate(params, prompt_tokens, prompt_mask, key):
        p = prompt_tokens.shape[1]
        lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B]
        new, logp, mask = sampling.generate_arrays(params, model_cfg, prompt_tokens, lengths, key, s)
        tokens = jnp.concatenate([prompt_tokens, new], axis=1)  # [B, P+N]
        pad = ((0, 0), (p, 0))
        return tokens, jnp.pad(logp, pad), jnp.pad(mask, pad)

    return generate


def load_policy(run_dir: str):
    """(model_cfg, tokenizer, params, chat template) of the SFT run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"policy.run={run_dir} is not a run directory (no config.yaml); pass the directory of "
                          "a trained SFT run, e.g. policy.run=runs/sft-tiny")
    model_cfg = common.run_model_config(run_dir)
    try:
        template = sft.load(path).data.template
    except ConfigError:  # not an SFT run (e.g. a pre-training run): its tokenizer has no chat tokens
        log.warning("policy.run=%s is not an SFT run; rendering prompts with the default chat template", run_dir)
        template = formats.ChatTemplate()
    tok = runs.load_tokenizer(run_dir)
    params, step = runs.load_params(run_dir, model_cfg, what="policy.run")
    log.info("policy and reference from %s (step %d)", run_dir, step)
    return model_cfg, tok, params, template


def make_score(cfg: PPOStageConfig, tok):
    """(score(batch) -> [B], reward run's (model_cfg, params) or None)."""
    if cfg.reward.fn:
        fn = rewards.load_reward_fn(cfg.reward.fn)
        return rewards.text_score(fn, lambda ids: tok.decode(ids, skip_special_tokens=True),
                                  name=cfg.reward.fn), None
    rm_cfg, rm_tok, rm_params, _ = reward_stage.load_reward_model(cfg.reward.run)
    if tokenizers.fingerprint(rm_tok) != tokenizers.fingerprint(tok):
        raise ConfigError(f"reward.run={cfg.reward.run} uses another tokenizer than policy.run={cfg.policy.run}; "
                          "train the reward model from the SFT run (jaxllm reward init.run=<sft run>)")
    return reward_stage.ppo_score_fn(cfg.reward.run, normalize=cfg.reward.normalize), (rm_cfg.model, rm_params)


def make_critic(cfg: PPOStageConfig, model_cfg: ModelConfig, policy_params, rm):
    """(critic params, critic model config) for critic.init."""
    choice = critic_choice(cfg)
    if choice == "reward":
        rm_model, rm_params = rm
        return rm_params, rm_model
    if choice == "policy":
        return heads.from_backbone(policy_params, model_cfg, cfg.train.seed + 7), model_cfg
    return heads.on_policy(model_cfg, cfg.train.seed + 7), model_cfg


def place(tree, axes_tree, mesh):
    """tree's arrays on the mesh by their logical axes (models.logical_axes / heads.logical_axes)."""
    shardings = rules.logical_shardings(axes_tree, tree, mesh)
    return jax.tree.map(jax.device_put, tree, shardings)


def shard_models(policy_params, critic, model_cfg: ModelConfig, critic_model: ModelConfig, mesh):
    """(policy, critic) placed on the mesh; the reference is the policy's placed copy."""
    policy_params = place(policy_params, models.logical_axes(model_cfg), mesh)
    with_backbone = not ppo.shares_policy_backbone(critic)
    critic = place(critic, heads.logical_axes(critic_model, with_backbone=with_backbone), mesh)
    return policy_params, critic


def optimizer_steps(cfg: PPOStageConfig) -> int:
    return cfg.train.steps * cfg.ppo.epochs * (cfg.train.batch_size // cfg.ppo.minibatch_size)


# ---------------------------------------------------------------------------------------------------------
# The stage.


def make_logger(run_dir: Path, runlog: RunLog, cfg: PPOStageConfig, tok):
    """log(step, metrics, tokens, response_mask): metrics.jsonl / tensorboard, samples.jsonl, progress."""
    last = {"t": time.perf_counter()}
    every = cfg.train.sample_every

    def log_fn(step: int, metrics: dict, tokens, response_mask) -> None:
        now = time.perf_counter()
        metrics = dict(metrics, reward_mean=metrics["score_mean"], reward_std=metrics["score_std"],
                       seconds=now - last["t"])
        last["t"] = now
        runlog.write(step, metrics)
        runlog.progress(1, reward=metrics["score_mean"], kl=metrics["kl_ref"])
        if (every and step % every == 0) or step == cfg.train.steps:
            samples = response_samples(tokens, response_mask, tok, cfg.train.num_samples)
            with (run_dir / "samples.jsonl").open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")
            for s in samples:
                runlog.say(f"--- sample @ {step}: {s['prompt']!r}\n{s['text']}")

    return log_fn


def response_samples(tokens, response_mask, tok, n: int) -> list[dict]:
    """The first n rows decoded: {"prompt", "text"} (special tokens dropped)."""
    prompt_ids, response_ids = rewards.split_rows({"tokens": tokens, "response_mask": response_mask,
                                                   "segment_ids": np.ones_like(np.asarray(tokens))})
    out = []
    for p, r in list(zip(prompt_ids, response_ids))[:n]:
        out.append({"prompt": tok.decode(p, skip_special_tokens=True).strip(),
                    "text": tok.decode(r, skip_special_tokens=True)})
    return out


def setup(cfg: PPOStageConfig):
    """Everything `run` needs: (cfg with model, tok, ref params, state, pieces dict)."""
    model_cfg, tok, policy_params, template = load_policy(cfg.policy.run)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    end_id = tok.token_to_id(formats.special_tokens(template)[-1]) if formats.special_tokens(template) else None
    eos_id = end_id if end_id is not None else tokenizers.eos_id(tok)
    s = sampling.SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.ppo.temperature,
                                stop_tokens=(eos_id,), logprobs="tempered", pad_id=tokenizers.pad_id(tok))
    prompts, prompt_mask, _ = encode_prompts(prompt_texts(cfg.data), tok, template, model_cfg, cfg.data, s)
    score, rm = make_score(cfg, tok)
    critic, critic_model = make_critic(cfg, model_cfg, policy_params, rm)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(mesh, cfg.ppo.minibatch_size, cfg.ppo.accum_steps)
    policy_params, critic = shard_models(policy_params, critic, model_cfg, critic_model, mesh)
    n_opt = optimizer_steps(cfg)
    opt_p, opt_v = optim.adamw(cfg.policy_optim, n_opt), optim.adamw(cfg.critic_optim, n_opt)
    state = ppo.create_state(policy_params, critic, opt_p, opt_v, cfg.ppo, cfg.train.seed)
    pieces = {
        "prompts": prompts, "prompt_mask": prompt_mask, "score": score, "eos_id": eos_id, "mesh": mesh,
        "generate": make_generate(model_cfg, s),
        "forward": ppo_loop.make_rollout_forward(cfg.ppo, policy_model=model_cfg, value_model=critic_model),
        "update": ppo.make_ppo_update(cfg.ppo, policy_model=model_cfg, value_model=critic_model,
                                      policy_optimizer=opt_p, value_optimizer=opt_v),
    }
    log.info("PPO: policy %.2fM parameters, critic %s (%.2fM), %d prompts, %d iterations of %d rollouts",
             models.count_params(policy_params) / 1e6, critic_choice(cfg), models.count_params(critic) / 1e6,
             len(prompts), cfg.train.steps, cfg.train.batch_size)
    return cfg, tok, policy_params, state, pieces


def run(cfg: PPOStageConfig) -> Path:
    """Train (or resume) runs/<train.name>; returns the run directory."""
    cfg, tok, ref_params, state, pieces = setup(cfg)
    run_dir = Path(cfg.train.runs_dir) / cfg.train.name
    resuming = loop.prepare_run_dir(run_dir, config_lib.to_dict(cfg),
                                    compare=("model", "policy", "reward", "critic", "data", "sampling", "ppo"))
    tok.save(str(run_dir / "tokenizer.json"))
    mgr_dir = run_dir / "checkpoints"
    start = 0
    if resuming and mgr_dir.is_dir():
        steps = [int(p.name) for p in mgr_dir.iterdir() if p.name.isdigit()]
        start = max(steps, default=0)
    loop.trim_logs(run_dir, start)
    runlog = RunLog(run_dir, total=cfg.train.steps, initial=start, progress=cfg.train.progress)
    if start:
        runlog.say(f"resuming {run_dir} at iteration {start}")
    stop = min(cfg.train.stop_at, cfg.train.steps) if cfg.train.stop_at else cfg.train.steps
    try:
        with jax.set_mesh(pieces["mesh"]):
            ppo_loop.train(state, ref_params, pieces["prompts"], pieces["prompt_mask"], iterations=stop,
                           batch_size=cfg.train.batch_size, seed=cfg.train.seed, generate=pieces["generate"],
                           score=pieces["score"], forward=pieces["forward"], update=pieces["update"], cfg=cfg.ppo,
                           eos_id=pieces["eos_id"], run_dir=run_dir, every=cfg.checkpoint.every,
                           log=make_logger(run_dir, runlog, cfg, tok))
    finally:
        runlog.close()
    return run_dir
