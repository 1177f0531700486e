"""Every error a user can cause derives from jaxllm.errors.JaxllmError, which the CLI prints as one line."""

from __future__ import annotations

import pytest

from jaxllm import cli
from jaxllm.checkpoint import CheckpointError
from jaxllm.config import ConfigError
from jaxllm.data.pipeline import DataError
from jaxllm.data.tokenizer import TokenizerError
from jaxllm.errors import JaxllmError
from jaxllm.train.loop import TrainingError


@pytest.mark.parametrize("error", [ConfigError, DataError, CheckpointError, TokenizerError, TrainingError])
def test_user_errors_share_one_base(error):
    assert issubclass(error, JaxllmError) and issubclass(error, ValueError)


def test_training_error_stays_a_runtime_error():
    assert issubclass(TrainingError, RuntimeError)


def test_cli_prints_one_line(monkeypatch, capsys):
    def fail(argv):
        raise DataError("data.path: no such file 'x.jsonl'; give an existing file")

    monkeypatch.setitem(cli.COMMANDS, "pretrain", (fail, "train"))
    assert cli.main(["pretrain"]) == 1
    err = capsys.readouterr().err
    assert err == "jaxllm pretrain: error: data.path: no such file 'x.jsonl'; give an existing file\n"
