"""What fine-tuning stages share: the `init` config section, starting from a run, growing the vocabulary.

Growing the embedding (for special tokens the template adds): rows [V_old, V_new) of `embed` (and columns
of an untied `lm_head`) are set to the mean of the existing rows (columns). This is deterministic (no RNG),
keeps the new tokens' logits at the average of the old ones (the model's output distribution barely moves
at step 0), and is what common fine-tuning recipes do. V_new is the tokenizer's size rounded up to a
multiple of 64, so the vocab axis still shards evenly.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from jaxllm import config as config_lib, models, runs
from jaxllm.config import DataConfig, ModelConfig
from jaxllm.data import corpus, formats

log = logging.getLogger(__name__)
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class InitConfig:
    run: str = ""  # a run directory (pretrain / SFT) to start from; empty: random init of `model`


def run_model_config(run_dir: str | Path) -> ModelConfig:
    """The model section of any stage's run directory (pretrain, SFT, reward)."""
    return runs.model_config(run_dir, what="init.run")


def grow_vocab(params: dict, model_cfg: ModelConfig, new_vocab: int) -> dict:
    """Params with `embed` [V, D] (and untied `lm_head` [D, V]) grown to new_vocab by mean rows."""
    old = model_cfg.vocab_size
    if new_vocab <= old:
        return params
    params = dict(params)
    embed = params["embed"]
    extra = jnp.broadcast_to(embed.mean(axis=0, keepdims=True), (new_vocab - old, embed.shape[1]))
    params["embed"] = jnp.concatenate([embed, extra], axis=0)  # [V_new, D]
    if "lm_head" in params:
        head = params["lm_head"]
        extra = jnp.broadcast_to(head.mean(axis=1, keepdims=True), (head.shape[0], new_vocab - old))
        params["lm_head"] = jnp.concatenate([head, extra], axis=1)  # [D, V_new]
    return params


def start(model_cfg: ModelConfig, init: InitConfig, template: formats.ChatTemplate, *, tokenizer: str,
          max_documents: int, seed: int, seq_len: int):
    """(model_cfg, tokenizer, params) to fine-tune rows of seq_len: from init.run, or random init of model_cfg.

    The template's special tokens are added to the tokenizer; the embedding grows if they do not fit.
    """
    if init.run:
        model_cfg = run_model_config(init.run)
        tok = runs.load_tokenizer(init.run)
        params, step = runs.load_params(init.run, model_cfg, what="init.run")
        log.info("starting from %s (step %d)", init.run, step)
    else:
        tok = corpus.get_tokenizer(DataConfig(tokenizer=tokenizer, max_documents=max_documents),
                                   model_cfg.vocab_size)
        _, params = models.init(model_cfg, seed)
        log.info("starting from a random init (no init.run)")
    if seq_len > model_cfg.max_seq_len:
        raise config_lib.ConfigError(f"data.seq_len={seq_len} exceeds the model's max_seq_len="
                                     f"{model_cfg.max_seq_len}; lower data.seq_len")
    formats.add_special_tokens(tok, template)
    needed = tok.get_vocab_size()
    if needed > model_cfg.vocab_size:
        new_vocab = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        log.info("growing the vocabulary %d -> %d for the template's special tokens (mean-initialised rows)",
                 model_cfg.vocab_size, new_vocab)
        params = grow_vocab(params, model_cfg, new_vocab)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=new_vocab)
    return model_cfg, tok, params
