"""Configuration: small nested frozen dataclasses, loaded from YAML plus dotted `key=value` overrides.

Every section is a frozen dataclass; `load(path, overrides)` returns a validated `Config`. Unknown keys,
wrong types and out-of-range values raise `ConfigError` with one line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxllm.errors import JaxllmError


class ConfigError(JaxllmError):
    """A user's configuration mistake; the message is one line: what, where, how to fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    use_bias: bool = False
    max_seq_len: int = 128
    dtype: str = "bfloat16"  # compute dtype; parameters stay float32
    remat: str = "none"  # none | full | save_matmuls
    attention_impl: str = "auto"  # auto | xla | cudnn | pallas
    init_std: float = 0.02


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin | shards
    path: str = ""  # directory of built shards (source=shards)
    tokenizer: str = "builtin"  # builtin (BPE trained on the corpus) or a tokenizer.json path
    seq_len: int = 128
    heldout_fraction: float = 0.02
    max_documents: int = 0  # 0: all documents of the built-in corpus
    mixture: str = ""  # shards: "web=0.5,books=0.3" overrides the build's source weights (0 drops a source)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "tiny"
    runs_dir: str = "runs"
    steps: int = 300
    stop_at: int = 0  # stop with a checkpoint after this step (time-sliced jobs); 0: run to train.steps
    batch_size: int = 16
    seed: int = 0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 0  # 0: samples only at the end
    num_samples: int = 3
    sample_tokens: int = 48
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Explicit jax.distributed arguments; empty / 0 / -1 = auto-detect (TPU pod, SLURM, Open MPI)."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    cpu_collectives: str = "gloo"  # CPU backend's cross-process collectives (gloo | mpi)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 2
    use_async: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: bool = False  # call jax.distributed.initialize (multi-host); see cluster.*
    cluster: ClusterConfig = ClusterConfig()


# ---------------------------------------------------------------------------------------------------------
# Validation rules: key -> (predicate, what is allowed). Checked after every load.

_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "save_matmuls"),
    "model.attention_impl": ("auto", "xla", "cudnn", "pallas"),
    "data.source": ("builtin", "shards"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "cluster.cpu_collectives": ("gloo", "mpi"),
}
_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.max_seq_len", "data.seq_len", "train.steps", "train.batch_size", "train.log_every",
    "train.eval_every", "checkpoint.every", "checkpoint.keep", "optim.accum_steps", "model.rope_theta",
)
_NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.clip_norm", "train.z_loss",
                 "train.eval_batches", "train.sample_every", "train.stop_at", "data.max_documents", "model.head_dim")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Check ranges and cross-field constraints; raise ConfigError naming the key."""
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed; choose one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                          "set model.head_dim explicitly")
    if (m.head_dim or m.d_model // m.n_heads) % 2:
        raise ConfigError("model.head_dim must be even (RoPE rotates pairs of dimensions)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          "raise model.max_seq_len or lower data.seq_len")
    if cfg.train.batch_size % cfg.optim.accum_steps:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"optim.accum_steps={cfg.optim.accum_steps}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < cfg.data.heldout_fraction < 0.5:
        raise ConfigError(f"data.heldout_fraction={cfg.data.heldout_fraction} must be in (0, 0.5)")
    _validate_mesh(cfg)
    if cfg.data.source == "shards" and not cfg.data.path:
        raise ConfigError("data.source=shards needs data.path=<directory built by `jaxllm data build`>")
    return cfg


def _validate_mesh(cfg: Config) -> None:
    """Mesh sizes are > 0 or -1 (one of them); cluster.* only with distributed=true."""
    sizes = {f"mesh.{k}": v for k, v in dataclasses.asdict(cfg.mesh).items()}
    for key, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"{key}={v} must be a positive size or -1 (fill the remaining devices)")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"only one mesh axis may be -1 (got {', '.join(k for k, v in sizes.items() if v == -1)})")
    c = cfg.cluster
    if not cfg.distributed and (c.coordinator_address or c.num_processes or c.process_id >= 0):
        raise ConfigError("cluster.* is set but distributed=false; add distributed=true to start jax.distributed")
    if c.num_processes < 0 or (c.num_processes and not 0 <= c.process_id < c.num_processes):
        raise ConfigError(f"cluster.process_id={c.process_id} must be in [0, cluster.num_processes="
                          f"{c.num_processes})")


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with type checks and suggestions.


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, sections included."""
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, prefix + name + ".")
    return keys


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    candidates = all_keys(cls)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # a misspelled leaf under the right section: compare leaf names
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in candidates if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=3, cutoff=0.7)][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `jaxllm pretrain --help-config`"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and
                                               not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}'{where} expects {typ.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def from_dict(cls: type, data: dict, prefix: str = "", where: str = "", root: type | None = None,
              base: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types.

    Keys absent from `data` keep the values of `base` (a section's default instance, e.g. a stage config's
    `TrainConfig(batch_size=64)`), else the class defaults.
    """
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}'{where} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, root, where)
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            default = getattr(base, name, None) if base is not None else fields[name].default
            default = default if dataclasses.is_dataclass(default) else None
            kwargs[name] = from_dict(typ, value or {}, key + ".", where, root, default)
        else:
            kwargs[name] = _coerce(value, typ, key, where)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`optim.lr=3e-4` -> {"optim": {"lr": 3e-4}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; shipped configs are in configs/ "
                          f"({', '.join(p.name for p in sorted(Path('configs').glob('*.yaml'))) or 'none here'})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model:, train:, ...)")
    return data


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = (), cls: type = Config,
         validator: typing.Callable[[Any], Any] | None = None) -> Any:
    """Defaults <- YAML file <- dotted overrides, validated."""
    data: dict = {}
    if path:
        yaml_data = read_yaml(path)
        from_dict(cls, yaml_data, where=f" in {path}")  # key errors name the file
        data = yaml_data
    for text in overrides:
        update = parse_override(text)
        from_dict(cls, update, where=" (command-line override)")
        data = merge_dicts(data, update)
    cfg = from_dict(cls, data)
    return (validator or (validate if cls is Config else lambda c: c))(cfg)


def replace(cfg: Any, **dotted: Any) -> Any:
    """Functional update with dotted keys: replace(cfg, **{"train.steps": 10})."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads
