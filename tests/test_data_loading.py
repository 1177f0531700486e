"""Reading shards: packing (segment ids, positions), epochs, mixture proportions, resume, host slices, fingerprint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxllm import config as config_lib
from jaxllm.checkpoint import CheckpointError
from jaxllm.data import build, pipeline, shards, tokenizer as tokenizers


def write_split(directory: Path, lengths: list[int], first_token: int = 0) -> shards.ShardRows:
    """Documents of the given lengths whose tokens are first_token, first_token + 1, ... (each id unique)."""
    writer = shards.SplitWriter(directory, "train", np.dtype("<u4"))
    start = first_token
    for n in lengths:
        writer.add(np.arange(start, start + n))
        start += n
    info = {**writer.close(), "dtype": "<u4"}
    return info


def open_rows(directory: Path, lengths: list[int], seq_len: int, first_token: int = 0) -> shards.ShardRows:
    info = write_split(directory, lengths, first_token)
    return shards.open_split(directory.parent, directory.name, "train", info, seq_len)


def oracle_row(offsets: np.ndarray, start: int, seq_len: int) -> tuple[list[int], list[int]]:
    """Segment ids and positions by a plain loop over the tokens of one row."""
    seg, pos, prev_doc = [], [], None
    for t in range(start, start + seq_len):
        doc = int(np.searchsorted(offsets, t, side="right")) - 1
        if t == start:
            seg.append(1)
            pos.append(0)
        elif doc != prev_doc:
            seg.append(seg[-1] + 1)
            pos.append(0)
        else:
            seg.append(seg[-1])
            pos.append(pos[-1] + 1)
        prev_doc = doc
    return seg, pos


def test_rows_match_a_plain_loop_and_split_long_documents(tmp_path):
    rng = random.Random(0)
    lengths = [rng.choice([1, 2, 5, 16, 40, 70]) for _ in range(60)]  # 70 > seq_len: split across rows
    seq_len = 16
    rows = open_rows(tmp_path / "s", lengths, seq_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert len(rows) == sum(lengths) // seq_len
    for i in range(len(rows)):
        row = rows[i]
        seg, pos = oracle_row(offsets, i * seq_len, seq_len)
        np.testing.assert_array_equal(row["tokens"], np.arange(i * seq_len, (i + 1) * seq_len))
        np.testing.assert_array_equal(row["segment_ids"], seg)
        np.testing.assert_array_equal(row["positions"], pos)
        assert row["loss_mask"].sum() == seq_len and all(v.dtype == np.int32 for v in row.values())


def test_every_token_once_per_epoch(tmp_path):
    rows = open_rows(tmp_path / "s", [7, 30, 3, 50, 12] * 8, 16)  # 51 rows
    batch = 3
    it = pipeline.train_batches(pipeline.Mixture((rows,), (1.0,)), batch, seed=3)
    epoch = [next(it)["tokens"] for _ in range(len(rows) // batch)]
    seen = np.sort(np.concatenate(epoch).ravel())
    np.testing.assert_array_equal(seen, np.arange(len(rows) * 16))  # each packed token exactly once
    second = np.concatenate([next(it)["tokens"] for _ in range(len(rows) // batch)])
    assert not np.array_equal(second, np.concatenate(epoch))  # reshuffled


def _mixture(tmp_path: Path, weights=(0.6, 0.3, 0.1)) -> pipeline.Mixture:
    sizes = (50, 200, 30)  # rows; the small third source will be repeated many epochs
    parts = tuple(open_rows(tmp_path / f"s{k}", [16] * n, 16, first_token=k * 100_000) for k, n in enumerate(sizes))
    return pipeline.Mixture(parts, weights)


def test_mixture_proportions_match_weights(tmp_path):
    """Over 300 batches of 8 rows, each source's share of rows is within 0.01 of its weight."""
    it = pipeline.train_batches(_mixture(tmp_path), 8, seed=0)
    source = np.concatenate([next(it)["tokens"][:, 0] // 100_000 for _ in range(300)])
    shares = np.bincount(source, minlength=3) / len(source)
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.01)


def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    mix = _mixture(tmp_path)
    straight = pipeline.train_batches(mix, 4, seed=1)
    expected = [next(straight)["tokens"] for _ in range(40)]
    first = pipeline.train_batches(mix, 4, seed=1)
    for _ in range(25):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    resumed = pipeline.train_batches(mix, 4, seed=1)
    resumed.set_state(state)
    for k in range(25, 40):
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[k])


def test_each_host_reads_its_slice(tmp_path, monkeypatch):
    """Host h of 2 gets rows [2h, 2h + 2) of each global batch of 4: together, exactly the one-host batches."""
    mix = _mixture(tmp_path)
    whole = pipeline.train_batches(mix, 4, seed=2)
    expected = [next(whole)["tokens"] for _ in range(10)]  # [4, T] each
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    for host in (0, 1):
        monkeypatch.setattr(pipeline.jax, "process_index", lambda host=host: host)
        it = pipeline.train_batches(mix, 4, seed=2)
        for batch in expected:
            np.testing.assert_array_equal(next(it)["tokens"], batch[2 * host:2 * host + 2])


def test_gather_equals_rows(tmp_path):
    rows = open_rows(tmp_path / "s", [3, 40, 1, 1, 17, 9] * 5, 16)
    picked = np.array([4, 0, 11, 4, 2])
    batch = rows.gather(picked)
    for key in batch:
        np.testing.assert_array_equal(batch[key], np.stack([rows[i][key] for i in picked]))


def test_block_quotas_largest_remainder():
    weights = (0.6, 0.2, 0.1, 0.05, 0.05)
    quotas = pipeline.block_quotas(weights, 1024)
    assert sum(quotas) == 1024 and all(abs(q - w * 1024) < 1 for q, w in zip(quotas, weights))
    assert pipeline.block_quotas((1.0, 1.0, 1.0), 10) == (4, 3, 3)


def _small_build(tmp_path: Path):
    """A two-source build at tmp_path/built; returns make(weight_of_a) which (re)builds it."""
    tok_path = tmp_path / "tokenizer.json"
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["the", "a", "river", "bridge", "town", "of", "and", "spring", "moved", "old"])
                      for _ in range(120)) + "." for _ in range(40)]
    tokenizers.train_bpe(texts, 300).save(str(tok_path))
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)

    def make(weight: float):
        data = {"output": str(tmp_path / "built"), "tokenizer": str(tok_path), "num_workers": 1,
                "heldout_fraction": 0.2,
                "filters": {"gibberish": {"enabled": False}, "dedup": {"near": False}},
                "sources": {"a": {"type": "text", "path": str(tmp_path / "d[0-1]*.txt"), "weight": weight},
                            "b": {"type": "text", "path": str(tmp_path / "d[2-9]*.txt"), "weight": 1.0}}}
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        build.build(build.load_config(str(tmp_path / "b.yaml")))

    return make


TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.d_ff=64", "model.max_seq_len=32", "model.dtype=float32", "data.seq_len=32", "train.batch_size=2",
        "train.eval_batches=1", "train.progress=false", "train.num_samples=0", "checkpoint.use_async=false",
        "checkpoint.every=2"]


def test_checkpointed_iterator_resumes_and_a_remade_build_is_refused(tmp_path):
    """The loop's restore: same build -> the iterator continues exactly; the build remade with other weights
    (same data.* settings, so only the manifest differs) -> CheckpointError instead of silently other data."""
    import jax.numpy as jnp
    import optax

    from jaxllm import checkpoint
    from jaxllm.stages import pretrain
    from jaxllm.train import loop, state as state_lib

    make = _small_build(tmp_path)
    make(1.0)
    cfg = config_lib.load(None, TINY + [f"data.path={tmp_path / 'built'}"])
    _, source, eval_b, fp = pretrain.load_data(cfg)
    assert eval_b and eval_b[0]["tokens"].shape == (2, 32)
    straight = pipeline.train_batches(source, 2, 0)
    expected = [next(straight)["tokens"] for _ in range(6)]
    batches = pipeline.train_batches(source, 2, 0)
    for _ in range(3):
        next(batches)
    state = state_lib.create({"w": jnp.zeros(2)}, optax.sgd(0.1), 0)
    mgr = checkpoint.manager(tmp_path / "ckpt", keep=1, use_async=False)
    checkpoint.save(mgr, 3, state_lib.as_dict(state), data_state=batches.get_state(), meta={"data_fingerprint": fp})
    resumed = pipeline.train_batches(source, 2, 0)
    loop.restore_or_start(mgr, state, loop.Hooks(None, resumed, data_fingerprint=fp), lambda _: None)
    for k in range(3, 6):
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[k])
    make(3.0)
    _, source2, _, fp2 = pretrain.load_data(cfg)
    assert fp2 != fp
    with pytest.raises(CheckpointError, match="another data config"):
        loop.restore_or_start(mgr, state, loop.Hooks(None, pipeline.train_batches(source2, 2, 0), data_fingerprint=fp2),
                              lambda _: None)
    mgr.close()


@pytest.mark.slow
def test_pretrain_on_shards_refuses_a_remade_build(tmp_path):
    """End to end through `pretrain.run` (~40 s on 2 cores)."""
    from jaxllm.stages import pretrain

    make = _small_build(tmp_path)
    tiny = TINY + [f"data.path={tmp_path / 'built'}", f"train.runs_dir={tmp_path}"]
    make(1.0)
    pretrain.run(config_lib.load(None, tiny + ["train.steps=2"]))
    make(3.0)
    with pytest.raises(CheckpointError, match="another data config"):
        pretrain.run(config_lib.load(None, tiny + ["train.steps=4"]))


def test_mixture_override():
    names, weights = ["web", "books", "code"], [0.6, 0.3, 0.1]
    assert shards.override_weights(names, weights, "") == weights
    assert shards.override_weights(names, weights, "books=0.5, code=0") == [0.6, 0.5, 0.0]
    with pytest.raises(pipeline.DataError, match="no source 'wiki' in the build"):
        shards.override_weights(names, weights, "wiki=1")
    with pytest.raises(pipeline.DataError, match="must be name=weight"):
        shards.override_weights(names, weights, "web:1")
    with pytest.raises(pipeline.DataError, match="every source has weight 0"):
        shards.override_weights(names, weights, "web=0,books=0,code=0")
