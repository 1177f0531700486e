"""Data benchmarks on one CPU core: packed shards -> batches (tokens/s), and filter + dedup (documents/s).

    python scripts/bench_data.py [--tokens 50000000] [--seq-len 2048] [--batch 8] [--out bench_data.jsonl]

Loader rows (all pinned to one core with sched_setaffinity, Grain's prefetch threads included):
  jaxllm mixed      our loader: pipeline.train_batches on a 3-source Mixture (flat tokens + index, vectorised)
  grain per-row     the stock Grain way on the same shards: per-source shuffle.repeat, MapDataset.mix, batch
  flat gather       the format alone: memmap gather of B random packed rows (tokens only)
  arrayrecord       the format alone: ArrayRecord, one record per packed row, B random rows read (tokens only)
Filter rows: the text filters, exact-key hashing, MinHash signatures + LSH, one process, generated prose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm.data import pipeline, quality, shards  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_source(directory: Path, n_tokens: int, rng: np.random.Generator) -> dict:
    """Random documents (lengths geometric, mean 600 tokens) filling n_tokens uint16 ids."""
    writer = shards.SplitWriter(directory, "train", np.dtype("<u2"))
    written = 0
    while written < n_tokens:
        n = int(min(rng.geometric(1 / 600), n_tokens - written))
        writer.add(rng.integers(2, 32000, n))
        written += n
    return {**writer.close(), "dtype": "<u2"}


def timed(fn, batches: int, tokens_per_batch: int) -> float:
    """Tokens/s over `batches` calls after 5 warm-up calls."""
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * tokens_per_batch / (time.perf_counter() - start)


def bench_loader(args, tmp: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    sizes = (0.6, 0.3, 0.1)
    rows = []
    for k, share in enumerate(sizes):
        info = write_source(tmp / f"s{k}", int(args.tokens * share), rng)
        rows.append(shards.open_split(tmp, f"s{k}", "train", info, args.seq_len))
    weights = (0.6, 0.3, 0.1)
    tpb = args.batch * args.seq_len
    results = []
    it = pipeline.train_batches(pipeline.Mixture(tuple(rows), weights), args.batch, seed=0)
    results.append(("jaxllm mixed", timed(lambda: next(it), args.batches, tpb)))
    import grain

    per_row = [grain.MapDataset.source(r).shuffle(seed=k).repeat(None) for k, r in enumerate(rows)]
    git = iter(grain.MapDataset.mix(per_row, list(weights)).batch(args.batch).to_iter_dataset(pipeline.PREFETCH))
    results.append(("grain per-row", timed(lambda: next(git), max(args.batches // 10, 20), tpb)))
    big = rows[0]
    pick = np.random.default_rng(1)
    results.append(("flat gather", timed(lambda: big.tokens[(pick.integers(0, len(big), args.batch)[:, None]
                                                            * args.seq_len + np.arange(args.seq_len))].astype(np.int32),
                                         args.batches, tpb)))
    results.append(("arrayrecord", bench_arrayrecord(big, tmp, args, tpb)))
    return [{"bench": "loader", "what": name, "tokens_per_s": tps, "seq_len": args.seq_len, "batch": args.batch,
             "shard_tokens": args.tokens} for name, tps in results]


def bench_arrayrecord(rows: shards.ShardRows, tmp: Path, args, tpb: int) -> float:
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp / "rows.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")  # random access: one record per chunk
    for i in range(len(rows)):
        writer.write(np.ascontiguousarray(rows.tokens[i * args.seq_len:(i + 1) * args.seq_len]).tobytes())
    writer.close()
    source = ArrayRecordDataSource([path])
    pick = np.random.default_rng(2)

    def read():
        recs = source.__getitems__(pick.integers(0, len(source), args.batch).tolist())
        return np.stack([np.frombuffer(r, "<u2") for r in recs]).astype(np.int32)

    return timed(read, args.batches, tpb)


def bench_filters(args) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_example_data import document

    rng = random.Random(0)
    docs = [document(rng, rng.randint(5, 40)) for _ in range(args.docs)]
    cfg = quality.FilterConfig()
    perms = quality.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    index, seen = quality.new_index(cfg.dedup), set()
    start = time.perf_counter()
    for text in docs:
        quality.first_rejection(text, cfg, None)
    t_filters = time.perf_counter() - start
    for text in docs:
        key = quality.exact_key(text)
        if key not in seen:
            seen.add(key)
            quality.check_and_add(index, quality.minhash(quality.shingle_hashes(text, cfg.dedup.ngram), *perms))
    t_all = time.perf_counter() - start
    mean_chars = sum(map(len, docs)) / len(docs)
    return [{"bench": "filters", "what": "text filters", "docs_per_s": len(docs) / t_filters, "mean_chars": mean_chars},
            {"bench": "filters", "what": "filters + exact + near dedup", "docs_per_s": len(docs) / t_all,
             "mean_chars": mean_chars}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, threads included
    import grain
    import jax

    env = {"cpu": cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
           "grain": getattr(grain, "__version__", "?"), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        results = bench_loader(args, Path(tmp)) + bench_filters(args)
    print(f"# {env['cpu']}, one core; python {env['python']}, numpy {env['numpy']}, grain {env['grain']}")
    print(f"{'benchmark':<34} {'throughput':>16}")
    for r in results:
        value = f"{r['tokens_per_s'] / 1e6:.2f}M tokens/s" if "tokens_per_s" in r else f"{r['docs_per_s']:.0f} docs/s"
        print(f"{r['bench'] + ': ' + r['what']:<34} {value:>16}")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**env, **r}) + "\n")


if __name__ == "__main__":
    main()
