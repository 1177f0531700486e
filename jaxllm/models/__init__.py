"""Model construction and the pure boundary: build -> split -> apply(graphdef, params, batch)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import ModelConfig
from jaxllm.models import transformer
from jaxllm.models.transformer import Transformer
from jaxllm.parallel import rules

Params = dict[str, Any]


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Transformer:
    return Transformer(cfg, rngs=rngs)


def split(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, params) with params a plain nested dict of float32 arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def init(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, Params]:
    return split(build(cfg, rngs=nnx.Rngs(seed)))


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params]:
    """Graphdef and ShapeDtypeStruct params, with no memory allocated."""
    return nnx.eval_shape(lambda: split(build(cfg, rngs=nnx.Rngs(0))))


def logical_axes(cfg: ModelConfig) -> dict:
    """The params dict's structure with each leaf replaced by its logical axis names (a tuple)."""
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(nnx.map_state(lambda _, v: v.get_metadata()["logical_axes"], state))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings of the params dict of `cfg` from the rules table (no parameter is allocated)."""
    _, shapes = abstract(cfg)
    return rules.logical_shardings(logical_axes(cfg), shapes, mesh, what="params")


def apply(graphdef: nnx.GraphDef, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    """Pure forward: float32 logits [B, T, V] for batch {tokens, positions, segment_ids}."""
    cfg = nnx.merge(graphdef, params).cfg
    return transformer.logits(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
