"""Text in, text out around `sampling.generate`: the body of `jaxllm generate` (JSONL prompts -> JSONL results)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxllm import models, runs
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.pipeline import DataError
from jaxllm.generate import sampling


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file: one object per line with a "prompt" string (or a bare JSON string)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}; give a JSONL file with one {{\"prompt\": ...}} per line")
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                            "each line must be {\"prompt\": \"...\"}") from e
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str):
            raise DataError(f"{path}:{lineno}: expected an object with a \"prompt\" string (or a JSON string)")
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def _batches(ids: list[list[int]], batch_size: int) -> Iterator[tuple[int, list[list[int]]]]:
    """(start, batch) with every batch padded to one size (copies of its first row) to reuse one compilation."""
    size = min(batch_size, len(ids))
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        yield start, chunk + [chunk[0]] * (size - len(chunk))


def generate_texts(run_dir: str | Path, prompts: Sequence[str], config: sampling.SamplingConfig, *,
                   batch_size: int, seed: int) -> Iterator[dict]:
    """One result dict per prompt, in order: prompt, text, num_tokens, finish_reason (stop | length), logprob
    (the sum of the returned per-token log-probabilities), step (the checkpoint's)."""
    if batch_size < 1:
        raise DataError(f"--batch-size={batch_size} must be >= 1")
    model_cfg = runs.model_config(run_dir)  # any stage's run: pretrain, SFT, reward's backbone, PPO's policy
    tok = runs.load_tokenizer(run_dir)
    graphdef, _ = models.abstract(model_cfg)
    params, step = runs.load_params(run_dir, model_cfg)
    stop = (tokenizers.eos_id(tok),)
    config = dataclasses.replace(config, stop_tokens=config.stop_tokens or stop, pad_id=tokenizers.pad_id(tok))
    ids = [tok.encode(p).ids for p in prompts]
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise DataError(f"prompt {i} is empty (0 tokens): give some text")
    key = jax.random.PRNGKey(seed)
    prepared = sampling.prepare(params, model_cfg)  # once for all batches
    for start, batch in _batches(ids, batch_size):
        tokens, logprobs, mask = (np.asarray(x) for x in sampling.generate(
            graphdef, params, batch, jax.random.fold_in(key, start), config, prepared=prepared))
        for row in range(min(len(batch), len(ids) - start)):
            n = int(mask[row].sum())
            new = tokens[row, :n].tolist()
            stopped = bool(new) and new[-1] in config.stop_tokens
            yield {"prompt": prompts[start + row], "text": tok.decode(new[:-1] if stopped else new),
                   "num_tokens": n, "finish_reason": "stop" if stopped else "length",
                   "logprob": float(logprobs[row, :n].sum()), "step": step}
