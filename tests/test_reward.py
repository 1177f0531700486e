"""Reward model: Bradley-Terry loss, the scalar head's padding invariance, preference data, a tiny run."""

from __future__ import annotations

import io
import itertools
import json
import os
import tempfile

os.environ.setdefault("JAXLLM_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-cache-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxllm import config as config_lib, losses, models  # noqa: E402
from jaxllm.data import formats, instructions, tokenizer as tokenizers  # noqa: E402
from jaxllm.data.pipeline import DataError  # noqa: E402
from jaxllm.logging import read_metrics  # noqa: E402
from jaxllm.models import heads  # noqa: E402
from jaxllm.stages import reward  # noqa: E402

MODEL = config_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                               max_seq_len=32, dtype="float32")


def _np_bt(rc, rr, margin, center):
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    d = rc - rr - margin
    return np.mean([-np.log(1.0 / (1.0 + np.exp(-x))) for x in d]) + center * np.mean((rc + rr) ** 2)


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.1), (0.3, 0.05)])
def test_bradley_terry_equals_numpy_formula(margin, center):
    rc = np.array([1.5, -0.2, 3.0, 0.0, -4.0], np.float32)
    rr = np.array([0.5, 0.3, -2.0, 0.0, 1.0], np.float32)
    loss, m = losses.bradley_terry(jnp.asarray(rc), jnp.asarray(rr), margin=margin, center_coef=center)
    np.testing.assert_allclose(float(loss), _np_bt(rc, rr, margin, center), rtol=1e-6)
    assert float(m["accuracy"]) == pytest.approx(2 / 5) and float(m["weight"]) == 5
    np.testing.assert_allclose(float(m["margin"]), np.mean(rc.astype(np.float64) - rr), rtol=1e-6)
    both = np.concatenate([rc, rr]).astype(np.float64)
    np.testing.assert_allclose([float(m["reward_mean"]), float(m["reward_std"])], [both.mean(), both.std()], rtol=1e-5)


def test_bradley_terry_is_stable_for_large_gaps_and_swap_flips_margin():
    rc, rr = jnp.array([200.0, -200.0]), jnp.array([-200.0, 200.0])
    loss, m = losses.bradley_terry(rc, rr)
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(200.0, rel=1e-6)  # mean(0, 400)
    _, swapped = losses.bradley_terry(rr, rc)
    assert float(swapped["margin"]) == -float(m["margin"])
    rc, rr = jnp.array([1.0, 2.0, -0.5]), jnp.array([0.0, 2.5, -1.0])
    _, a = losses.bradley_terry(rc, rr)
    _, b = losses.bradley_terry(rr, rc)
    assert float(a["margin"]) == pytest.approx(-float(b["margin"]))
    assert float(a["accuracy"]) == pytest.approx(1 - float(b["accuracy"]))


def test_last_token_index_for_ragged_lengths_and_either_padding_side():
    right = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    assert heads.last_token_index(jnp.asarray(right)).tolist() == [2, 0, 4]
    assert heads.last_token_index(jnp.asarray(left)).tolist() == [4, 4, 4]
    assert heads.positions_from_mask(jnp.asarray(left))[0].tolist() == [0, 0, 0, 1, 2]


def _rm_params(seed=0):
    _, backbone = models.init(MODEL, seed)
    return heads.from_backbone(backbone, MODEL, seed, std=0.2)


@pytest.mark.parametrize("pooling", heads.POOLINGS)
def test_reward_does_not_depend_on_padding_side_or_amount(pooling):
    params = _rm_params()
    seqs = [[5, 9, 3, 7, 1], [4, 2, 1], [8, 8, 6, 5, 4, 3, 2, 1]]
    rows = []
    score = jax.jit(lambda p, t, m: heads.score(p, MODEL, t, m, pooling))
    for pad_right, width in [(True, 8), (True, 16), (False, 16)]:
        tokens = np.zeros((3, width), np.int32)
        mask = np.zeros((3, width), np.int32)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if pad_right else slice(width - len(s), width)
            tokens[i, sl], mask[i, sl] = s, 1
        rows.append(np.asarray(score(params, jnp.asarray(tokens), jnp.asarray(mask))))
    for other in rows[1:]:
        np.testing.assert_allclose(other, rows[0], rtol=1e-5, atol=1e-5)
    # Oracle: each sequence scored alone with no padding at all.
    alone = [float(score(params, jnp.asarray([s]), jnp.ones((1, len(s)), jnp.int32))[0]) for s in seqs]
    np.testing.assert_allclose(rows[0], alone, rtol=1e-5, atol=1e-5)
    assert np.std(rows[0]) > 1e-4  # different sequences get different rewards (the test can fail)
    if pooling == "mean":  # oracle: the mean of the per-token head outputs of each unpadded sequence
        per_token = [heads.scalars(params, MODEL, jnp.asarray([s]), jnp.arange(len(s))[None],
                                   jnp.ones((1, len(s)), jnp.int32)) for s in seqs]
        np.testing.assert_allclose(rows[0], [float(np.asarray(x, np.float64).mean()) for x in per_token], rtol=1e-5,
                                   atol=1e-5)


def test_swapping_chosen_and_rejected_flips_the_margin():
    params = _rm_params(1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 64, (4, 2, 16)).astype(np.int32)
    mask = np.ones((4, 2, 16), np.int32)
    mask[:, 1, 10:] = 0
    cfg = reward.RewardConfig(model=MODEL)
    loss_fn = jax.jit(lambda p, b: reward.loss_fn(p, b, None, cfg=cfg)[1])
    m = loss_fn(params, {"tokens": tokens, "mask": mask})
    s = loss_fn(params, {"tokens": tokens[:, ::-1], "mask": mask[:, ::-1]})
    np.testing.assert_allclose(float(s["margin"]), -float(m["margin"]), rtol=1e-5)
    assert abs(float(m["margin"])) > 1e-5


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


@pytest.fixture(scope="module")
def byte_tok():
    tok = tokenizers.train_bpe(["abc"], 258)
    formats.add_special_tokens(tok, formats.ChatTemplate())
    return tok


def test_preference_records_both_formats_ties_and_bad_lines(tmp_path, byte_tok):
    lines = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
             {"prompt": "p", "response_A": "x", "response_B": "yy", "preference": "B"},
             {"prompt": "p", "response_A": "x", "response_B": "y", "preference": "tie"},  # tie
             {"prompt": "p", "chosen": "same", "rejected": "same"},  # tie
             {"prompt": "p", "chosen": "c"},  # missing rejected
             {"prompt": "p", "response_A": "x", "response_B": "y", "preference": "C"}, "[1, 2",
             {"prompt": "p", "response_A": "x", "response_B": "y"}]  # no preference
    path = _write(tmp_path / "prefs.jsonl", lines)
    counts = formats.Counts()
    d = reward.RewardDataConfig(seq_len=32)
    pairs = reward.encode_pairs(formats.read_jsonl(path, counts), byte_tok, d, counts)
    assert pairs["tokens"].shape == (2, 2, 32) and (counts.kept, counts.ties, counts.bad) == (2, 2, 4)
    assert counts.first_errors[0] == f"{path}:5: missing field 'rejected'"
    assert counts.first_errors[2].startswith(f"{path}:7: invalid JSON")
    eos = tokenizers.eos_id(byte_tok)
    chosen = pairs["tokens"][1, 0][pairs["mask"][1, 0] == 1]  # preference B: chosen = "yy"
    assert chosen[-1] == eos and byte_tok.decode(chosen.tolist()).endswith("yy")
    assert counts.first_errors[3] == f"{path}:8: missing field 'preference' (\"A\", \"B\" or \"tie\")"
    with pytest.raises(DataError, match="4 of 8 records are malformed"):
        counts.check_ratio(0.1, path)


def test_builtin_preference_set_is_deterministic_with_near_misses():
    a_train, a_held = instructions.preference_records(0.2, max_modules=12)
    b_train, b_held = instructions.preference_records(0.2, max_modules=12)
    assert a_train == b_train and a_held == b_held and a_train and a_held
    module = {w: w.split(":")[1].rsplit(".", 1)[0] for w, _ in a_train + a_held}
    held_modules = {module[w] for w, _ in a_held}
    assert not held_modules & {module[w] for w, _ in a_train}  # split by module
    line_module = {r["chosen"]: module[w] for w, r in a_train + a_held}
    for w, r in a_train + a_held:
        assert r["chosen"] != r["rejected"] and line_module[r["rejected"]] == module[w]  # same module's line
    # Each line is rejected exactly as often as it is chosen: a line alone says nothing about the label.
    chosen = sorted(r["chosen"] for _, r in a_train + a_held)
    assert sorted(r["rejected"] for _, r in a_train + a_held) == chosen
    # More rounds: more pairs per instruction, each with a different near miss of the same module.
    two = [(w, r["prompt"], r["rejected"]) for w, r in sum(instructions.preference_records(0.2, 12, rounds=2), [])]
    assert len(set(two)) == len(two) > len(a_train + a_held)
    assert {w: line_module[rej] for w, _, rej in two} == {w: module[w] for w, _, _ in two}


def test_builtin_methods_add_pairs_with_the_same_properties():
    train, held = instructions.preference_records(0.2, max_modules=12, methods=True)
    fns = instructions.stdlib_functions(12, methods=True)
    module = {f"builtin:{f['module']}.{f['function']}": f["module"] for f in fns}
    assert held and sum("." in f["function"] for f in fns) > len(fns) / 2  # mostly methods: Class.method
    assert not {module[w] for w, _ in held} & {module[w] for w, _ in train}  # still split by module
    line_module = {r["chosen"]: module[w] for w, r in train + held}
    assert all(line_module[r["rejected"]] == module[w] for w, r in train + held)
    assert sorted(r["rejected"] for _, r in train + held) == sorted(r["chosen"] for _, r in train + held)
    plain = {f"builtin:{f['module']}.{f['function']}" for f in instructions.stdlib_functions()
             if f["module"] in set(module.values())}
    assert plain and plain <= set(module)  # the top-level functions of those modules are still there
    # Oracle from the source text: `def send(self, value)` of class Coroutine in _collections_abc.
    assert "Summarise what `_collections_abc.Coroutine.send(value)` does." in {r["prompt"] for _, r in train + held}


def test_builtin_held_out_pairs_are_learnable_from_the_prompt():
    """A rule that reads the prompt (words of the line inside the function's name) beats chance on held-out
    modules: measured 0.856 on 184 pairs (heldout_fraction 0.1, Python 3.12; 0.871 on 610 pairs with
    methods=True); with the old next-function near miss it was 0.72. Chance = 0.5 (each line is chosen once and
    rejected once)."""
    _, held = instructions.preference_records(0.1)
    fn = lambda r: {"function": r["prompt"].split("`")[1].split("(", 1)[0], "signature": r["prompt"].split("(", 1)[1]}
    wins = [np.sign(instructions.name_overlap(fn(r), r["chosen"]) - instructions.name_overlap(fn(r), r["rejected"]))
            for _, r in held]
    assert len(held) >= 100 and np.mean(np.array(wins) / 2 + 0.5) >= 0.8


def test_near_misses_minimise_name_overlap_like_brute_force():
    fns = [{"function": f, "signature": sig, "summary": line} for f, sig, line in [
        ("isleap", "year", "Return True for leap years."), ("leapdays", "y1, y2", "Number of leap days."),
        ("weekday", "year, month, day", "Return the weekday of a day."), ("monthrange", "year, month", "Return the "
         "weekday and length of a month."), ("timegm", "tuple", "Unix timestamp from a time tuple."),
        ("same", "x", "Unix timestamp from a time tuple.")]]
    idx = list(range(len(fns)))
    miss = instructions.near_misses(fns, idx)
    assert sorted(miss.values()) == sorted(miss) == idx  # a permutation of the module's functions
    assert all(fns[i]["summary"] != fns[j]["summary"] for i, j in miss.items())
    cost = lambda perm: sum(instructions.name_overlap(fns[i], fns[j]["summary"]) for i, j in enumerate(perm))
    valid = [p for p in itertools.permutations(idx) if all(fns[i]["summary"] != fns[j]["summary"]
                                                           for i, j in enumerate(p))]
    assert cost([miss[i] for i in idx]) == min(cost(p) for p in valid)  # oracle: every valid permutation
    again = instructions.near_misses(fns, idx, set(miss.items()))  # a second round avoids the first's pairs
    assert not set(again.items()) & set(miss.items()) and len(again) == len(idx)
    assert instructions.name_overlap(fns[0], "Leap years, a YEAR") == 2 and instructions.near_misses(fns, [3]) == {}


def test_bad_config_and_missing_run_are_one_line_errors(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="loss.margin"):
        reward.load(None, ["loss.margin=-1"])
    with pytest.raises(config_lib.ConfigError, match="pooling='max' is not one of last, mean"):
        reward.load(None, ["pooling=max"])
    with pytest.raises(config_lib.ConfigError, match="not a run directory"):
        reward.load_reward_model(tmp_path)
    cfg = reward.load("configs/rm_tiny.yaml", ["init.run=runs/sft"])
    assert cfg.loss.center_coef == 0.01 and cfg.train.name == "rm-tiny"
    assert reward.RewardConfig().optim.lr == 1e-5


def test_match_init_ties_keys_to_queries_and_word_tokenizer_shares_name_tokens(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="match_init=2.0 needs a random init"):
        reward.load(None, ["match_init=2", "init.run=runs/sft", "model.n_kv_heads=4", "model.n_heads=4"])
    with pytest.raises(config_lib.ConfigError, match="match_init=2.0 needs a random init"):
        reward.load(None, ["match_init=2", "model.n_kv_heads=2", "model.n_heads=4"])
    tok = tokenizers.train_word_bpe(["decode the header", "decode_header(value)"] * 20, 300)
    tok.save(str(tmp_path / "words.json"))
    over = [f"data.tokenizer={tmp_path / 'words.json'}", "model.vocab_size=320", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32"]
    _, _, plain = reward.init_params(reward.load(None, over))
    _, _, tied = reward.init_params(reward.load(None, over + ["match_init=3"]))
    layers = tied["backbone"]["layers"]
    np.testing.assert_array_equal(np.asarray(layers["wq"]), 3 * np.asarray(plain["backbone"]["layers"]["wq"]))
    np.testing.assert_array_equal(np.asarray(layers["wk"]), np.asarray(layers["wq"]))
    name, line = tok.encode("email.decode_header(header)").tokens, tok.encode("Decode a message Header.").tokens
    assert {"decode", "header"} <= set(name) & set(line)


TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=64", "model.max_seq_len=64", "model.dtype=float32", "data.seq_len=64", "train.batch_size=8",
        "train.log_every=10", "train.progress=false", "checkpoint.every=1000", "optim.warmup_steps=5",
        "data.max_documents=40"]


def test_tiny_reward_run_writes_stats_and_scores_a_file(tmp_path):
    cfg = reward.load(None, TINY + [f"train.runs_dir={tmp_path}", "train.name=rm", "data.max_modules=12",
                                    "data.heldout_fraction=0.2", "train.steps=80", "train.eval_every=40",
                                    "train.eval_batches=1", "optim.lr=1e-3", "train.log_every=5"])
    run_dir = reward.run(cfg)
    stats = json.loads((run_dir / "reward_stats.json").read_text())
    assert stats["step"] == 80 and stats["std"] > 0 and 0 <= stats["heldout_accuracy"] <= 1
    assert [e["step"] for e in read_metrics(run_dir, "eval")] == [40, 80]
    # It learns: the training pairs (about 30) are fitted. Held-out accuracy: test_tiny_reward_model_generalises.
    train = read_metrics(run_dir, "train")
    assert train[0]["accuracy"] < 0.8 and train[-1]["accuracy"] >= 0.9, [r["accuracy"] for r in train]
    path = _write(tmp_path / "in.jsonl", [{"prompt": "Summarise what `os.getcwd()` does.", "response": "cwd"},
                                         {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": 3}])
    out = io.StringIO()
    counts = reward.score_file(run_dir, path, out, batch_size=4)
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts.bad == 1 and len(rows) == 2
    _, tok, params, st = reward.load_reward_model(run_dir)
    enc, _ = formats.encode_scored(tok, cfg.data.template, "p", "a", tokenizers.eos_id(tok), 64, "truncate")
    loaded = reward.load_reward_model(run_dir)[0]
    assert loaded.pooling == cfg.pooling == "mean"
    direct = float(heads.score(params, loaded.model, jnp.asarray(enc.ids[None]), jnp.ones((1, len(enc.ids)), jnp.int32),
                               "mean")[0])
    np.testing.assert_allclose(rows[1]["reward_chosen"], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows[1]["reward_chosen_normalized"], (direct - st["mean"]) / st["std"], rtol=1e-4,
                               atol=1e-5)
    # PPO's plug point: rows without EOS (any padding) score as the EOS-terminated sequence, normalised.
    body = enc.ids[:-1]
    tokens = np.zeros((2, 40), np.int32)
    segment_ids = np.zeros((2, 40), np.int32)
    tokens[0, : len(body)], segment_ids[0, : len(body)] = body, 1  # right-padded
    tokens[1, 40 - len(body):], segment_ids[1, 40 - len(body):] = body, 1  # left-padded
    ppo_scores = reward.ppo_score_fn(run_dir)({"tokens": tokens, "segment_ids": segment_ids})
    np.testing.assert_allclose(np.asarray(ppo_scores), [(direct - st["mean"]) / st["std"]] * 2, rtol=1e-4, atol=1e-4)
    # A stage that needs a language model names the run's kind instead of a missing checkpoint entry.
    from jaxllm.stages import sft

    with pytest.raises(config_lib.ConfigError,
                       match=r"init.run=.* is a reward-model run .* needs a language-model run"):
        sft.resolve(sft.load(None, [f"init.run={run_dir}"]))


def test_tiny_reward_model_generalises_to_held_out_modules(tmp_path):
    """configs/rm_scratch.yaml from random init in about 65 s of 2-core CPU: the built-in set with methods (3993
    training pairs; 610 held-out pairs from modules never seen in training), the word tokenizer, match_init and
    probe_head, lr 1e-4, 200 steps. Measured 0.723 held-out accuracy (seed 0; seed 1: 0.726; 0.748 at 300 steps);
    chance = 0.5, standard error 0.02 at 610 pairs. Without match_init and probe_head this model stays at 0.50-0.58
    (docs/sft_reward.md)."""
    cfg = reward.load("configs/rm_scratch.yaml", [f"train.runs_dir={tmp_path}", "train.progress=false"])
    assert (cfg.data.tokenizer, cfg.data.max_documents) == ("builtin-words", 200)
    run_dir = reward.run(cfg)
    stats = json.loads((run_dir / "reward_stats.json").read_text())
    held = json.loads((run_dir / "data_report.json").read_text())
    assert held["kept"] == 3993 + 610 and stats["step"] == 200
    assert stats["heldout_accuracy"] >= 0.65, stats
