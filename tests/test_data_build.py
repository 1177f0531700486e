"""`jaxllm data build`: sources, report counts, bad input, determinism, manifest, vocabulary check at load."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxllm.config import ConfigError
from jaxllm.data import build, shards, tokenizer as tokenizers
from jaxllm.data.sources import DataError

ROOT = Path(__file__).resolve().parent.parent


def prose(seed: int, n_words: int = 120) -> str:
    """Distinct documents: random words from a 2,000-word made-up vocabulary with stop words mixed in."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(2000)]
    stop = ["the", "and", "of", "to", "with"]
    return " ".join(rng.choice(stop) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizers.train_bpe([prose(i, 200) for i in range(20)], 300).save(str(path))
    return path


def write_inputs(root: Path) -> dict:
    """web.jsonl with one exact copy, one light edit, one malformed line; books/ text files; wiki.parquet."""
    root.mkdir(parents=True, exist_ok=True)
    web = [prose(i, 150) for i in range(20)]
    edited = web[3].split()
    edited[40] = "edited"
    lines = [json.dumps({"text": t}) for t in web]
    lines += [json.dumps({"text": web[1].upper()}), json.dumps({"text": " ".join(edited)}), '{"text": broken',
              json.dumps({"other": "no text field"}), json.dumps({"text": "too short"})]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    (root / "books").mkdir(exist_ok=True)
    for i in range(4):
        (root / "books" / f"b{i}.txt").write_text(prose(100 + i, 300))
    (root / "books" / "skip.md").write_text("not a .txt file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [prose(200 + i, 100) for i in range(6)] + [None]}), root / "wiki.parquet")
    return {
        "web": {"type": "jsonl", "path": str(root / "web.jsonl"), "weight": 0.6},
        "books": {"type": "text", "path": str(root / "books"), "suffix": ".txt", "weight": 0.3},
        "wiki": {"type": "parquet", "path": str(root / "wiki.parquet"), "weight": 0.1},
    }


def make_config(tmp_path: Path, tok_path: Path, sources: dict, **extra) -> build.BuildConfig:
    data = {"output": str(tmp_path / "out"), "tokenizer": str(tok_path), "num_workers": 1, "chunk_size": 4,
            "heldout_fraction": 0.2, "max_malformed_ratio": 0.5, "token_budget": 10000, "sources": sources, **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return build.load_config(str(path))


def stage(report, source, name):
    return next(f for f in report["sources"][source]["filters"] if f["filter"] == name)


def test_build_counts_per_source_and_filter(tmp_path, tok_path, caplog):
    cfg = make_config(tmp_path, tok_path, write_inputs(tmp_path / "in"))
    with caplog.at_level(logging.WARNING):
        report = build.build(cfg)
    web = report["sources"]["web"]
    assert (web["records"], web["malformed"]) == (25, 2)
    assert any("web.jsonl:23" in m and "malformed JSON" in m for m in caplog.messages)
    assert web["malformed_examples"][1].endswith("web.jsonl:24: no string field 'text'")
    assert (stage(report, "web", "length")["docs_in"], stage(report, "web", "length")["docs_out"]) == (23, 22)
    assert stage(report, "web", "exact_dup")["docs_in"] - stage(report, "web", "exact_dup")["docs_out"] == 1
    assert stage(report, "web", "near_dup")["docs_in"] - stage(report, "web", "near_dup")["docs_out"] == 1
    assert web["documents_out"] == 20
    assert report["sources"]["books"]["records"] == 4  # skip.md filtered by suffix
    assert report["sources"]["wiki"]["malformed"] == 1  # the null row
    # tokens: in/out chain through the stages; what was kept is what the shards hold
    manifest = shards.read_manifest(cfg.output)
    for name, r in report["sources"].items():
        rows = r["filters"]
        assert all(a["tokens_out"] == b["tokens_in"] for a, b in zip(rows, rows[1:]))
        splits = manifest["sources"][name]["splits"]
        assert r["tokens_out"] == rows[-1]["tokens_out"] == splits["train"]["tokens"] + splits["heldout"]["tokens"]
        assert r["target_tokens"] == round(10000 * r["weight"])
        assert r["epochs"] == pytest.approx(r["target_tokens"] / r["train_tokens"])
    text = build.format_report(report)
    assert "near_dup" in text and "web" in text and "epochs" in text


def _shard_bytes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical_whatever_the_workers(tmp_path, tok_path):
    sources = write_inputs(tmp_path / "in")
    one = make_config(tmp_path / "a", tok_path, sources)
    two = make_config(tmp_path / "b", tok_path, sources, num_workers=2)
    build.build(one)
    build.build(two)
    a, b = _shard_bytes(Path(one.output)), _shard_bytes(Path(two.output))
    assert a.keys() == b.keys() and "web/train.tokens" in a and "manifest.json" in a
    assert all(a[k] == b[k] for k in a)


def test_manifest_and_shard_layout(tmp_path, tok_path):
    cfg = make_config(tmp_path, tok_path, write_inputs(tmp_path / "in"))
    build.build(cfg)
    manifest = shards.read_manifest(cfg.output)
    tok = tokenizers.load(tok_path)
    assert manifest["tokenizer"]["sha256"] == tokenizers.fingerprint(tok)
    assert manifest["build"]["sources"]["web"]["weight"] == 0.6
    info = manifest["sources"]["books"]["splits"]["train"]
    tokens = np.fromfile(Path(cfg.output) / "books" / "train.tokens", manifest["dtype"])
    offsets = np.fromfile(Path(cfg.output) / "books" / "train.index", "<i8")
    assert len(tokens) == info["tokens"] == offsets[-1] and len(offsets) == info["documents"] + 1
    eos = tokenizers.eos_id(tok)
    assert np.all(tokens[offsets[1:] - 1] == eos)  # every document ends in EOS
    first = tok.decode(tokens[offsets[0]:offsets[1] - 1].tolist())
    assert first in {prose(100 + i, 300) for i in range(4)}


def test_malformed_ratio_stops_the_build(tmp_path, tok_path):
    cfg = make_config(tmp_path, tok_path, write_inputs(tmp_path / "in"), max_malformed_ratio=0.05)
    with pytest.raises(DataError, match=r"source 'web': 2 of 25 records malformed .*web.jsonl:23"):
        build.build(cfg)
    assert not Path(cfg.output).exists() and not Path(cfg.output + ".partial").exists()


def test_undecodable_bytes_counted_with_line(tmp_path, tok_path, caplog):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"ok{i}.txt").write_text(prose(i))
    (root / "bad.txt").write_bytes(b"first line\nsecond \xff\xfe line\n")
    cfg = make_config(tmp_path, tok_path, {"t": {"type": "text", "path": str(root)}})
    with caplog.at_level(logging.WARNING):
        report = build.build(cfg)
    assert report["sources"]["t"]["malformed"] == 1
    assert any("bad.txt:2" in m and "undecodable" in m for m in caplog.messages)


def test_empty_source_is_an_error(tmp_path, tok_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cfg = make_config(tmp_path, tok_path, {"blank": {"type": "jsonl", "path": str(tmp_path / "empty.jsonl")}})
    with pytest.raises(DataError, match="source 'blank' is empty"):
        build.build(cfg)
    cfg = make_config(tmp_path, tok_path, {"none": {"type": "text", "path": str(tmp_path / "nothing*.txt")}})
    with pytest.raises(DataError, match="source 'none': no files match"):
        build.build(cfg)


def test_source_filtered_to_nothing_names_source_and_filter(tmp_path, tok_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(5)))
    cfg = make_config(tmp_path, tok_path, {"short": {"type": "jsonl", "path": str(path)}})
    with pytest.raises(DataError, match=r"source 'short': all documents were filtered out \(length removed 5\); "
                                        r"loosen filters.length"):
        build.build(cfg)


def test_config_errors(tmp_path, tok_path):
    with pytest.raises(ConfigError, match="no sources"):
        make_config(tmp_path, tok_path, {})
    with pytest.raises(ConfigError, match="sources.x.type='csv' is not allowed"):
        make_config(tmp_path, tok_path, {"x": {"type": "csv", "path": "a"}})
    with pytest.raises(ConfigError, match="unknown config key 'sources.x.wieght'"):
        make_config(tmp_path, tok_path, {"x": {"type": "text", "path": "a", "wieght": 1}})
    with pytest.raises(ConfigError, match=r"skip_filters: unknown \['lenght'\]"):
        make_config(tmp_path, tok_path, {"x": {"type": "text", "path": "a", "skip_filters": ["lenght"]}})


def test_token_ids_beyond_vocab_refused_at_load(tmp_path, tok_path):
    cfg = make_config(tmp_path, tok_path, write_inputs(tmp_path / "in"))
    build.build(cfg)
    with pytest.raises(DataError, match=r"token id \d+ >= model.vocab_size=100"):
        shards.load_build(cfg.output, seq_len=16, vocab_size=100)
    manifest, train, weights, heldout = shards.load_build(cfg.output, seq_len=16, vocab_size=300)
    assert weights == [0.6, 0.3, 0.1] and [r.name for r in train] == ["web/train", "books/train", "wiki/train"]


def test_cli_data_build_prints_table(tmp_path, tok_path):
    cfg = make_config(tmp_path, tok_path, write_inputs(tmp_path / "in"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "jaxllm.cli", "data", "build", "--config",
                          str(tmp_path / "build.yaml")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "exact_dup" in out.stdout and (Path(cfg.output) / "report.json").is_file()


def test_shipped_example_config_parses_and_its_files_exist():
    cfg = build.load_config(str(ROOT / "configs" / "data" / "example.yaml"))
    assert set(cfg.sources) == {"web", "books", "code", "academic", "wiki"}
    assert sum(s.weight for s in cfg.sources.values()) == pytest.approx(1.0)
    for src in cfg.sources.values():
        if src.type != "builtin":
            assert (ROOT / src.path).exists(), src.path
