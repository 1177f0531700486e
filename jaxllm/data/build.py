"""`jaxllm data build`: read sources -> filter -> deduplicate -> tokenize (worker processes) -> shards + report.

Worker processes run the text filters, the MinHash signatures and the tokenizer over chunks of documents; the
main process applies the results in document order (exact-duplicate table, LSH index, shard writers), so the
shards are byte-identical for the same inputs and config whatever the number of workers. Deduplication spans
all sources, in the order they are listed. A document is charged to the first filter that rejects it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxllm import config as config_lib
from jaxllm.config import ConfigError
from jaxllm.data import quality, shards, sources, tokenizer as tokenizers
from jaxllm.data.sources import DataError, ReadStats

log = logging.getLogger(__name__)
SOURCE_TYPES = ("text", "jsonl", "parquet", "builtin")


@dataclass(frozen=True)
class SourceConfig:
    type: str = "text"  # text (one document per file) | jsonl | parquet | builtin
    path: str = ""  # a file, a directory (recursive) or a glob; unused for builtin
    field: str = "text"  # JSONL field / Parquet column holding the text
    suffix: str = ""  # only files whose name ends with this (e.g. .txt), for directories and globs
    weight: float = 1.0  # mixture weight, applied when training reads the shards
    skip_filters: tuple = ()  # text filters not applied to this source (e.g. [gibberish, language] for code)
    max_documents: int = 0  # 0: all


@dataclass(frozen=True)
class BuildConfig:
    output: str = "build/data"
    tokenizer: str = "builtin"  # builtin (BPE trained on the built-in corpus) or a tokenizer.json path
    vocab_size: int = 4096  # of the builtin tokenizer
    builtin_max_documents: int = 0  # documents the builtin tokenizer trains on (0: all)
    token_budget: int = 0  # target training tokens; reports each source's share and epochs (0: none)
    heldout_fraction: float = 0.02
    num_workers: int = 0  # tokenizer/filter processes; 0: one per CPU core, 1: in this process
    chunk_size: int = 64  # documents per worker task
    max_malformed_ratio: float = 0.01  # a source with more malformed records than this stops the build
    filters: quality.FilterConfig = quality.FilterConfig()
    sources: dict | None = None  # name -> SourceConfig fields (type, path, field, suffix, weight, ...)


def validate(cfg: BuildConfig) -> BuildConfig:
    """Turn `sources` into SourceConfigs and check them; ConfigError names the key."""
    if not cfg.sources:
        raise ConfigError("no sources: add a `sources:` mapping of name -> {type, path, weight} "
                          "(see configs/data/example.yaml)")
    built = {}
    for name, raw in cfg.sources.items():
        key = f"sources.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(f"{key}: a source name must be letters, digits, '_', '.', '-' (it names a directory)")
        src = config_lib.from_dict(SourceConfig, raw or {}, prefix=key + ".")
        if src.type not in SOURCE_TYPES:
            raise ConfigError(f"{key}.type={src.type!r} is not allowed; choose one of {', '.join(SOURCE_TYPES)}")
        if src.type != "builtin" and not src.path:
            raise ConfigError(f"{key}.path is empty; give a file, directory or glob")
        if not src.weight > 0:
            raise ConfigError(f"{key}.weight={src.weight} must be > 0")
        unknown = [f for f in src.skip_filters if f not in quality.FILTERS]
        if unknown:
            raise ConfigError(f"{key}.skip_filters: unknown {unknown}; choose from {', '.join(quality.FILTERS)}")
        built[str(name)] = dataclasses.replace(src, skip_filters=tuple(src.skip_filters))
    dedup = cfg.filters.dedup
    if not 0 < dedup.threshold <= 1:
        raise ConfigError(f"filters.dedup.threshold={dedup.threshold} must be in (0, 1]")
    if dedup.num_perm < 2 or dedup.ngram < 1:
        raise ConfigError("filters.dedup.num_perm must be >= 2 and filters.dedup.ngram >= 1")
    if not 0 <= cfg.heldout_fraction < 0.5 or not 0 <= cfg.max_malformed_ratio <= 1:
        raise ConfigError("heldout_fraction must be in [0, 0.5) and max_malformed_ratio in [0, 1]")
    if cfg.num_workers < 0 or cfg.chunk_size < 1 or cfg.token_budget < 0:
        raise ConfigError("num_workers and token_budget must be >= 0 and chunk_size >= 1")
    return dataclasses.replace(cfg, sources=built)


def load_config(path: str | None, overrides=()) -> BuildConfig:
    return config_lib.load(path, overrides, cls=BuildConfig, validator=validate)


# ---------------------------------------------------------------------------------------------------------
# Reading.


def read_source(name: str, src: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """(document name, text) of one source, in a fixed order."""
    if src.type == "builtin":
        docs = sources.builtin_documents()
        docs = docs[:src.max_documents] if src.max_documents else docs
        stats.records += len(docs)
        return iter(docs)
    else:
        suffixes = (src.suffix,) if src.suffix else {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}.get(
            src.type, ())
        files = sources.expand_paths(src.path, suffixes)
        if not files:
            raise DataError(f"source {name!r}: no files match path {src.path!r}"
                            + (f" with suffix {suffixes}" if suffixes else "") + "; check sources." + name + ".path")
        reader = {"text": lambda: sources.read_text_files(files, stats),
                  "jsonl": lambda: sources.read_jsonl(files, src.field, stats),
                  "parquet": lambda: sources.read_parquet(files, src.field, stats)}[src.type]
        return itertools.islice(reader(), src.max_documents) if src.max_documents else reader()


# ---------------------------------------------------------------------------------------------------------
# Worker side: filters, dedup keys, signatures and token ids for a chunk of documents.

_WORKER: dict = {}


def _init_worker(tok_json: str, filters: quality.FilterConfig, blocklist_terms: tuple[str, ...]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tok_json), filters=filters,
                   blocklist=quality.compile_blocklist(filters.blocklist, blocklist_terms),
                   perms=quality.permutations(filters.dedup.num_perm, filters.dedup.seed))


def _process_chunk(task: tuple[list[str], list[str], tuple]) -> tuple[list[str], list[tuple]]:
    """-> names, [(rejected_by, ids [n] int32, exact key, signature or None)] per document."""
    names, texts, skip = task
    cfg: quality.FilterConfig = _WORKER["filters"]
    encoded = _WORKER["tok"].encode_batch(texts)
    out = []
    for text, enc in zip(texts, encoded):
        rejected = quality.first_rejection(text, cfg, _WORKER["blocklist"], skip)
        key = quality.exact_key(text) if cfg.dedup.exact and not rejected else b""
        sig = None
        if cfg.dedup.near and not rejected:
            sig = quality.minhash(quality.shingle_hashes(text, cfg.dedup.ngram), *_WORKER["perms"])
        out.append((rejected, np.asarray(enc.ids, np.int32), key, sig))
    return names, out


def _tasks(docs: Iterator[tuple[str, str]], size: int, skip: tuple) -> Iterator[tuple]:
    while chunk := list(itertools.islice(docs, size)):
        yield [n for n, _ in chunk], [t for _, t in chunk], skip


# ---------------------------------------------------------------------------------------------------------
# Main side: apply the results in order, write shards, count everything.

STAGES = quality.FILTERS + quality.DEDUP


@dataclass
class SourceCount:
    """Documents and tokens (EOS included) into and out of each stage, for one source."""

    stages: dict = field(default_factory=lambda: {s: [0, 0, 0, 0] for s in STAGES})  # docs/tokens in/out
    kept_docs: int = 0
    kept_tokens: int = 0


@dataclass
class DedupState:
    exact: set = field(default_factory=set)
    near: quality.NearDupIndex | None = None


def _rejecting_stage(result: tuple, cfg: quality.FilterConfig, dedup: DedupState) -> str:
    rejected, _, key, sig = result
    if rejected:
        return rejected
    if cfg.dedup.exact:
        if key in dedup.exact:
            return "exact_dup"
        dedup.exact.add(key)
    if cfg.dedup.near and quality.check_and_add(dedup.near, sig):
        return "near_dup"
    return ""


def _count(count: SourceCount, rejected: str, n_tokens: int) -> None:
    for stage in STAGES:
        row = count.stages[stage]
        row[0] += 1
        row[2] += n_tokens
        if stage == rejected:
            return
        row[1] += 1
        row[3] += n_tokens
    count.kept_docs += 1
    count.kept_tokens += n_tokens


def _map(pool, tasks):
    return pool.imap(_process_chunk, tasks) if pool else map(_process_chunk, tasks)


def _build_source(name: str, src: SourceConfig, cfg: BuildConfig, pool, out: Path, dtype, eos: int,
                  dedup: DedupState) -> tuple[dict, SourceCount, ReadStats]:
    stats, count = ReadStats(), SourceCount()
    writers = {s: shards.SplitWriter(out / name, s, dtype) for s in shards.SPLITS}
    docs = read_source(name, src, stats)
    for names, results in _map(pool, _tasks(docs, cfg.chunk_size, src.skip_filters)):
        for doc_name, result in zip(names, results):
            rejected = _rejecting_stage(result, cfg.filters, dedup)
            ids = result[1]
            _count(count, rejected, len(ids) + 1)
            if not rejected:
                split = "heldout" if sources.is_heldout(doc_name, cfg.heldout_fraction) else "train"
                writers[split].add(np.append(ids, np.int32(eos)))
    splits = {s: w.close() for s, w in writers.items()}
    _check_source(name, src, cfg, stats, count)
    return splits, count, stats


def _check_source(name: str, src: SourceConfig, cfg: BuildConfig, stats: ReadStats, count: SourceCount) -> None:
    if stats.records == 0:
        raise DataError(f"source {name!r} is empty: no documents at {src.path or 'the built-in corpus'}")
    ratio = stats.malformed / stats.records
    if ratio > cfg.max_malformed_ratio:
        raise DataError(f"source {name!r}: {stats.malformed} of {stats.records} records malformed ({ratio:.1%} > "
                        f"max_malformed_ratio={cfg.max_malformed_ratio}); first: {stats.examples[0]}")
    if count.kept_docs == 0:
        if stats.malformed == stats.records:
            raise DataError(f"source {name!r}: all {stats.records} records are malformed; first: {stats.examples[0]}")
        worst = max(STAGES, key=lambda s: count.stages[s][0] - count.stages[s][1])
        removed = count.stages[worst][0] - count.stages[worst][1]
        hint = f"filters.{worst}" if worst in quality.FILTERS else "filters.dedup"
        raise DataError(f"source {name!r}: all documents were filtered out ({worst} removed {removed}); loosen "
                        f"{hint} or add sources.{name}.skip_filters")


def get_tokenizer(cfg: BuildConfig):
    if cfg.tokenizer == "builtin":
        from jaxllm.data import corpus  # trains (once, cached) on the built-in corpus

        return corpus.builtin_tokenizer(cfg.vocab_size, cfg.builtin_max_documents)
    return tokenizers.load(cfg.tokenizer)


def _blocklist_terms(cfg: quality.BlocklistConfig) -> tuple[str, ...]:
    if not cfg.file:
        return ()
    path = Path(cfg.file)
    if not path.is_file():
        raise DataError(f"filters.blocklist.file: {path} not found; give a file with one word or phrase a line")
    return tuple(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())


def _prepare_output(out: Path) -> Path:
    if out.exists() and any(out.iterdir()) and not (out / shards.MANIFEST).is_file():
        raise DataError(f"output {out} exists and is not a built data directory; choose another output")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def build(cfg: BuildConfig) -> dict:
    """Build shards into cfg.output; returns the report (also written to report.json)."""
    out = Path(cfg.output)
    tok = get_tokenizer(cfg)
    terms = _blocklist_terms(cfg.filters.blocklist)
    partial = _prepare_output(out)
    dtype = shards.token_dtype(tok.get_vocab_size())
    eos = tokenizers.eos_id(tok)
    dedup = DedupState(near=quality.new_index(cfg.filters.dedup) if cfg.filters.dedup.near else None)
    workers = cfg.num_workers or os.cpu_count() or 1
    init_args = (tok.to_str(), cfg.filters, terms)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    results = {}
    try:
        for name, src in cfg.sources.items():
            log.info("source %s: reading %s", name, src.path or "the built-in corpus")
            results[name] = _build_source(name, src, cfg, pool, partial, dtype, eos, dedup)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed build leaves nothing behind
        raise
    finally:
        if pool:
            pool.terminate()
    manifest = _manifest(cfg, tok, dtype, {n: r[0] for n, r in results.items()})
    report = make_report(cfg, results)
    tok.save(str(partial / "tokenizer.json"))
    (partial / shards.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (partial / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return report


def _manifest(cfg: BuildConfig, tok, dtype, splits: dict) -> dict:
    build_cfg = config_lib.to_dict(cfg)
    del build_cfg["output"], build_cfg["num_workers"]  # where and how fast: not what the data is
    return {"version": 1, "build": build_cfg, "dtype": dtype.str,
            "tokenizer": {"sha256": tokenizers.fingerprint(tok), "vocab_size": tok.get_vocab_size(),
                          "eos_id": tokenizers.eos_id(tok)},
            "sources": {name: {"weight": cfg.sources[name].weight, "splits": s} for name, s in splits.items()}}


# ---------------------------------------------------------------------------------------------------------
# Report.


def make_report(cfg: BuildConfig, results: dict) -> dict:
    total_weight = sum(cfg.sources[n].weight for n in results)
    report = {"sources": {}, "token_budget": cfg.token_budget}
    for name, (splits, count, stats) in results.items():
        weight = cfg.sources[name].weight
        train_tokens = splits["train"]["tokens"]
        target = cfg.token_budget * weight / total_weight if cfg.token_budget else None
        report["sources"][name] = {
            "weight": weight, "share": weight / total_weight, "records": stats.records,
            "malformed": stats.malformed, "malformed_examples": stats.examples[:20],
            "filters": [{"filter": s, "docs_in": r[0], "docs_out": r[1], "tokens_in": r[2], "tokens_out": r[3]}
                        for s, r in count.stages.items()],
            "documents_out": count.kept_docs, "tokens_out": count.kept_tokens,
            "train_tokens": train_tokens, "heldout_tokens": splits["heldout"]["tokens"],
            "target_tokens": round(target) if target else None,
            "epochs": (target / train_tokens if train_tokens else float("inf")) if target else None,
        }
    return report


def format_report(report: dict) -> str:
    """A plain-text table: per source, the records read and each stage's documents and tokens in -> out."""
    lines = [f"{'source':<12} {'stage':<10} {'docs in':>9} {'docs out':>9} {'tokens in':>12} {'tokens out':>12}"]
    for name, r in report["sources"].items():
        lines.append(f"{name:<12} {'read':<10} {r['records']:>9} {r['records'] - r['malformed']:>9} "
                     f"{'':>12} {'':>12}   ({r['malformed']} malformed)")
        for f in r["filters"]:
            lines.append(f"{'':<12} {f['filter']:<10} {f['docs_in']:>9} {f['docs_out']:>9} "
                         f"{f['tokens_in']:>12} {f['tokens_out']:>12}")
        mix = f"weight {r['weight']:g} (share {r['share']:.1%})"
        if r["target_tokens"] is not None:
            mix += f", target {r['target_tokens']} train tokens = {r['epochs']:.2f} epochs of {r['train_tokens']}"
        lines.append(f"{'':<12} {'kept':<10} {r['documents_out']:>9} {'':>9} {'':>12} {r['tokens_out']:>12}   {mix}")
    return "\n".join(lines)
