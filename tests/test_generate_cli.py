"""`jaxllm generate` end to end on a hand-made run directory: JSONL in, JSONL out, and one-line errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml

from jaxllm import checkpoint, cli, config as config_lib, models
from jaxllm.data import tokenizer as tokenizers
from jaxllm.generate import sampling
from tests.conftest import load_script

MODEL = {"model.vocab_size": 300, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
         "model.n_kv_heads": 1, "model.d_ff": 64, "model.max_seq_len": 48, "model.dtype": "float32",
         "data.seq_len": 32, "model.init_std": 0.2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """config.yaml + tokenizer.json + an Orbax checkpoint holding only params, as `runs.load_*` expect."""
    path = tmp_path_factory.mktemp("run")
    cfg = config_lib.validate(config_lib.replace(config_lib.Config(), **MODEL))
    (path / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    tok = tokenizers.train_bpe(["def f(x):\n    return x + 1\n", "hello world, hello jax"] * 20, 300)
    tok.save(str(path / "tokenizer.json"))
    _, params = models.init(cfg.model, 0)
    mgr = checkpoint.manager(path / "checkpoints", keep=1, use_async=False)
    checkpoint.save(mgr, 3, {"params": params})
    mgr.wait_until_finished()
    mgr.close()
    return path, cfg, tok, params


def test_prompts_jsonl_in_jsonl_out_matches_library(run_dir, tmp_path, capsys):
    path, cfg, tok, params = run_dir
    prompts = ["def f(x):", "hello", "hello world, hello"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts[1:]) + "\n\n")
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--run", str(path), "--prompt", prompts[0], "--prompts", str(src), "--output",
                   str(out), "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts and all(r["step"] == 3 for r in records)
    graphdef, _ = models.abstract(cfg.model)
    sc = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_tokens=(tokenizers.eos_id(tok),))
    for record, prompt in zip(records, prompts):  # batches of 2 (the last one padded) = each prompt alone
        tokens, _, mask = sampling.generate(graphdef, params, [tok.encode(prompt).ids], jax.random.key(0), sc)
        new = np.asarray(tokens[0])[np.asarray(mask[0]) == 1].tolist()
        assert record["num_tokens"] == len(new)
        stopped = record["finish_reason"] == "stop"
        assert record["text"] == tok.decode(new[:-1] if stopped else new)


def test_bad_inputs_give_one_line_errors(run_dir, tmp_path, capsys):
    path = run_dir[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert cli.main(["generate", "--run", str(path), "--prompts", str(bad)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(path), "--prompts", str(tmp_path / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(path), "--prompt", ""]) == 1
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(path), "--prompt", "hi", "--max-new-tokens", "100"]) == 1
    assert "max_new_tokens" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(path), "--prompt", "hello " * 60, "--max-new-tokens", "8"]) == 1
    assert "shorten it" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_generate_tiny_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "scripts/bench_generate.py", "--tiny", "--no-hf"], cwd=root,
                            capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"impl": "jaxllm"' in result.stdout and "| tiny | jaxllm |" in result.stdout


def test_bench_generate_report_gives_each_rounds_speed_up(capsys):
    """The benchmark's table pairs ours with the peer round by round, takes the median over rounds, and gives
    ours against the peer's fastest round."""
    bench = load_script("bench_generate")
    row = lambda impl, rnd, tok_s: {"config": "1b", "impl": impl, "round": rnd, "card": "GPU",  # noqa: E731
                                    "new_tokens_per_s": tok_s}
    peer = [row("hf", i, tok_s) for i, tok_s in enumerate((5_000.0, 6_000.0, 4_000.0))]
    for r, kernel_s in zip(peer, (0.5, 0.25, 1.0)):
        r.update(median_s=1.0, kernel_s=kernel_s)  # seconds of GPU work in a 1-second call
    bench._report([row("jaxllm", 0, 50_000.0), peer[0], row("jaxllm", 1, 54_000.0), peer[1],
                   row("jaxllm", 2, 52_000.0), peer[2]])
    out = capsys.readouterr().out
    assert "| 1b | jaxllm | GPU | 52,000 | 10.0x, 9.0x, 13.0x | 8.7x | - | - |" in out  # 52,000 / 6,000
    assert "| 1b | hf | GPU | 5,000 | - | - | - | 50%, 25%, 100% |" in out


def test_bench_generate_sums_the_peers_gpu_time_from_a_trace(tmp_path):
    """The peer's GPU time is the sum of its kernel, copy and fill events in a Chrome trace, nothing else."""
    bench = load_script("bench_generate")
    events = [{"ph": "X", "cat": "kernel", "dur": 1500}, {"ph": "X", "cat": "gpu_memcpy", "dur": 250},
              {"ph": "X", "cat": "gpu_memset", "dur": 50}, {"ph": "X", "cat": "cpu_op", "dur": 9000},
              {"ph": "X", "cat": "cuda_runtime", "dur": 700}, {"ph": "i", "cat": "kernel"}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert bench.trace_gpu_seconds(str(path)) == pytest.approx(1.8e-3, rel=1e-12)
