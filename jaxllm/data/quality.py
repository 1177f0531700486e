"""Quality filters and deduplication: each filter is a pure `text -> keep?` function with its own config.

Filters (in the order a build applies them; a document is charged to the first one that rejects it):
  length     character and word counts within limits
  blocklist  no more than `max_hits` matches of configured words/phrases (whole words, case-insensitive)
  gibberish  symbol and non-letter ratios, mean word length, repeated lines, the most repeated word n-gram
  language   an English-prose heuristic: enough stop words, and most words alphabetic
then exact duplicates (a hash of the normalised text) and near-duplicates (MinHash signatures + LSH bands,
confirmed by the signatures' estimated Jaccard similarity >= threshold).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

FILTERS = ("length", "blocklist", "gibberish", "language")  # text filters, in order
DEDUP = ("exact_dup", "near_dup")


@dataclass(frozen=True)
class LengthConfig:
    enabled: bool = True
    min_chars: int = 16
    max_chars: int = 1_000_000
    min_words: int = 3


@dataclass(frozen=True)
class BlocklistConfig:
    enabled: bool = True
    words: tuple = ()  # words or phrases; matched whole-word, case-insensitive
    file: str = ""  # optional file with one word or phrase a line
    max_hits: int = 0  # a document with more matches than this is dropped


@dataclass(frozen=True)
class GibberishConfig:
    enabled: bool = True
    max_symbol_ratio: float = 0.1  # share of characters that are symbols like # { } < > | \ ^ ~ ` @ $ * _
    max_non_letter_ratio: float = 0.5  # share of non-space characters that are not letters
    min_mean_word_len: float = 2.0
    max_mean_word_len: float = 12.0
    max_dup_line_fraction: float = 0.3  # share of non-blank lines that repeat an earlier line
    ngram: int = 3
    max_top_ngram_fraction: float = 0.2  # share of word characters covered by the most frequent word n-gram


@dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = True
    min_stopwords: int = 2
    min_alpha_word_ratio: float = 0.8  # share of words with at least one letter


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of word-shingle sets at which two documents are near-duplicates
    ngram: int = 5  # words per shingle
    num_perm: int = 128
    seed: int = 0


@dataclass(frozen=True)
class FilterConfig:
    length: LengthConfig = LengthConfig()
    blocklist: BlocklistConfig = BlocklistConfig()
    gibberish: GibberishConfig = GibberishConfig()
    language: LanguageConfig = LanguageConfig()
    dedup: DedupConfig = DedupConfig()


_WORD = re.compile(r"\w+")
_SYMBOLS = "#{}<>|\\^~`@$*_"
_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters
_ALPHA_WORD = re.compile(r"\w*[^\W\d_]\w*")  # words with at least one letter
STOPWORDS = frozenset("the be to of and a in that have it for not on with he as you do at this but his by from they "
                      "we say her she or an will my one all would there their what is are was were".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text)


# ---------------------------------------------------------------------------------------------------------
# Text filters: pure functions, True = keep.


def length_ok(text: str, cfg: LengthConfig) -> bool:
    return cfg.min_chars <= len(text) <= cfg.max_chars and len(words(text)) >= cfg.min_words


def compile_blocklist(cfg: BlocklistConfig, file_words: tuple[str, ...] = ()) -> re.Pattern | None:
    """One regex matching any listed word or phrase as whole words; None when the list is empty."""
    terms = sorted({t.strip().lower() for t in (*cfg.words, *file_words) if t.strip()})
    if not terms:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in terms)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def blocklist_ok(text: str, pattern: re.Pattern | None, max_hits: int) -> bool:
    if pattern is None:
        return True
    hits = 0
    for _ in pattern.finditer(text):
        hits += 1
        if hits > max_hits:
            return False
    return True


def gibberish_ok(text: str, cfg: GibberishConfig) -> bool:
    """Symbol / non-letter ratios, mean word length, repeated lines and the top word n-gram's coverage."""
    chars = "".join(text.split())  # non-space characters
    if not chars:
        return False
    if sum(chars.count(c) for c in _SYMBOLS) / len(chars) > cfg.max_symbol_ratio:
        return False
    if len(_LETTERS.sub("", chars)) / len(chars) > cfg.max_non_letter_ratio:
        return False
    ws = words(text)
    if not ws:
        return False
    mean_len = sum(map(len, ws)) / len(ws)
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return False
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_fraction:
        return False
    return top_ngram_fraction(ws, cfg.ngram) <= cfg.max_top_ngram_fraction


def top_ngram_fraction(ws: list[str], n: int) -> float:
    """Characters of all occurrences of the most frequent word n-gram / characters of all words."""
    if len(ws) < n + 1:
        return 0.0
    lowered = [w.lower() for w in ws]
    counts = collections.Counter(tuple(lowered[i:i + n]) for i in range(len(lowered) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / sum(map(len, ws))


def language_ok(text: str, cfg: LanguageConfig) -> bool:
    ws = words(text.lower())
    if not ws:
        return False
    if sum(map(STOPWORDS.__contains__, ws)) < cfg.min_stopwords:
        return False
    return len(_ALPHA_WORD.findall(text)) / len(ws) >= cfg.min_alpha_word_ratio


def first_rejection(text: str, cfg: FilterConfig, blocklist: re.Pattern | None, skip: tuple = ()) -> str:
    """The name of the first text filter that rejects `text`, or "" when all keep it."""
    checks = {
        "length": lambda: length_ok(text, cfg.length),
        "blocklist": lambda: blocklist_ok(text, blocklist, cfg.blocklist.max_hits),
        "gibberish": lambda: gibberish_ok(text, cfg.gibberish),
        "language": lambda: language_ok(text, cfg.language),
    }
    for name in FILTERS:
        if getattr(cfg, name).enabled and name not in skip and not checks[name]():
            return name
    return ""


# ---------------------------------------------------------------------------------------------------------
# Exact duplicates.


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace runs collapsed: copies differing only in case or spacing hash alike."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_key(text: str) -> bytes:
    return hashlib.sha256(normalise(text).encode()).digest()[:16]


# ---------------------------------------------------------------------------------------------------------
# MinHash + LSH. A shingle is n consecutive words of the normalised text: its 64-bit hash combines the words'
# CRC32s polynomially. Permutation i is the multiply-shift hash h -> ((a_i h + b_i) mod 2^64) >> 32 (a_i odd):
# no modulo by a prime, so a signature is one [S, P] multiply-add-shift-min in numpy.

_GRAM_BASE = np.uint64(0x100000001B3)  # odd multiplier combining word hashes into a shingle hash
_MIX = np.uint64(0x9E3779B97F4A7C15)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): [num_perm] uint64 each (a odd), fixed by the seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return a, rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """[S] uint64: hashes of the distinct word n-grams of the normalised text (one gram if fewer words)."""
    ws = normalise(text).split()
    if not ws:
        return np.zeros(0, np.uint64)
    word_hash = np.fromiter(map(zlib.crc32, map(str.encode, ws)), np.uint64, len(ws))  # [W]
    n = min(n, len(ws))
    grams = np.zeros(len(ws) - n + 1, np.uint64)  # [S]
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = grams * _GRAM_BASE + word_hash[k:len(ws) - n + 1 + k]
        return np.unique(grams * _MIX)


def minhash(hashes: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """[P] uint32 signature: per permutation, the minimum permuted hash over the shingles ([S] uint64)."""
    sig = np.full(len(a), np.iinfo(np.uint32).max, np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(hashes), chunk):
            h = hashes[start:start + chunk, None]  # [S, 1]
            permuted = (h * a[None, :] + b[None, :]) >> np.uint64(32)  # [S, P], mod 2^64 by wrap-around
            sig = np.minimum(sig, permuted.min(axis=0))
    return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the S-curve's midpoint (1/bands)^(1/rows) nearest to a bit below the threshold, so
    that few true pairs are missed; candidates are then confirmed by their estimated Jaccard."""
    target = max(threshold - 0.1, 0.05)
    options = [(b, num_perm // b) for b in range(1, num_perm + 1)]
    return min(options, key=lambda br: (abs((1 / br[0]) ** (1 / br[1]) - target), -br[0] * br[1]))


@dataclass
class NearDupIndex:
    """LSH tables of the documents kept so far: band key -> indices into `signatures`."""

    threshold: float
    bands: int
    rows: int
    tables: list[dict] = dataclasses.field(default_factory=list)
    signatures: list[np.ndarray] = dataclasses.field(default_factory=list)


def new_index(cfg: DedupConfig) -> NearDupIndex:
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    return NearDupIndex(cfg.threshold, bands, rows, [{} for _ in range(bands)])


def check_and_add(index: NearDupIndex, sig: np.ndarray) -> bool:
    """True (and not added) when `sig` is a near-duplicate of a kept document; else added, False."""
    keys = [sig[i * index.rows:(i + 1) * index.rows].tobytes() for i in range(index.bands)]
    seen: set[int] = set()
    for table, key in zip(index.tables, keys):
        for other in table.get(key, ()):
            if other not in seen:
                seen.add(other)
                if estimated_jaccard(sig, index.signatures[other]) >= index.threshold:
                    return True
    doc = len(index.signatures)
    index.signatures.append(sig)
    for table, key in zip(index.tables, keys):
        table.setdefault(key, []).append(doc)
    return False
