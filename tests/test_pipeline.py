"""`jaxllm pipeline`: each stage's overrides form a valid config that starts from the previous run; finished
stages are skipped; (slow) the whole chain at smoke size through the CLI."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAXLLM_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-cache-"))

import pytest  # noqa: E402

from jaxllm import cli, config as config_lib  # noqa: E402
from jaxllm.logging import read_metrics  # noqa: E402
from jaxllm.stages import pipeline, ppo, reward, sft  # noqa: E402


@pytest.mark.parametrize("size", sorted(pipeline.SIZES))
def test_stage_overrides_validate_and_chain(size, tmp_path):
    runs = str(tmp_path)
    o = {s: pipeline.stage_overrides(s, size, "p", runs) for s in pipeline.STAGES}
    pre = config_lib.load(None, o["pretrain"])
    s, r, p = sft.load(None, o["sft"]), reward.load(None, o["reward"]), ppo.load(None, o["ppo"])
    assert (pre.train.name, s.train.name, r.train.name, p.train.name) == ("p-pretrain", "p-sft", "p-reward", "p-ppo")
    assert s.init.run == f"{runs}/p-pretrain" and r.init.run == f"{runs}/p-sft"
    assert (p.policy.run, p.reward.run) == (f"{runs}/p-sft", f"{runs}/p-reward")
    assert {c.train.runs_dir for c in (pre, s, r, p)} == {runs}
    assert s.data.seq_len <= pre.model.max_seq_len and r.data.seq_len <= pre.model.max_seq_len
    assert p.sampling.max_new_tokens + p.data.max_prompt_tokens <= pre.model.max_seq_len


def test_finished_stages_are_skipped_and_summarised(tmp_path):
    for i, stage in enumerate(pipeline.STAGES):
        run_dir = tmp_path / f"p-{stage}"
        run_dir.mkdir()
        (run_dir / pipeline.DONE).write_text(json.dumps({"stage": stage, "run": str(run_dir), "seconds": 1.5 * i,
                                                         "metric": 0.25}))
    printed: list[str] = []
    rows = pipeline.run("p", str(tmp_path), size="smoke", out=printed.append)
    assert [r["stage"] for r in rows] == list(pipeline.STAGES) and all(r["skipped"] for r in rows)
    table = printed[0].splitlines()
    assert table[1].split()[:2] == ["pretrain", "0.0*"] and "metric 0.2500" in table[4]
    assert table[-1].split()[:2] == ["total", "9.0"]


def test_unknown_size_is_a_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="size 'huge' is unknown"):
        pipeline.run("p", str(tmp_path), size="huge")


@pytest.mark.slow
def test_pipeline_smoke_end_to_end(tmp_path, capsys):
    """All four stages at smoke size (~80 s on 2 busy cores); a re-run skips them all."""
    argv = ["pipeline", "--name", "s", "--runs-dir", str(tmp_path), "--size", "smoke"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in ("pretrain", "sft", "reward", "ppo", "total"))
    assert read_metrics(tmp_path / "s-ppo", "train")[-1]["step"] == 1
    assert json.loads((tmp_path / "s-sft" / pipeline.DONE).read_text())["eval_loss"] > 0
    assert Path(tmp_path / "s-ppo" / "samples.jsonl").is_file()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("*") >= 4  # every stage skipped
