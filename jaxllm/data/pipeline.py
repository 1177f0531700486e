"""Token streams -> packed fixed-length rows (segment ids, positions) -> shuffled batches, on Grain.

Packing is concat-and-chunk: documents (each ending in EOS) are laid end to end and cut into rows of
`seq_len`; every token appears exactly once per epoch. Segment ids number the documents inside a row from 1
(0 is padding) and positions restart at each document and at each row start, so packed documents never
attend to each other. Grain gives the seeded shuffle, per-host slicing and a checkpointable iterator state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass

import grain
import jax
import numpy as np

from jaxllm.data.sources import DataError  # re-exported: callers import it from here


@dataclass(frozen=True)
class TokenStream:
    """Documents laid end to end. tokens: [N] int32; doc_ids: [N] int32 (document index of each token)."""

    tokens: np.ndarray
    doc_ids: np.ndarray

    @staticmethod
    def from_documents(docs: list[list[int]] | list[np.ndarray], eos_id: int | None) -> TokenStream:
        pieces, ids = [], []
        for i, doc in enumerate(docs):
            doc = np.asarray(doc, np.int32)
            if eos_id is not None:
                doc = np.append(doc, np.int32(eos_id))
            pieces.append(doc)
            ids.append(np.full(len(doc), i, np.int32))
        if not pieces:
            raise DataError("no documents to pack: the source is empty or everything was filtered out")
        return TokenStream(np.concatenate(pieces), np.concatenate(ids))

    def check_vocab(self, vocab_size: int, where: str) -> None:
        """Token ids >= vocab_size would make the embedding lookup clamp or return garbage silently."""
        top = int(self.tokens.max(initial=0))
        if top >= vocab_size:
            raise DataError(f"{where}: token id {top} >= model.vocab_size={vocab_size}; use the tokenizer the "
                            "data was built with or raise model.vocab_size")


class PackedRows:
    """Random-access packed rows of a TokenStream (a Grain data source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.n_rows = len(stream.tokens) // seq_len
        if self.n_rows == 0:
            raise DataError(f"{len(stream.tokens)} tokens make no row of data.seq_len={seq_len}; add data or "
                            "lower data.seq_len")

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = int(index) * self.seq_len
        sl = slice(start, start + self.seq_len)
        return pack_row(self.stream.tokens[sl], self.stream.doc_ids[sl])


def pack_row(tokens: np.ndarray, doc_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One row: tokens, segment ids (1, 2, ... by document), positions restarting at each document."""
    new_doc = np.concatenate([[True], doc_ids[1:] != doc_ids[:-1]])
    segment_ids = np.cumsum(new_doc).astype(np.int32)
    idx = np.arange(len(tokens))
    starts = np.maximum.accumulate(np.where(new_doc, idx, 0))
    return {
        "tokens": tokens.astype(np.int32),
        "positions": (idx - starts).astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": np.ones(len(tokens), np.int32),
    }


def fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Mixture:
    """Several random-access row sources with mixture weights (built shards, one source each)."""

    sources: tuple
    weights: tuple

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)


def train_batches(source, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless shuffled batches of this host's slice; each epoch is reshuffled. Checkpointable iterator.

    A Mixture is mixed by its weights (mixed_batches)."""
    if isinstance(source, Mixture):
        return mixed_batches(list(source.sources), list(source.weights), batch_size, seed)
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by {count} hosts")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)  # a new permutation each epoch
    if count > 1:
        ds = ds[index::count]
    return iter(ds.batch(batch_size // count, drop_remainder=True).to_iter_dataset())


def eval_batches(source, batch_size: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first n_batches * batch_size rows in order (fewer if the held-out set is small), fixed per run."""
    n = min(len(source) // batch_size, n_batches)
    if n == 0:
        raise DataError(f"held-out set has {len(source)} rows, fewer than train.batch_size={batch_size}; "
                        "raise data.heldout_fraction or lower the batch size")
    rows = [source[i] for i in range(n * batch_size)]
    return [{k: np.stack([r[k] for r in rows[b * batch_size:(b + 1) * batch_size]]) for k in rows[0]}
            for b in range(n)]


MIX_BLOCK = 1024  # rows per mixing block: each block holds every source's exact quota of rows
PREFETCH = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)  # batches read ahead, in threads


def block_quotas(weights: tuple, block: int = MIX_BLOCK) -> tuple[int, ...]:
    """Rows of each source per block: weights apportioned by largest remainder (they sum to `block`)."""
    raw = np.asarray(weights, np.float64) / np.sum(weights) * block
    quotas = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - quotas), kind="stable")
    quotas[order[: block - quotas.sum()]] += 1
    return tuple(int(q) for q in quotas)


@functools.lru_cache(maxsize=16)
def _block_plan(quotas: tuple, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(source [L], rank [L]): a seeded order of one block's slots, and each slot's rank among its source's."""
    slots = np.random.default_rng([seed, block]).permutation(np.repeat(np.arange(len(quotas)), quotas))
    rank = np.empty(len(slots), np.int64)
    for k in range(len(quotas)):
        where = np.flatnonzero(slots == k)
        rank[where] = np.arange(len(where))
    return slots, rank


@functools.lru_cache(maxsize=16)
def _epoch_order(n_rows: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """A seeded permutation of one source's rows for one of its epochs: [n_rows] int64."""
    return np.random.default_rng([seed, source, epoch]).permutation(n_rows)


@dataclass(frozen=True, eq=False)
class MixedBatches:
    """A Grain random-access source whose element b is this host's slice of global batch b (endless).

    Global row g falls in block g // MIX_BLOCK; the block's seeded plan says which source it comes from and its
    rank r there, so it is row `count = block * quota + r` of that source's stream, which walks the source in a
    fresh seeded permutation each epoch. Proportions are exact per block; small sources repeat (epochs).
    """

    sources: tuple
    weights: tuple
    global_batch: int
    seed: int
    host: int = 0
    hosts: int = 1

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        local = self.global_batch // self.hosts
        rows = int(index) * self.global_batch + self.host * local + np.arange(local)  # global row numbers [b]
        quotas = block_quotas(self.weights)
        blocks, slots = np.divmod(rows, MIX_BLOCK)
        source, count = np.empty(local, np.int64), np.empty(local, np.int64)
        for i, (blk, slot) in enumerate(zip(blocks, slots)):
            plan_source, plan_rank = _block_plan(quotas, self.seed, int(blk))
            source[i] = plan_source[slot]
            count[i] = blk * quotas[source[i]] + plan_rank[slot]
        parts = {}
        for k in np.unique(source):
            n = len(self.sources[k])
            epochs, within = np.divmod(count[source == k], n)
            picked = np.array([_epoch_order(n, self.seed, int(k), int(e))[w] for e, w in zip(epochs, within)])
            parts[k] = self.sources[k].gather(picked)
        out = {key: np.empty((local, *v.shape[1:]), v.dtype) for key, v in next(iter(parts.values())).items()}
        for k, batch in parts.items():
            for key, value in batch.items():
                out[key][source == k] = value
        return out


def mixed_batches(sources: list, weights: list[float], batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless batches of this host's slice, mixing sources by weight; a checkpointable Grain iterator.

    Each source's rows are reshuffled (seeded) every epoch of that source; a row is one source's."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by {count} hosts")
    quotas = block_quotas(tuple(weights))
    if min(quotas) == 0:
        raise DataError(f"mixture weights {list(weights)}: a source with less than 1/{MIX_BLOCK} of the total weight "
                        "would never be read; raise its weight or drop it")
    source = MixedBatches(tuple(sources), tuple(float(w) for w in weights), batch_size, seed, index, count)
    return iter(grain.MapDataset.source(source).to_iter_dataset(PREFETCH))
