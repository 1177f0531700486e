"""Run a function on each device's shard under a mesh: how kernels without partitioning rules (pallas_call)
see only their slice. Logical axes go through THE rules table (parallel/rules.py)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.parallel import rules

# attention's query [B, T, H, D] and key/value [B, S, K, D] layouts
Q_AXES, KV_AXES = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")


def mesh_spec(mesh, logical_axes: tuple[str, ...]) -> P:
    """rules.spec limited to the axes this mesh has (size-1 or absent axes replicate)."""
    names = set(mesh.axis_names)
    out = []
    for entry in rules.spec(logical_axes):
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a in names)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)


def ways(mesh, logical_axis: str) -> int:
    """How many devices split a logical axis on this mesh."""
    entry = mesh_spec(mesh, (logical_axis,))[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[n] for n in names]))


def per_shard(fn, args: tuple, axes: tuple, out_axes: tuple | None = None):
    """fn(*args), a Pallas kernel, on each device's shard under a mesh (batch and heads split, sequence whole);
    axes: each argument's logical axes (() for a replicated scalar); the output is laid out like args[0] (q),
    or, for several outputs, by out_axes (a tuple of logical axes per output).

    A pallas_call has no partitioning rule, so without this XLA would gather the whole batch to every device.
    """
    mesh = rules.active_mesh()
    if mesh is None:
        return fn(*args)
    specs = tuple(None if x is None else mesh_spec(mesh, a) for x, a in zip(args, axes))
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit meshes: move the data first
        args = tuple(x if x is None else jax.reshard(x, spec) for x, spec in zip(args, specs))
    out_specs = specs[0] if out_axes is None else tuple(mesh_spec(mesh, a) for a in out_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
