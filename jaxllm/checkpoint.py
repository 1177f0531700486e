"""Orbax checkpoints of the whole training state plus the data iterator's state and a metadata record.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames when complete), so an
interrupted run never leaves a checkpoint that restores wrongly; restore always takes the latest complete one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.errors import JaxllmError


class CheckpointError(JaxllmError):
    pass


def manager(directory: str | Path, *, keep: int, use_async: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                           create=True)
    # Naming each item's handler lets item_metadata() read them all (without it Orbax warns per item).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, *, data_state: dict | None = None,
         meta: dict | None = None, force: bool = False) -> None:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_state is not None:
        args["data"] = ocp.args.JsonSave(data_state)
    mgr.save(step, args=ocp.args.Composite(**args), force=force)


def _shape_mismatch(target: Any, saved: Any) -> str | None:
    """First leaf path whose shape differs between the target and the saved metadata, as text."""
    flat_t = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    flat_s = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    for path, leaf in flat_t.items():
        other = flat_s.get(path)
        if other is not None and tuple(getattr(other, "shape", ())) != tuple(leaf.shape):
            return f"{jax.tree_util.keystr(path)}: checkpoint {tuple(other.shape)} vs config {tuple(leaf.shape)}"
    return None


def restore(mgr: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None,
            with_data: bool = True) -> tuple[Any, dict | None, dict]:
    """(state, data_state, meta) of the latest (or given) step, onto abstract_state's shapes and shardings."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mgr.directory}")
    try:
        saved_meta = mgr.item_metadata(step)["state"]
        problem = _shape_mismatch(abstract_state, saved_meta) if saved_meta is not None else None
    except Exception:  # metadata layouts differ across Orbax versions; the restore below still checks
        problem = None
    if problem:
        raise CheckpointError(f"checkpoint {mgr.directory}/{step} does not match the config ({problem}); "
                              "use the run's own config or a new train.name")
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if with_data and (Path(mgr.directory) / str(step) / "data").exists():
        args["data"] = ocp.args.JsonRestore()
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {mgr.directory}/{step} does not match the config: "
                              f"{str(e).splitlines()[0][:300]}") from None
    # Orbax hands back custom nodes (optax NamedTuples, dataclasses) as plain containers: re-impose structure.
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(out["state"]))
    return state, out.get("data") if "data" in args else None, out["meta"]


def restore_params(directory: str | Path, abstract_params: Any, *, step: int | None = None,
                   key: str = "params") -> tuple[Any, int]:
    """Only the parameters (the state's `key` entry) of the latest (or given) checkpoint, onto
    abstract_params' shapes/shardings."""
    mgr = ocp.CheckpointManager(Path(directory).absolute())
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}; train the run first")
    item = {key: abstract_params}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or default, dtype=x.dtype), item)
    try:
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory}/{step} does not match the model config: "
                              f"{str(e).splitlines()[0][:300]}") from None
    finally:
        mgr.close()
    params = out["state"][key]
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):  # partial restore found no such entry
        raise CheckpointError(f"checkpoint {directory}/{step} has no '{key}' entry (or not all of it)")
    problem = _shape_mismatch(abstract_params, params)
    if problem:
        raise CheckpointError(f"checkpoint {directory}/{step} does not match the model config ({problem})")
    return params, step
