"""Supervised fine-tuning: next-token loss on response tokens only, packed rows, epochs, held-out loss and
sample generations on held-out prompts at each eval.

Data: `data.path=builtin` (the standard-library instruction set, see data/instructions.py) or a JSONL file of
instruction or chat records (data/formats.py). The loss is pretrain's (losses.next_token with loss_mask):
only assistant content and its end marker are targets. A batch with no target token raises DataError
(it can only come from a bug or a broken data file; a silent zero loss would hide it), and every step logs
`loss_tokens`, the number of target tokens in the batch.

Run layout: runs/<train.name>/ holds config.yaml (resolved: `model` is the backbone's, vocab grown if the
template added tokens), tokenizer.json (with the template's special tokens), data_report.json (record
counts: kept, bad, truncated, dropped_long), checkpoints/, metrics.jsonl, samples.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib, models, optim
from jaxllm.config import CheckpointConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import formats, instructions, tokenizer as tokenizers
from jaxllm.data.pipeline import DataError, fingerprint, train_batches
from jaxllm.generate import sampling
from jaxllm.stages import common, pretrain
from jaxllm.train import loop, state as state_lib, step as step_lib

log = logging.getLogger(__name__)
LONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class SFTDataConfig:
    path: str = "builtin"  # builtin (stdlib instruction set) or a .jsonl of instruction / chat records
    heldout_path: str = ""  # optional held-out .jsonl; else a deterministic heldout_fraction of path
    heldout_fraction: float = 0.05
    seq_len: int = 128
    pack: bool = True  # several examples per row (segment ids); False: one padded example per row
    long_policy: str = "truncate"  # truncate (prompt from the left, keep the response) | drop
    max_bad_ratio: float = 0.05  # more malformed records than this fraction is an error
    epochs: float = 3.0  # used when train.steps = 0
    max_modules: int = 0  # builtin set: first N stdlib modules with functions (0: all)
    tokenizer: str = "builtin"  # only without init.run (a run brings its own tokenizer)
    max_documents: int = 0  # builtin tokenizer's corpus size, only without init.run
    template: formats.ChatTemplate = formats.ChatTemplate()


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = ModelConfig()  # ignored when init.run is set (the run's model is used)
    data: SFTDataConfig = SFTDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=100, schedule="cosine", weight_decay=0.0)
    train: TrainConfig = TrainConfig(name="sft", steps=0, batch_size=64, eval_every=100, sample_every=0)
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    init: common.InitConfig = common.InitConfig()


def validate(cfg: SFTConfig) -> SFTConfig:
    d = cfg.data
    if d.long_policy not in LONG_POLICIES:
        raise config_lib.ConfigError(f"data.long_policy={d.long_policy!r} is not allowed; choose one of "
                                     f"{', '.join(LONG_POLICIES)}")
    if not 0.0 < d.heldout_fraction < 0.5:
        raise config_lib.ConfigError(f"data.heldout_fraction={d.heldout_fraction} must be in (0, 0.5)")
    if not 0.0 <= d.max_bad_ratio <= 1.0:
        raise config_lib.ConfigError(f"data.max_bad_ratio={d.max_bad_ratio} must be in [0, 1]")
    if d.epochs <= 0 or d.seq_len <= 0 or cfg.train.steps < 0 or cfg.train.batch_size <= 0:
        raise config_lib.ConfigError("data.epochs, data.seq_len and train.batch_size must be > 0, "
                                     "train.steps >= 0 (0: from data.epochs)")
    if cfg.train.batch_size % cfg.optim.accum_steps:
        raise config_lib.ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                                     f"optim.accum_steps={cfg.optim.accum_steps}")
    if not cfg.init.run:
        config_lib.validate(config_lib.Config(model=cfg.model, optim=cfg.optim, train=dataclasses.replace(
            cfg.train, steps=max(cfg.train.steps, 1)), data=config_lib.DataConfig(seq_len=min(
                d.seq_len, cfg.model.max_seq_len))))
    return cfg


def load(path=None, overrides=()) -> SFTConfig:
    return config_lib.load(path, overrides, cls=SFTConfig, validator=validate)


# ---------------------------------------------------------------------------------------------------------
# Data.


def _records(d: SFTDataConfig, counts: formats.Counts):
    """(train, held-out) lists of (where, record)."""
    if d.path == "builtin":
        train, held = instructions.sft_records(d.heldout_fraction, d.max_modules)
        counts.records += len(train) + len(held)
        return train, held
    return formats.read_split(d.path, d.heldout_path, d.heldout_fraction, counts)


def encode_records(records, tok, d: SFTDataConfig, counts: formats.Counts):
    """[(Encoded, messages)] of the valid records that fit; counts bad / truncated / dropped ones."""
    out = []
    for where, record in records:
        try:
            messages = formats.sft_messages(record, d.template)
        except formats.BadRecord as e:
            counts.bad_record(where, e)
            continue
        full = formats.render(tok, d.template, messages)
        ex = formats.fit_length(full, d.seq_len, d.long_policy)
        if ex is None:
            counts.dropped_long += 1
            continue
        counts.truncated += int(len(ex.ids) < len(full.ids))
        counts.kept += 1
        out.append((ex, messages))
    return out


def load_data(cfg: SFTConfig, tok):
    """(train Rows, held-out Rows, held-out conversations, Counts)."""
    d = cfg.data
    counts = formats.Counts()
    train_rec, held_rec = _records(d, counts)
    train = encode_records(train_rec, tok, d, counts)
    held = encode_records(held_rec, tok, d, counts)
    counts.check_ratio(d.max_bad_ratio, d.path)
    if not train or not held:
        raise DataError(f"data.path={d.path}: {len(train)} training and {len(held)} held-out examples remain "
                        f"({counts.bad} bad, {counts.dropped_long} too long); need at least one of each "
                        "(raise data.seq_len, data.heldout_fraction or give data.heldout_path)")
    pad = tokenizers.pad_id(tok)
    train_rows = formats.Rows(formats.pack_examples([e for e, _ in train], d.seq_len, pad, pack=d.pack))
    held_rows = formats.Rows(formats.pack_examples([e for e, _ in held], d.seq_len, pad, pack=d.pack))
    log.info("SFT data: %d records, %d kept (%d truncated), %d bad, %d too long dropped; %d train rows, "
             "%d held-out rows of %d tokens", counts.records, counts.kept, counts.truncated, counts.bad,
             counts.dropped_long, len(train_rows), len(held_rows), d.seq_len)
    return train_rows, held_rows, [m for _, m in held], counts


def eval_batches(rows: formats.Rows, batch_size: int, n_batches: int) -> list[dict]:
    """Up to n_batches fixed held-out batches (one smaller batch when the held-out set is small)."""
    size = min(batch_size, len(rows))
    n = max(1, min(len(rows) // size, n_batches))
    return [{k: v[b * size:(b + 1) * size] for k, v in rows.arrays.items()} for b in range(n)]


def check_batch(batch: dict) -> dict:
    """Refuse a batch with no target token (host-side, before the device sees it)."""
    if not np.any(batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] != 0)):
        raise DataError("a training batch has no loss token (every response was masked or padded away); "
                        "check the data file and data.seq_len")
    return batch


# ---------------------------------------------------------------------------------------------------------
# The stage.


def loss_fn(params, batch, rng, *, cfg: SFTConfig):
    loss, metrics = pretrain.loss_fn(params, batch, rng, cfg=cfg)
    return loss, dict(metrics, loss_tokens=metrics["weight"])


def make_sample(cfg: SFTConfig, tok, conversations: list[list[dict]]):
    """(params, step) -> samples for the first train.num_samples held-out prompts (greedy-ish, seeded)."""
    template = cfg.data.template
    end_id = tok.token_to_id(formats.special_tokens(template)[-1]) if formats.special_tokens(template) else None
    prompts = []
    for messages in conversations[: cfg.train.num_samples]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        enc = formats.render(tok, template, messages[:last], add_generation_prompt=True)
        prompt_text = messages[last - 1]["content"] if last else ""
        prompts.append((enc.ids[-(cfg.model.max_seq_len - 1):].tolist(), prompt_text, messages[last]["content"]))

    def sample(params, step: int) -> list[dict]:
        out = []
        for i, (ids, prompt, reference) in enumerate(prompts):
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed + 1), step * 100 + i)
            new = sampling.simple_generate(params, cfg.model, ids, key, max_new_tokens=cfg.train.sample_tokens,
                                           temperature=0.7, eos_id=end_id)
            out.append({"prompt": prompt, "text": tok.decode(new), "reference": reference})
        return out

    return sample


def resolve(cfg: SFTConfig):
    """(cfg with the backbone's model, tokenizer, initial params)."""
    d = cfg.data
    model_cfg, tok, params = common.start(cfg.model, cfg.init, d.template, tokenizer=d.tokenizer,
                                  max_documents=d.max_documents, seed=cfg.train.seed, seq_len=d.seq_len)
    return dataclasses.replace(cfg, model=model_cfg), tok, params


def run(cfg: SFTConfig) -> Path:
    """Fine-tune (or resume) runs/<train.name>; returns the run directory."""
    cfg, tok, params = resolve(cfg)
    train_rows, held_rows, held_conv, counts = load_data(cfg, tok)
    steps = cfg.train.steps or max(1, int(cfg.data.epochs * len(train_rows) / cfg.train.batch_size))
    train_cfg = dataclasses.replace(cfg.train, steps=steps, sample_every=cfg.train.sample_every or cfg.train.eval_every)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    run_dir = Path(cfg.train.runs_dir) / cfg.train.name
    resuming = loop.prepare_run_dir(run_dir, config_lib.to_dict(cfg), compare=("model", "data", "init"))
    tok.save(str(run_dir / "tokenizer.json"))
    (run_dir / "data_report.json").write_text(json.dumps(dataclasses.asdict(counts), indent=1))
    optimizer = optim.adamw(cfg.optim, steps)
    state = state_lib.create(params, optimizer, cfg.train.seed)
    log.info("SFT: %.2fM parameters, %d steps (%.2f epochs of %d rows)%s", models.count_params(params) / 1e6,
             steps, steps * cfg.train.batch_size / len(train_rows), len(train_rows), " (resuming)" if resuming else "")
    train_step = step_lib.make_train_step(partial(loss_fn, cfg=cfg), optimizer, accum_steps=cfg.optim.accum_steps,
                                          lr_schedule=optim.schedule(cfg.optim, steps))
    fp = fingerprint({"data": config_lib.to_dict(cfg.data), "tok": tokenizers.fingerprint(tok),
                      "batch": cfg.train.batch_size, "seed": cfg.train.seed})
    hooks = loop.Hooks(
        train_step=train_step, batches=train_batches(train_rows, cfg.train.batch_size, cfg.train.seed),
        put_batch=lambda b: jax.device_put(check_batch(b)),
        evaluate=pretrain.make_evaluate(cfg, eval_batches(held_rows, cfg.train.batch_size, cfg.train.eval_batches)),
        sample=make_sample(cfg, tok, held_conv), data_fingerprint=fp)
    loop.fit(run_dir=run_dir, state=state, hooks=hooks, steps=steps, ckpt_cfg=cfg.checkpoint, train_cfg=cfg.train)
    return run_dir
