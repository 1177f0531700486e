"""Built shards on disk, and reading them back as packed rows for training.

Layout of a built directory (written by `jaxllm data build`):
  manifest.json               build config, tokenizer hash, per source and split: documents, tokens, file hashes
  report.json                 documents and tokens in/out per source and filter
  tokenizer.json              the tokenizer the shards were made with
  <source>/<split>.tokens     flat token ids of the kept documents, each ending in EOS (uint16, or uint32 when
                              the vocabulary needs it), little-endian
  <source>/<split>.index      int64 [documents + 1]: offsets of the document starts in <split>.tokens

Flat arrays + an offset index (rather than ArrayRecord): a packed row is one contiguous slice of a memory-map,
so reading costs a copy of `seq_len` tokens and a binary search; see docs/benchmarks.md for the comparison.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxllm.data.sources import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitWriter:
    """Appends documents (token ids, EOS included) to <dir>/<split>.tokens and records their offsets."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        directory.mkdir(parents=True, exist_ok=True)
        self.tokens_path = directory / f"{split}.tokens"
        self.index_path = directory / f"{split}.index"
        self.dtype = dtype
        self.file = self.tokens_path.open("wb")
        self.offsets = [0]

    def add(self, ids: np.ndarray) -> None:
        self.file.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self) -> dict:
        self.file.close()
        self.index_path.write_bytes(np.asarray(self.offsets, "<i8").tobytes())
        return {"documents": len(self.offsets) - 1, "tokens": self.offsets[-1],
                "tokens_sha256": file_sha256(self.tokens_path), "index_sha256": file_sha256(self.index_path)}


# ---------------------------------------------------------------------------------------------------------
# Reading.


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}; pass data.path=<a directory built by `jaxllm data build`>")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed manifest ({e.msg}); rebuild with `jaxllm data build`") from None


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardRows:
    """Random-access packed rows over one flat token file (a Grain data source).

    tokens: [N] memory-mapped ids; offsets: [D + 1] document starts. Row i is tokens[i*T:(i+1)*T] (the tail
    that fills no row is dropped); segment ids restart at 1 in each row, positions at each document and row.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    seq_len: int
    name: str = ""

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Packed rows [B] -> a batch of [B, T] arrays."""
        return gather_rows(self.tokens, self.offsets, rows, self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = int(index) * self.seq_len
        end = start + self.seq_len
        tokens = self.tokens[start:end].astype(np.int32)  # [T]
        lo, hi = np.searchsorted(self.offsets, [start + 1, end])  # document starts strictly inside the row
        new_doc = np.zeros(self.seq_len, bool)
        new_doc[0] = True
        new_doc[self.offsets[lo:hi] - start] = True
        idx = np.arange(self.seq_len, dtype=np.int32)
        starts = np.maximum.accumulate(np.where(new_doc, idx, 0))
        return {"tokens": tokens, "positions": idx - starts, "segment_ids": np.cumsum(new_doc, dtype=np.int32),
                "loss_mask": np.ones(self.seq_len, np.int32)}


def gather_rows(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows `rows` ([B] int) of a flat token array, packed: the batched ShardRows.__getitem__, vectorised.

    tokens: [N]; offsets: [D + 1] document starts. Returns tokens, positions, segment_ids, loss_mask: [B, T] int32.
    """
    starts = np.asarray(rows, np.int64) * seq_len  # [B]
    idx = np.arange(seq_len)
    out = tokens[starts[:, None] + idx[None, :]].astype(np.int32)  # [B, T]
    lo = np.searchsorted(offsets, starts + 1)  # first document start strictly inside each row
    hi = np.searchsorted(offsets, starts + seq_len)
    counts = hi - lo  # [B] documents starting inside each row
    row_of = np.repeat(np.arange(len(starts)), counts)  # [K]
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)  # [K]
    new_doc = np.zeros(out.shape, bool)
    new_doc[:, 0] = True
    new_doc[row_of, offsets[k] - starts[row_of]] = True
    doc_start = np.maximum.accumulate(np.where(new_doc, idx[None, :], 0), axis=1)  # [B, T]
    return {"tokens": out, "positions": (idx[None, :] - doc_start).astype(np.int32),
            "segment_ids": np.cumsum(new_doc, axis=1, dtype=np.int32), "loss_mask": np.ones(out.shape, np.int32)}


def open_split(directory: str | Path, source: str, split: str, info: dict, seq_len: int) -> ShardRows:
    """Memory-map one source's split, checking its size against the manifest."""
    base = Path(directory) / source
    tokens_path, index_path = base / f"{split}.tokens", base / f"{split}.index"
    for path in (tokens_path, index_path):
        if not path.is_file():
            raise DataError(f"{path} is missing; the build at {directory} is incomplete, rebuild it")
    dtype = np.dtype(info["dtype"])
    if tokens_path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise DataError(f"{tokens_path}: size does not match {MANIFEST} ({info['tokens']} tokens); rebuild it")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if info["tokens"] else np.zeros(0, dtype)
    offsets = np.fromfile(index_path, dtype="<i8")
    return ShardRows(tokens, offsets, seq_len, f"{source}/{split}")


def check_vocab(rows: ShardRows, vocab_size: int, where: str) -> None:
    """Ids >= vocab_size would be clamped by the embedding lookup: refuse them at load time."""
    top = int(rows.tokens.max(initial=0)) if len(rows.tokens) else 0
    if top >= vocab_size:
        raise DataError(f"{where}: token id {top} >= model.vocab_size={vocab_size}; use the tokenizer the data "
                        "was built with or raise model.vocab_size")


@dataclass(frozen=True)
class ConcatRows:
    """Rows of several ShardRows one after the other (for held-out evaluation)."""

    parts: tuple

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


def load_build(directory: str | Path, seq_len: int, vocab_size: int) -> tuple[dict, list, list, ConcatRows]:
    """(manifest, train rows per source, weights, held-out rows) of a built directory, vocabulary checked."""
    manifest = read_manifest(directory)
    train, weights, heldout = [], [], []
    for name, src in manifest["sources"].items():
        for split in SPLITS:
            info = {**src["splits"][split], "dtype": manifest["dtype"]}
            rows = open_split(directory, name, split, info, seq_len)
            check_vocab(rows, vocab_size, f"{directory}/{name}/{split}.tokens")
            if split == "train":
                if len(rows) == 0:
                    raise DataError(f"{directory}: source {name!r} has {info['tokens']} training tokens, no row of "
                                    f"data.seq_len={seq_len}; lower data.seq_len or add data")
                train.append(rows)
                weights.append(src["weight"])
            elif len(rows):
                heldout.append(rows)
    return manifest, train, weights, ConcatRows(tuple(heldout))


def override_weights(names: list[str], weights: list[float], mixture: str) -> list[float]:
    """Apply data.mixture ("name=weight,..."; 0 drops a source) over the build's weights."""
    if not mixture.strip():
        return list(weights)
    out = dict(zip(names, weights))
    for item in mixture.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise DataError(f"data.mixture: {item.strip()!r} must be name=weight, e.g. web=0.6")
        if name not in out:
            raise DataError(f"data.mixture: no source {name!r} in the build (sources: {', '.join(names)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise DataError(f"data.mixture: {item.strip()!r} must be name=weight, e.g. web=0.6") from None
        if out[name] < 0:
            raise DataError(f"data.mixture: weight of {name!r} must be >= 0")
    if not any(out.values()):
        raise DataError("data.mixture: every source has weight 0; give at least one a positive weight")
    return [out[n] for n in names]
