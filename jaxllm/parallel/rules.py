"""THE table from logical axis names to mesh axes, and helpers that shard pytrees with it.

Change this table, not the model, to change the parallelism.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

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


def fit(partition: P, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> P:
    """Drop, per dimension, the mesh axes that do not divide it (that dimension stays replicated over them)."""
    out = []
    for dim, entry in zip(shape, tuple(partition) + (None,) * (len(shape) - len(partition))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, ways = [], 1
        for name in names:
            if dim % (ways * axis_sizes[name]) == 0:
                kept.append(name)
                ways *= axis_sizes[name]
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return P(*out)


def active_mesh():
    """The mesh set by jax.set_mesh (abstract), or None when none is set: one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is set (jax.set_mesh); else a no-op.

    Dimensions a mesh axis does not divide (a batch of 1 while sampling) stay replicated over it.
    """
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, fit(spec(logical_axes), x.shape, dict(mesh.shape)))


def logical_shardings(axes_tree: Any, abstract_tree: Any, mesh: Mesh, *, what: str = "") -> Any:
    """NamedShardings for a pytree whose leaves have logical axis names (e.g. models.logical_axes; the
    params: models.param_shardings).

    axes_tree: same structure as abstract_tree, each leaf a tuple of names. A mesh axis that does not divide
    its dimension (e.g. 2 kv_heads on tensor=4) is dropped for that leaf, i.e. replicated, and logged.
    """
    sizes = dict(mesh.shape)

    def one(path, axes, leaf):
        want = spec(axes)
        got = fit(want, leaf.shape, sizes)
        if got != want:
            log.info("%s%s %s: %s does not divide evenly on mesh %s; using %s (replicated there)", what,
                     jax.tree_util.keystr(path), tuple(leaf.shape), want, sizes, got)
        return NamedSharding(mesh, got)

    return jax.tree_util.tree_map_with_path(one, axes_tree, abstract_tree, is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(abstract_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of a train-state pytree: every subtree shaped like the params (the params themselves,
    Adam's mu and nu, ...) follows the params' shardings; everything else (step, rng, counts) is replicated."""
    params_struct = jax.tree.structure(params_shardings)
    replicated = NamedSharding(mesh, P())

    def is_params_like(node) -> bool:
        return jax.tree.structure(node) == params_struct

    return jax.tree.map(lambda node: params_shardings if is_params_like(node) else replicated, abstract_state,
                        is_leaf=is_params_like)


def init_sharded(make: Callable[[], Any], shardings: Any) -> Any:
    """Run `make()` (e.g. model init + optimizer init) so that every output is born sharded:
    no device ever holds a whole copy of a sharded array."""
    return jax.jit(make, out_shardings=shardings)()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] batch arrays: rows split over data x fsdp, sequence whole."""
    return NamedSharding(mesh, spec(("batch", "seq")))


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """This host's rows [B / hosts, T] -> global arrays [B, T] (each host passes only its own slice)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        out[key] = jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * jax.process_count(),
                                                                         *x.shape[1:]))
    return out


def full_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """A batch every host holds whole (e.g. fixed eval batches) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    def whole(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return {key: whole(x) for key, x in batch.items()}


def shard_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree laid out with `shardings` (the largest shard per leaf)."""
    leaves = jax.tree.leaves(abstract_tree)
    sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(sh) == 1 and len(leaves) > 1:  # a single sharding for the whole tree
        sh = sh * len(leaves)
    return sum(math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf, s in zip(leaves, sh))
