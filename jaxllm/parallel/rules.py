"""THE table from logical axis names to mesh axes, and helpers that shard pytrees with it.

Change this table, not the model, to change the parallelism.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "act_embed": None,  # activations' embed dimension
}


def spec(logical_axes: tuple[str | None, ...], rules: dict | None = None) -> P:
    """PartitionSpec for logical axes; a mesh axis is used at most once."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in logical_axes:
        target = rules.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return P(*out)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is set (jax.sharding.use_mesh); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical_axes))
