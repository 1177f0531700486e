"""What pre-training reads: a tokenizer plus train and held-out token streams, from the data config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxllm.config import DataConfig
from jaxllm.data import sources, tokenizer as tokenizers
from jaxllm.data.pipeline import DataError, TokenStream, fingerprint

log = logging.getLogger(__name__)


def builtin_tokenizer(vocab_size: int, max_documents: int = 0, words: bool = False) -> Tokenizer:
    """BPE trained on the built-in corpus' training split, cached in the user cache directory.

    words=True: the lossy word BPE (`tokenizer.train_word_bpe`: lower case, no spaces; for scoring, e.g. reward
    models) trained on the first max_documents documents (all of them, not a split: no text is predicted)."""
    key = fingerprint({"v": 1, "python": sys.version, "vocab": vocab_size, "max_docs": max_documents,
                       **({"words": True} if words else {})})
    path = tokenizers.cache_dir() / f"{'words' if words else 'bpe'}-{vocab_size}-{key}.json"
    if path.is_file():
        return tokenizers.load(path)
    docs = _documents(max_documents)
    if words:
        tok = tokenizers.train_word_bpe([text for _, text in docs], vocab_size)
    else:
        train, _ = sources.split_documents(docs, 0.02)
        log.info("training a %d-token byte-level BPE on the built-in corpus (%d documents)", vocab_size, len(train))
        tok = tokenizers.train_bpe(train, vocab_size)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def _documents(max_documents: int) -> list[tuple[str, str]]:
    docs = sources.builtin_documents()
    return docs[:max_documents] if max_documents else docs


def get_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    if cfg.tokenizer in ("builtin", "builtin-words"):
        return builtin_tokenizer(vocab_size, cfg.max_documents, words=cfg.tokenizer == "builtin-words")
    tok = tokenizers.load(cfg.tokenizer)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"data.tokenizer {cfg.tokenizer} has {tok.get_vocab_size()} tokens but model.vocab_size="
                        f"{vocab_size}; set model.vocab_size >= {tok.get_vocab_size()}")
    return tok


def _encode(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts)]


def builtin_streams(cfg: DataConfig, tok: Tokenizer) -> tuple[TokenStream, TokenStream]:
    """Train / held-out streams of the built-in corpus, tokenized once and cached by tokenizer hash."""
    key = fingerprint({"v": 1, "python": sys.version, "tok": tokenizers.fingerprint(tok),
                       "max_docs": cfg.max_documents, "heldout": cfg.heldout_fraction})
    path = tokenizers.cache_dir() / f"builtin-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return (TokenStream(z["train_tokens"], z["train_docs"]), TokenStream(z["held_tokens"], z["held_docs"]))
    train, heldout = sources.split_documents(_documents(cfg.max_documents), cfg.heldout_fraction)
    if not heldout:
        raise DataError(f"data.heldout_fraction={cfg.heldout_fraction} left no held-out document; raise it")
    eos = tokenizers.eos_id(tok)
    train_s = TokenStream.from_documents(_encode(tok, train), eos)
    held_s = TokenStream.from_documents(_encode(tok, heldout), eos)
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, train_tokens=train_s.tokens, train_docs=train_s.doc_ids, held_tokens=held_s.tokens,
             held_docs=held_s.doc_ids)
    tmp.replace(path)
    return train_s, held_s
