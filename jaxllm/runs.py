"""Reading a finished (or running) run directory: its config, tokenizer and parameters."""

from __future__ import annotations

from pathlib import Path

import jax
import yaml

from jaxllm import checkpoint, config as config_lib, models
from jaxllm.config import Config, ModelConfig
from jaxllm.data import tokenizer as tokenizers


def load_config(run_dir: str | Path, cls: type = Config):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise config_lib.ConfigError(f"{run_dir} is not a run directory (no config.yaml); "
                                     "pass --run runs/<name> of a trained run")
    return config_lib.load(path, cls=cls)


def load_tokenizer(run_dir: str | Path):
    return tokenizers.load(Path(run_dir) / "tokenizer.json")


def model_config(run_dir: str | Path, what: str = "--run") -> ModelConfig:
    """The model of any stage's run: its `model` section (pretrain, SFT, reward), or for a PPO run the model of
    its policy run. `what` names the option the user passed, for the error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise config_lib.ConfigError(f"{what}={run_dir} is not a run directory (no config.yaml); "
                                     f"pass {what}=runs/<name> of a trained run")
    saved = yaml.safe_load(path.read_text()) or {}
    if "model" in saved:
        return config_lib.from_dict(ModelConfig, saved["model"], prefix="model.", where=f" in {path}")
    policy_run = (saved.get("policy") or {}).get("run")
    if policy_run:
        return model_config(policy_run, what=f"policy.run in {path}")
    raise config_lib.ConfigError(f"{path} has no model section and no policy.run; is {run_dir} a jaxllm run?")


def load_params(run_dir: str | Path, model_cfg) -> tuple[dict, int]:
    """Parameters of the latest checkpoint of run_dir (float32), and its step. For a PPO run: the policy's."""
    _, abstract = models.abstract(model_cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    directory = Path(run_dir) / "checkpoints"
    try:
        return checkpoint.restore_params(directory, abstract)
    except checkpoint.CheckpointError:
        if not (Path(run_dir) / "config.yaml").is_file() or "policy" not in yaml.safe_load(
                (Path(run_dir) / "config.yaml").read_text()):
            raise
        return checkpoint.restore_params(directory, abstract, key="policy_params")
