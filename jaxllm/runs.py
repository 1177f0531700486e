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


def kind(run_dir: str | Path) -> str:
    """Which stage made run_dir: pretrain | sft | reward | ppo (read from the sections of its config.yaml)."""
    saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    if "policy" in saved:
        return "ppo"
    if "pooling" in saved:
        return "reward"
    return "sft" if "init" in saved else "pretrain"


def load_params(run_dir: str | Path, model_cfg, what: str = "--run") -> tuple[dict, int]:
    """Parameters of the latest checkpoint of run_dir (float32), and its step. For a PPO run: the policy's.

    A reward-model run holds a backbone with a scalar head, not a language model: refused, naming its kind."""
    run_kind = kind(run_dir)
    if run_kind == "reward":
        raise config_lib.ConfigError(
            f"{what}={run_dir} is a reward-model run (a backbone with a scalar head); this needs a language-model "
            "run: a pretrain, sft or ppo run")
    _, abstract = models.abstract(model_cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    key = "policy_params" if run_kind == "ppo" else "params"
    return checkpoint.restore_params(Path(run_dir) / "checkpoints", abstract, key=key)
