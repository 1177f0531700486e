"""SFT: template rendering and masks, loss on responses only, packing, bad records, and a tiny run."""

from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("JAXLLM_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-cache-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxllm import config as config_lib, losses, models  # noqa: E402
from jaxllm.data import formats, tokenizer as tokenizers  # noqa: E402
from jaxllm.data.pipeline import DataError  # noqa: E402
from jaxllm.logging import read_metrics  # noqa: E402
from jaxllm.stages import common, sft  # noqa: E402

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=64", "model.max_seq_len=64", "model.dtype=float32", "data.seq_len=64", "train.batch_size=8",
        "train.log_every=5", "train.progress=false", "train.num_samples=1", "train.sample_tokens=4",
        "checkpoint.every=1000", "optim.warmup_steps=2", "data.max_documents=40"]
TEMPLATE = formats.ChatTemplate()


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level tokenizer with no merges: one token per byte, so expected ids are easy to write down."""
    tok = tokenizers.train_bpe(["abc"], 256 + 2)
    formats.add_special_tokens(tok, TEMPLATE)
    return tok


def pieces(tok, ids):
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


def test_chat_template_renders_and_masks_multi_turn_token_by_token(byte_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    enc = formats.render(byte_tok, TEMPLATE, messages)
    expected = [("<|system|>", 0), ("\n", 0), ("S", 0), ("<|end|>", 0),
                ("<|user|>", 0), ("\n", 0), ("H", 0), ("i", 0), ("<|end|>", 0),
                ("<|assistant|>", 0), ("\n", 0), ("Y", 1), ("o", 1), ("<|end|>", 1),
                ("<|user|>", 0), ("\n", 0), ("Q", 0), ("<|end|>", 0),
                ("<|assistant|>", 0), ("\n", 0), ("A", 1), ("<|end|>", 1)]
    assert list(zip(pieces(byte_tok, enc.ids), enc.loss_mask.tolist())) == expected
    assert enc.response_start == 18
    prompt = formats.render(byte_tok, TEMPLATE, messages[:4], add_generation_prompt=True)
    assert pieces(byte_tok, prompt.ids)[-2:] == ["<|assistant|>", "\n"] and prompt.loss_mask.sum() == 1 + 2


def test_instruction_record_renders_input_after_instruction(byte_tok):
    msgs = formats.sft_messages({"instruction": "Do", "input": "x", "output": "ok"}, TEMPLATE)
    assert msgs == [{"role": "user", "content": "Do\n\nx"}, {"role": "assistant", "content": "ok"}]
    assert formats.sft_messages({"instruction": "Do", "input": "", "output": "ok"}, TEMPLATE)[0]["content"] == "Do"


def test_special_tokens_get_consecutive_new_ids_and_embedding_grows_by_mean_rows():
    tok = tokenizers.train_bpe(["abc"], 258)
    ids = formats.add_special_tokens(tok, TEMPLATE)
    assert ids == [258, 259, 260, 261] and formats.add_special_tokens(tok, TEMPLATE) == ids
    cfg = config_lib.ModelConfig(vocab_size=258, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                                 tie_embeddings=False)
    _, params = models.init(cfg, 0)
    grown = common.grow_vocab(params, cfg, 320)
    assert grown["embed"].shape == (320, 8) and grown["lm_head"].shape == (8, 320)
    np.testing.assert_array_equal(grown["embed"][:258], params["embed"])
    np.testing.assert_allclose(grown["embed"][300], np.asarray(params["embed"], np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(grown["lm_head"][:, 319], np.asarray(params["lm_head"], np.float64).mean(1), atol=1e-6)


def test_long_examples_truncate_prompt_from_left_or_drop():
    ex = formats.Encoded(np.arange(10, dtype=np.int32), np.array([0] * 6 + [1] * 4, np.int32), response_start=4)
    cut = formats.fit_length(ex, 7, "truncate")
    assert cut.ids.tolist() == [3, 4, 5, 6, 7, 8, 9] and cut.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert formats.fit_length(ex, 5, "truncate") is None  # the response turn alone needs 6 tokens
    assert formats.fit_length(ex, 7, "drop") is None
    assert formats.fit_length(ex, 10, "drop") is ex


def _examples(tok):
    convs = [[{"role": "user", "content": "what is it"}, {"role": "assistant", "content": "a cat"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
              {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"},
              {"role": "assistant", "content": "y z"}]]
    return [formats.render(tok, TEMPLATE, c) for c in convs]


def _oracle_loss(logits: np.ndarray, rows: dict) -> float:
    """float64 loop: mean -log p(token t) over t with loss_mask[t] = 1 in the same segment as t-1."""
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            seg = rows["segment_ids"][b]
            if rows["loss_mask"][b, t] and seg[t] != 0 and seg[t] == seg[t - 1]:
                z = logits[b, t - 1].astype(np.float64)
                total += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[rows["tokens"][b, t]]
                n += 1
    return total / n


def test_loss_ignores_prompt_targets_and_their_gradient_is_zero(byte_tok):
    rows = formats.pack_examples(_examples(byte_tok), 64, 0, pack=True)
    logits = jax.random.normal(jax.random.PRNGKey(0), (*rows["tokens"].shape, 270), jnp.float32)
    loss, m = losses.next_token(logits, rows)
    np.testing.assert_allclose(float(loss), _oracle_loss(np.asarray(logits), rows), rtol=1e-5)
    assert float(m["weight"]) == sum(int(e.loss_mask.sum()) for e in _examples(byte_tok))
    # Changing the tokens at non-target positions (as targets) leaves the loss unchanged.
    changed = dict(rows, tokens=np.where(rows["loss_mask"] == 1, rows["tokens"], (rows["tokens"] + 7) % 270))
    np.testing.assert_array_equal(float(losses.next_token(logits, changed)[0]), float(loss))
    # d loss / d logits is zero at every position whose next token is not a target.
    grad = jax.grad(lambda lg: losses.next_token(lg, rows)[0])(logits)
    target_next = np.zeros(rows["tokens"].shape, bool)
    target_next[:, :-1] = np.asarray(losses.target_mask(rows)) > 0
    assert np.all(np.asarray(grad)[~target_next] == 0.0) and np.any(np.asarray(grad)[target_next] != 0.0)


def test_packed_and_unpacked_batches_give_the_same_loss(byte_tok):
    cfg = sft.load(None, TINY)
    cfg = config_lib.replace(cfg, **{"model.vocab_size": 320})
    _, params = models.init(cfg.model, 0)
    packed = formats.pack_examples(_examples(byte_tok), 128, 0, pack=True)
    unpacked = formats.pack_examples(_examples(byte_tok), 128, 0, pack=False)
    assert packed["tokens"].shape[0] == 1 and unpacked["tokens"].shape[0] == 3
    assert packed["positions"][0, len(_examples(byte_tok)[0].ids)] == 0  # positions restart per example
    loss_fn = jax.jit(lambda p, b: sft.loss_fn(p, b, None, cfg=cfg))
    lp, mp = loss_fn(params, packed)
    lu, mu = loss_fn(params, unpacked)
    assert float(mp["loss_tokens"]) == float(mu["loss_tokens"])
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)


def test_batch_without_loss_tokens_raises():
    batch = {"loss_mask": np.zeros((2, 8), np.int32), "segment_ids": np.ones((2, 8), np.int32)}
    with pytest.raises(DataError, match="no loss token"):
        sft.check_batch(batch)
    batch["loss_mask"][1, 3] = 1
    assert sft.check_batch(batch) is batch


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


BAD = [{"instruction": "x"},  # missing output
       {"instruction": "x", "output": "  "},  # empty response
       {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
       {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
       "{not json"]


def test_bad_records_are_counted_and_skipped_with_file_and_line(tmp_path, byte_tok):
    good = {"instruction": "say hi", "output": "hi"}
    path = _write(tmp_path / "d.jsonl", [good] * 20 + BAD)
    counts = formats.Counts()
    d = sft.SFTDataConfig(path=path, seq_len=64, max_bad_ratio=0.5)
    out = sft.encode_records(formats.read_jsonl(path, counts), byte_tok, d, counts)
    assert len(out) == 20 and counts.bad == 5 and counts.records == 25
    assert counts.first_errors[0] == f"{path}:21: missing field 'output'"
    assert "role 'robot'" in counts.first_errors[2] and "no assistant turn" in counts.first_errors[3]
    assert counts.first_errors[4].startswith(f"{path}:25: invalid JSON")
    counts.check_ratio(0.5, path)
    with pytest.raises(DataError, match="5 of 25 records are malformed"):
        counts.check_ratio(0.1, path)


def test_missing_file_and_bad_config_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        list(formats.read_jsonl(tmp_path / "nope.jsonl", formats.Counts()))
    with pytest.raises(config_lib.ConfigError, match="data.long_policy"):
        sft.load(None, TINY + ["data.long_policy=keep"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'data.packing'"):
        sft.load(None, ["data.packing=true"])


def test_shipped_config_parses():
    cfg = sft.load("configs/sft_tiny.yaml", ["init.run=runs/x"])
    assert cfg.data.path == "builtin" and cfg.init.run == "runs/x" and cfg.train.steps == 0
    assert sft.SFTConfig().optim.lr == 1e-5 and sft.SFTConfig().train.batch_size == 64
    # An override in a section keeps the stage's own defaults for that section's other keys.
    cfg = sft.load(None, ["train.steps=5", "optim.lr=3e-3"])
    assert (cfg.train.batch_size, cfg.train.name, cfg.optim.warmup_steps, cfg.optim.lr) == (64, "sft", 100, 3e-3)


def test_tiny_sft_heldout_loss_falls(tmp_path):
    cfg = sft.load(None, TINY + [f"train.runs_dir={tmp_path}", "train.name=s", "data.max_modules=25",
                                 "train.steps=30", "train.eval_every=10", "optim.lr=3e-3",
                                 "data.heldout_fraction=0.2", "train.eval_batches=2"])
    run_dir = sft.run(cfg)
    evals = read_metrics(run_dir, "eval")
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, evals
    train = read_metrics(run_dir, "train")
    assert all(r["loss_tokens"] > 0 for r in train)
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {10, 20, 30} and "reference" in samples[0]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["kept"] > 0 and report["bad"] == 0


def test_sft_starts_from_a_pretrain_run_and_grows_its_vocab(tmp_path):
    from jaxllm import runs
    from jaxllm.stages import pretrain

    values = {"model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4,
              "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_seq_len": 64, "model.dtype": "float32",
              "data.seq_len": 32, "data.max_documents": 40, "data.heldout_fraction": 0.1, "train.batch_size": 2,
              "train.steps": 1, "train.eval_batches": 1, "train.progress": False, "train.num_samples": 0,
              "train.runs_dir": str(tmp_path), "train.name": "pt", "checkpoint.every": 1}
    pre_cfg = config_lib.replace(config_lib.Config(), **values)
    pretrain.run(pre_cfg)
    run_params, _ = runs.load_params(tmp_path / "pt", pre_cfg.model)
    cfg, tok, params = sft.resolve(sft.load(None, [f"init.run={tmp_path / 'pt'}", "data.seq_len=64"]))
    n_tok = runs.load_tokenizer(tmp_path / "pt").get_vocab_size()
    assert tok.get_vocab_size() == n_tok + 4 and cfg.model.d_model == 32 and cfg.model.n_layers == 1
    assert cfg.model.vocab_size == -(-(n_tok + 4) // 64) * 64 and params["embed"].shape[0] == cfg.model.vocab_size
    np.testing.assert_array_equal(params["embed"][:512], run_params["embed"])
    np.testing.assert_array_equal(params["layers"]["wq"], run_params["layers"]["wq"])


def test_cli_lists_the_stage_defaults(capsys):
    from jaxllm import cli

    assert cli.main(["sft", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size = 64" in out and "optim.lr = 1e-05" in out and "data.template.end = '<|end|>'" in out
    assert cli.main(["reward", "--help-config"]) == 0
    assert "loss.center_coef = 0.0" in capsys.readouterr().out
