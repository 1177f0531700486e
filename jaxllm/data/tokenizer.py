"""Tokenizers through Hugging Face `tokenizers`: load a tokenizer.json, or train a byte-level BPE."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jaxllm.errors import JaxllmError

PAD = "<|pad|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, EOS)


class TokenizerError(JaxllmError):
    pass


def cache_dir() -> Path:
    path = Path(os.environ.get("JAXLLM_CACHE", Path.home() / ".cache" / "jaxllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with PAD=0 and EOS=1; every byte is representable, so no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def train_word_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """BPE over lower-cased pieces: white space dropped, then runs of letters, runs of digits and every other
    character split apart before merging. So `decode_header` and "Decode a header" share the tokens `decode`
    and `header`, which a tiny reward model can match (docs/sft_reward.md). Lossy (no case, no spaces): for
    scoring text, not for generating it. PAD=0, EOS=1; byte-level, so no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), "removed"),
        pre_tokenizers.Split(Regex(r"[a-z]+|[0-9]+|[^a-z0-9]"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}; pass a tokenizer.json or data.tokenizer=builtin")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None


def fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def special_id(tok: Tokenizer, token: str) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise TokenizerError(f"tokenizer has no special token {token!r}; add it or use data.tokenizer=builtin")
    return idx


def eos_id(tok: Tokenizer) -> int:
    return special_id(tok, EOS)


def pad_id(tok: Tokenizer) -> int:
    idx = tok.token_to_id(PAD)
    return 0 if idx is None else idx
