"""Reward model: the backbone (from an SFT or pre-training run) plus a scalar head, trained with the
Bradley-Terry loss on preference pairs; reports held-out accuracy (chosen scored above rejected).

Each side of a pair is scored as one sequence: the chat template's user turn (prompt), assistant turn
(response) and EOS; the reward is the head on the mean final hidden state over its tokens (pooling=mean,
the default) or on the hidden state at that last token (pooling=last), models/heads.py. Both
sides of every pair are in the same batch: tokens and mask [B, 2, T], side 0 chosen, side 1 rejected.

Reward run layout (what PPO reads), runs/<train.name>/:
  config.yaml         the resolved RewardConfig; `model` is the backbone's ModelConfig
  tokenizer.json      the tokenizer with the template's special tokens (use the same one for the policy)
  checkpoints/<step>/ Orbax; state.params = {"backbone": <transformer params>, "head": {"w": [D], "b": []}}
  reward_stats.json   {"mean", "std", "count", "step", "heldout_accuracy"}: raw rewards of the training
                      pairs (both sides) at the final step; PPO normalises with (r - mean) / std
  data_report.json, metrics.jsonl
`load_reward_model(run_dir)` returns (cfg, tokenizer, params, stats); `heads.score(params, cfg.model,
tokens, mask, cfg.pooling)` -> raw rewards [B] for rows made by `formats.encode_scored` (any padding side);
`ppo_score_fn(run_dir)` is the `score(batch) -> [B]` that rl/ppo_loop.py takes (EOS appended, normalised).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint, config as config_lib, losses, models, optim
from jaxllm.config import CheckpointConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import formats, instructions, tokenizer as tokenizers
from jaxllm.data.pipeline import DataError, fingerprint, train_batches
from jaxllm.models import heads
from jaxllm.stages import common, sft
from jaxllm.train import loop, state as state_lib, step as step_lib

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class RewardDataConfig:
    path: str = "builtin"  # builtin (stdlib preference set) or a .jsonl of preference records
    heldout_path: str = ""
    heldout_fraction: float = 0.05
    seq_len: int = 128
    long_policy: str = "truncate"  # truncate (prompt from the left) | drop
    max_bad_ratio: float = 0.05
    epochs: float = 1.0  # used when train.steps = 0
    max_modules: int = 0
    near_misses: int = 1  # builtin: pairs per instruction, each with another same-module near miss
    methods: bool = False  # builtin: also methods of public classes (about 3.5x the pairs)
    tokenizer: str = "builtin"  # only without init.run
    max_documents: int = 0
    template: formats.ChatTemplate = formats.ChatTemplate()


@dataclass(frozen=True)
class RewardLossConfig:
    margin: float = 0.0  # required gap r_chosen - r_rejected
    center_coef: float = 0.0  # weight of mean((r_chosen + r_rejected)^2), e.g. 0.01


@dataclass(frozen=True)
class RewardConfig:
    model: ModelConfig = ModelConfig()  # ignored when init.run is set
    data: RewardDataConfig = RewardDataConfig()
    loss: RewardLossConfig = RewardLossConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=50, weight_decay=0.0)
    train: TrainConfig = TrainConfig(name="rm", steps=0, batch_size=32, eval_every=100)
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    init: common.InitConfig = common.InitConfig()
    # mean: the head on the mean final hidden state over the sequence's real tokens (learns the built-in set
    # from a tiny model, see docs/sft_reward.md); last: on the hidden state at the final EOS token.
    pooling: str = "mean"
    # A tiny model trained from random init (no init.run) learns the built-in set only with both of these
    # (docs/sft_reward.md): match_init > 0 sets every layer's W_k = W_q (scaled by it), so attention starts out
    # favouring equal tokens; probe_head fits the head by ridge regression on the training pairs first.
    match_init: float = 0.0
    probe_head: bool = False


def validate(cfg: RewardConfig) -> RewardConfig:
    shared = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(RewardDataConfig)
              if f.name not in ("near_misses", "methods")}
    as_sft = sft.SFTConfig(model=cfg.model, optim=cfg.optim, train=cfg.train, init=cfg.init,
                           data=sft.SFTDataConfig(**shared))
    sft.validate(as_sft)
    if cfg.loss.margin < 0 or cfg.loss.center_coef < 0:
        raise config_lib.ConfigError("loss.margin and loss.center_coef must be >= 0")
    if cfg.data.near_misses < 1:
        raise config_lib.ConfigError(f"data.near_misses={cfg.data.near_misses} must be >= 1")
    if cfg.match_init < 0 or (cfg.match_init and (cfg.init.run or cfg.model.n_kv_heads != cfg.model.n_heads)):
        raise config_lib.ConfigError(f"match_init={cfg.match_init} needs a random init (no init.run) with "
                                     "model.n_kv_heads == model.n_heads, and must be >= 0; set match_init=0")
    if cfg.pooling not in heads.POOLINGS:
        raise config_lib.ConfigError(f"pooling={cfg.pooling!r} is not one of {', '.join(heads.POOLINGS)}")
    return cfg


def load(path=None, overrides=()) -> RewardConfig:
    return config_lib.load(path, overrides, cls=RewardConfig, validator=validate)


# ---------------------------------------------------------------------------------------------------------
# Data.


def _records(d: RewardDataConfig, counts: formats.Counts):
    if d.path == "builtin":
        train, held = instructions.preference_records(d.heldout_fraction, d.max_modules, d.near_misses, d.methods)
        counts.records += len(train) + len(held)
        return train, held
    return formats.read_split(d.path, d.heldout_path, d.heldout_fraction, counts)


def encode_pairs(records, tok, d: RewardDataConfig, counts: formats.Counts) -> dict[str, np.ndarray]:
    """{tokens, mask}: [N, 2, seq_len] int32 (side 0 chosen, 1 rejected; mask 1 = real token)."""
    eos, pad = tokenizers.eos_id(tok), tokenizers.pad_id(tok)
    sides: dict[str, list] = {s: [] for s in SIDES}
    for where, record in records:
        try:
            triple = formats.preference_triple(record)
        except formats.BadRecord as e:
            counts.bad_record(where, e)
            continue
        if triple is None:
            counts.ties += 1
            continue
        prompt, chosen, rejected = triple
        enc, cut = zip(*[formats.encode_scored(tok, d.template, prompt, r, eos, d.seq_len, d.long_policy)
                         for r in (chosen, rejected)])
        if any(e is None for e in enc):
            counts.dropped_long += 1
            continue
        counts.truncated += int(any(cut))
        counts.kept += 1
        for side, e in zip(SIDES, enc):
            sides[side].append(e)
    padded = [formats.pad_rows(sides[side], d.seq_len, pad) for side in SIDES]
    return {"tokens": np.stack([p[0] for p in padded], axis=1), "mask": np.stack([p[1] for p in padded], axis=1)}


def load_data(cfg: RewardConfig, tok):
    d = cfg.data
    counts = formats.Counts()
    train_rec, held_rec = _records(d, counts)
    train, held = encode_pairs(train_rec, tok, d, counts), encode_pairs(held_rec, tok, d, counts)
    counts.check_ratio(d.max_bad_ratio, d.path)
    n_train, n_held = len(train["tokens"]), len(held["tokens"])
    if not n_train or not n_held:
        raise DataError(f"data.path={d.path}: {n_train} training and {n_held} held-out pairs remain ({counts.bad} "
                        f"bad, {counts.ties} ties, {counts.dropped_long} too long); need at least one of each")
    log.info("preference data: %d records, %d pairs kept, %d bad, %d ties, %d too long; %d train / %d held-out",
             counts.records, counts.kept, counts.bad, counts.ties, counts.dropped_long, n_train, n_held)
    return formats.Rows(train), formats.Rows(held), counts


# ---------------------------------------------------------------------------------------------------------
# The stage.


def pair_rewards(params, model_cfg: ModelConfig, batch: dict, pooling: str = "mean") -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) from one forward over both sides. batch: tokens, mask [B, 2, T]."""
    b, _, t = batch["tokens"].shape
    rewards = heads.score(params, model_cfg, batch["tokens"].reshape(2 * b, t), batch["mask"].reshape(2 * b, t),
                          pooling)
    rewards = rewards.reshape(b, 2)  # [B, 2]
    return rewards[:, 0], rewards[:, 1]


def loss_fn(params, batch, rng, *, cfg: RewardConfig):
    del rng
    r_chosen, r_rejected = pair_rewards(params, cfg.model, batch, cfg.pooling)
    return losses.bradley_terry(r_chosen, r_rejected, margin=cfg.loss.margin, center_coef=cfg.loss.center_coef)


def make_rewards_fn(model_cfg: ModelConfig, batch_size: int, pooling: str = "mean"):
    """rows (a Rows of pairs) -> (r_chosen [N], r_rejected [N]) as float64 NumPy, in fixed-shape batches."""
    one = jax.jit(partial(pair_rewards, model_cfg=model_cfg, pooling=pooling))

    def rewards(params, rows: formats.Rows, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
        n = min(len(rows), limit) if limit else len(rows)
        out_c, out_r = [], []
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size) % n  # wrap the last batch to keep one shape
            batch = {k: v[idx] for k, v in rows.arrays.items()}
            rc, rr = jax.device_get(one(params, batch=batch))
            keep = min(batch_size, n - start)
            out_c.append(rc[:keep]), out_r.append(rr[:keep])
        return np.concatenate(out_c).astype(np.float64), np.concatenate(out_r).astype(np.float64)

    return rewards


def pair_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, margin: float = 0.0) -> dict:
    diff = r_chosen - r_rejected
    both = np.concatenate([r_chosen, r_rejected])
    return {"loss": float(np.mean(np.logaddexp(0.0, -(diff - margin)))), "accuracy": float(np.mean(diff > 0)),
            "margin": float(np.mean(diff)), "reward_mean": float(both.mean()), "reward_std": float(both.std())}


def init_params(cfg: RewardConfig):
    """(cfg with the backbone's model, tokenizer, {"backbone", "head"} params)."""
    d = cfg.data
    model_cfg, tok, backbone = common.start(cfg.model, cfg.init, d.template, tokenizer=d.tokenizer,
                                  max_documents=d.max_documents, seed=cfg.train.seed, seq_len=d.seq_len)
    # w ~ N(0, 1/(D+1)): initial rewards are O(1) and differ between sequences, so the backbone gets gradients.
    params = heads.from_backbone(backbone, model_cfg, cfg.train.seed, std=(model_cfg.d_model + 1.0) ** -0.5)
    if cfg.match_init:
        layers = params["backbone"]["layers"]
        wq = layers["wq"] * cfg.match_init  # [L, D, H, K]
        params["backbone"]["layers"] = {**layers, "wq": wq, "wk": wq + 0.0}  # a copy: buffers are donated
    return dataclasses.replace(cfg, model=model_cfg), tok, params


def fit_head(params, cfg: RewardConfig, rows: formats.Rows, *, ridge: float = 1e-3, spread: float = 2.0,
             limit: int = 4096) -> dict:
    """The head {"w", "b"} by ridge regression on the pooled-feature differences of (up to limit) pairs.

    x_i = pooled(chosen_i) - pooled(rejected_i) [N, D], standardised per feature; w solves
    (X^T X + ridge N I) w = X^T 1 in float64 (least squares toward r_chosen - r_rejected = 1), scaled so the
    reward differences have std `spread`. The backbone is unchanged."""
    pooled = jax.jit(partial(heads.hidden_mean if cfg.pooling == "mean" else heads.hidden_at_last, cfg=cfg.model))
    n = min(len(rows), limit)
    sides = []
    for side in range(2):
        out = [np.asarray(pooled(params["backbone"], tokens=rows.arrays["tokens"][s:min(s + 256, n), side],
                                 mask=rows.arrays["mask"][s:min(s + 256, n), side])) for s in range(0, n, 256)]
        sides.append(np.concatenate(out).astype(np.float64))
    x = sides[0] - sides[1]  # [N, D]
    scale = x.std(axis=0) + 1e-12
    xs = x / scale
    w = np.linalg.solve(xs.T @ xs + ridge * n * np.eye(x.shape[1]), xs.sum(axis=0)) / scale
    w *= spread / max((x @ w).std(), 1e-12)
    log.info("probe head: training accuracy %.4f on %d pairs", np.mean(x @ w > 0), n)
    return {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def run(cfg: RewardConfig) -> Path:
    """Train (or resume) runs/<train.name>; writes reward_stats.json; returns the run directory."""
    cfg, tok, params = init_params(cfg)
    train_rows, held_rows, counts = load_data(cfg, tok)
    if cfg.probe_head:
        params = {**params, "head": fit_head(params, cfg, train_rows)}
    steps = cfg.train.steps or max(1, int(cfg.data.epochs * len(train_rows) / cfg.train.batch_size))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    run_dir = Path(cfg.train.runs_dir) / cfg.train.name
    loop.prepare_run_dir(run_dir, config_lib.to_dict(cfg), compare=("model", "data", "init"))
    tok.save(str(run_dir / "tokenizer.json"))
    (run_dir / "data_report.json").write_text(json.dumps(dataclasses.asdict(counts), indent=1))
    optimizer = optim.adamw(cfg.optim, steps)
    state = state_lib.create(params, optimizer, cfg.train.seed)
    log.info("reward model: %.2fM parameters, %d steps over %d pairs", models.count_params(params) / 1e6, steps,
             len(train_rows))
    rewards = make_rewards_fn(cfg.model, min(cfg.train.batch_size, len(held_rows)), cfg.pooling)
    held_limit = cfg.train.eval_batches * cfg.train.batch_size

    def evaluate(p) -> dict:
        return pair_metrics(*rewards(p, held_rows, held_limit), margin=cfg.loss.margin)

    fp = fingerprint({"data": config_lib.to_dict(cfg.data), "tok": tokenizers.fingerprint(tok),
                      "batch": cfg.train.batch_size, "seed": cfg.train.seed})
    hooks = loop.Hooks(train_step=step_lib.make_train_step(partial(loss_fn, cfg=cfg), optimizer,
                                                           accum_steps=cfg.optim.accum_steps,
                                                           lr_schedule=optim.schedule(cfg.optim, steps)),
                       batches=train_batches(train_rows, cfg.train.batch_size, cfg.train.seed),
                       evaluate=evaluate, data_fingerprint=fp)
    state = loop.fit(run_dir=run_dir, state=state, hooks=hooks, steps=steps, ckpt_cfg=cfg.checkpoint,
                     train_cfg=cfg.train)
    held = evaluate(state.params)
    r_c, r_r = rewards(state.params, train_rows, 64 * cfg.train.batch_size)
    both = np.concatenate([r_c, r_r])
    stats = {"mean": float(both.mean()), "std": float(max(both.std(), 1e-6)), "count": int(both.size),
             "step": int(state.step), "heldout_accuracy": held["accuracy"]}
    (run_dir / "reward_stats.json").write_text(json.dumps(stats, indent=1))
    log.info("held-out accuracy %.4f (%d pairs); reward mean %.4f std %.4f", held["accuracy"],
             min(len(held_rows), held_limit), stats["mean"], stats["std"])
    return run_dir


def load_reward_model(run_dir: str | Path):
    """(RewardConfig, tokenizer, params {"backbone", "head"}, stats dict) of a trained reward run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise config_lib.ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the directory "
                                     "of a trained reward run, e.g. --run runs/rm-tiny")
    cfg = config_lib.load(run_dir / "config.yaml", cls=RewardConfig)
    if "pooling:" not in (run_dir / "config.yaml").read_text():  # runs from before the field: EOS pooling
        cfg = dataclasses.replace(cfg, pooling="last")
    tok = tokenizers.load(run_dir / "tokenizer.json")
    _, backbone = models.abstract(cfg.model)
    abstract = {"backbone": backbone, "head": {"w": jax.ShapeDtypeStruct((cfg.model.d_model,), jnp.float32),
                                               "b": jax.ShapeDtypeStruct((), jnp.float32)}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    params, _ = checkpoint.restore_params(run_dir / "checkpoints", abstract)
    stats_path = run_dir / "reward_stats.json"
    if not stats_path.is_file():
        raise checkpoint.CheckpointError(f"{stats_path} is missing: the reward run did not finish; run "
                                         "`jaxllm reward` with the same config to complete it")
    return cfg, tok, params, json.loads(stats_path.read_text())


def _score_items(record) -> list[tuple[str, str, str]]:
    """[(output key, prompt, response)] of one record: a {"prompt", "response"} or a preference record."""
    if isinstance(record, dict) and "response" in record and "prompt" in record:
        return [("reward", formats._text(record, "prompt"), formats._text(record, "response"))]
    triple = formats.preference_triple(record)
    if triple is None:
        raise formats.BadRecord("a tie has no chosen side; give response_A/response_B with preference A or B")
    prompt, chosen, rejected = triple
    return [("reward_chosen", prompt, chosen), ("reward_rejected", prompt, rejected)]


def score_file(run_dir: str | Path, input_path: str | Path, out, *, batch_size: int = 32) -> formats.Counts:
    """Write one JSON line per valid input record to `out`: the record plus raw and normalised rewards."""
    cfg, tok, params, stats = load_reward_model(run_dir)
    d, counts = cfg.data, formats.Counts()
    eos, pad = tokenizers.eos_id(tok), tokenizers.pad_id(tok)
    jobs, records = [], []  # jobs: (record index, key, Encoded)
    for where, record in formats.read_jsonl(input_path, counts):
        try:
            items = _score_items(record)
        except formats.BadRecord as e:
            counts.bad_record(where, e)
            continue
        encoded = [formats.encode_scored(tok, d.template, p, r, eos, d.seq_len, "truncate")[0] for _, p, r in items]
        if any(e is None for e in encoded):
            counts.bad_record(where, formats.BadRecord(f"the response alone exceeds data.seq_len={d.seq_len}"))
            continue
        counts.kept += 1
        jobs += [(len(records), key, e) for (key, _, _), e in zip(items, encoded)]
        records.append(record)
    fn = jax.jit(partial(heads.score, pooling=cfg.pooling), static_argnums=1)
    values = []
    for start in range(0, len(jobs), batch_size):
        chunk = [e for _, _, e in jobs[start:start + batch_size]]
        tokens, mask = formats.pad_rows(chunk + chunk[-1:] * (batch_size - len(chunk)), d.seq_len, pad)
        values += jax.device_get(fn(params, cfg.model, tokens, mask))[: len(chunk)].tolist()
    for (i, key, _), value in zip(jobs, values):
        records[i][key] = value
        records[i][key + "_normalized"] = (value - stats["mean"]) / stats["std"]
    for record in records:
        out.write(json.dumps(record) + "\n")
    return counts


def with_eos(tokens: jax.Array, mask: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """Append EOS after each row's last real token: tokens, mask [B, T] -> [B, T + 1] (one pad column added)."""
    b = tokens.shape[0]
    tokens = jnp.concatenate([tokens, jnp.zeros((b, 1), tokens.dtype)], axis=1)  # [B, T+1]
    mask = jnp.concatenate([(mask != 0).astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1)
    slot = heads.last_token_index(mask) + 1  # [B]
    rows = jnp.arange(b)
    return tokens.at[rows, slot].set(eos_id), mask.at[rows, slot].set(1)


def ppo_score_fn(run_dir: str | Path, *, normalize: bool = True):
    """PPO's plug point: score(batch) -> float32 [B] from a reward run.

    batch: tokens, segment_ids [B, T] of rendered prompt + sampled response (the SFT template's
    `<|user|>...<|end|><|assistant|>\\n` prompt and a response that ends at `<|end|>`); padding anywhere (segment
    id 0) is skipped. EOS is appended after the last real token, as in training; rewards are normalised with
    the run's reward_stats.json unless normalize=False.
    """
    cfg, tok, params, stats = load_reward_model(run_dir)
    eos = tokenizers.eos_id(tok)
    mean, std = (stats["mean"], stats["std"]) if normalize else (0.0, 1.0)

    @jax.jit
    def score(batch: dict) -> jax.Array:
        tokens, mask = with_eos(batch["tokens"], batch["segment_ids"], eos)
        return (heads.score(params, cfg.model, tokens, mask, cfg.pooling) - mean) / std

    return score
