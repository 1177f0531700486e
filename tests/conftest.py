"""Shared fixtures: a per-session cache directory and tiny configs that compile fast on 2 CPU cores."""

from __future__ import annotations

import os
import tempfile

# Before jax is imported anywhere: a private cache for tokenizers and tokenized corpora.
os.environ.setdefault("JAXLLM_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-cache-"))

import pytest  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402

TINY_MODEL = {
    "model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.d_ff": 64, "model.max_seq_len": 64, "model.dtype": "float32",
}


def tiny_config(**overrides):
    """The smallest sensible Config for tests (float32 compute so oracles compare tightly)."""
    cfg = config_lib.Config()
    values = {**TINY_MODEL, "data.seq_len": 32, "data.max_documents": 60, "data.heldout_fraction": 0.1,
              "train.batch_size": 4, "train.steps": 6, "train.log_every": 2, "train.eval_every": 3,
              "train.eval_batches": 2, "train.progress": False, "train.num_samples": 1, "train.sample_tokens": 4,
              "checkpoint.every": 3, "optim.warmup_steps": 2, **overrides}
    return config_lib.validate(config_lib.replace(cfg, **values))


@pytest.fixture
def tiny():
    return tiny_config


def load_script(name: str):
    """A script under scripts/ imported as a module (the scripts are not a package), e.g. to test its functions."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
