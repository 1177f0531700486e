"""Reading a finished (or running) run directory: its config, tokenizer and parameters."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxllm import checkpoint, config as config_lib, models
from jaxllm.config import Config
from jaxllm.data import tokenizer as tokenizers


def load_config(run_dir: str | Path, cls: type = Config):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise config_lib.ConfigError(f"{run_dir} is not a run directory (no config.yaml); "
                                     "pass --run runs/<name> of a trained run")
    return config_lib.load(path, cls=cls)


def load_tokenizer(run_dir: str | Path):
    return tokenizers.load(Path(run_dir) / "tokenizer.json")


def load_params(run_dir: str | Path, model_cfg) -> tuple[dict, int]:
    """Parameters of the latest checkpoint of run_dir (float32), and its step."""
    _, abstract = models.abstract(model_cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    return checkpoint.restore_params(Path(run_dir) / "checkpoints", abstract)
