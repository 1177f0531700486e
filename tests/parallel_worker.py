"""Subprocess worker for tests/test_parallel.py: runs with its own XLA device count (set by the caller
through XLA_FLAGS before jax starts) and writes what it saw as JSON / .npz for the test to compare.

  python tests/parallel_worker.py meshes OUT_DIR          # 8 devices: mesh equivalence, fsdp shards, save
  python tests/parallel_worker.py multiproc OUT_DIR I PORT # process I of 2 (2 devices each) on 127.0.0.1
  python tests/parallel_worker.py restore OUT_DIR          # 4 devices: restore both checkpoints, baseline
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxllm import checkpoint, config as config_lib
from jaxllm.config import Config, MeshConfig
from jaxllm.parallel import mesh as mesh_lib, rules
from jaxllm.stages import pretrain
from jaxllm.train import state as state_lib, step as step_lib

STEPS = 1
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8), (1, 8, 1)]  # the last is kept
TINY = {"model.vocab_size": 256, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 8,
        "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_seq_len": 32, "model.dtype": "float32",
        "data.seq_len": 16, "train.batch_size": 8, "train.steps": 10, "optim.warmup_steps": 0,
        "optim.schedule": "constant", "optim.lr": 1e-3}


def tiny_config() -> Config:
    return config_lib.validate(config_lib.replace(Config(), **TINY))


def batches(cfg: Config, n: int) -> list[dict]:
    """Fixed random batches [B, T] with two packed documents per row."""
    rng = np.random.RandomState(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        cut = rng.randint(2, t - 2)
        seg = np.where(np.arange(t) < cut, 1, 2).astype(np.int32)
        pos = np.where(np.arange(t) < cut, np.arange(t), np.arange(t) - cut).astype(np.int32)
        out.append({"tokens": rng.randint(0, cfg.model.vocab_size, (b, t)).astype(np.int32),
                    "positions": np.broadcast_to(pos, (b, t)).copy(),
                    "segment_ids": np.broadcast_to(seg, (b, t)).copy(),
                    "loss_mask": np.ones((b, t), np.int32)})
    return out


def train(cfg: Config, mesh, steps: int, host_rows: slice | None = None):
    """(initial params, final state, losses) for `steps` steps on `mesh` (None: one device, unsharded)."""
    _, optimizer, state = pretrain.init_state(cfg, cfg.train.steps, mesh)
    init_params = flat(state.params)
    loss = partial(pretrain.loss_fn, cfg=cfg)
    if mesh is None:
        step_fn, put = step_lib.make_train_step(loss, optimizer), jax.device_put
    else:
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = step_lib.make_train_step(loss, optimizer, state_shardings=shardings,
                                           batch_sharding=rules.batch_sharding(mesh))
        put = partial(rules.host_batch_to_global, mesh=mesh)
    losses = []
    with jax.set_mesh(mesh) if mesh is not None else _null():
        for batch in batches(cfg, steps):
            local = {k: v[host_rows] for k, v in batch.items()} if host_rows is not None else batch
            state, metrics = step_fn(state, put(local))
            losses.append(float(metrics["loss"]))
    return init_params, state, losses


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def flat(tree) -> dict[str, np.ndarray]:
    """Path string -> numpy value (gathered across processes when needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def save(state, directory: Path) -> None:
    mgr = checkpoint.manager(directory, keep=1, use_async=False)
    checkpoint.save(mgr, int(state.step), state_lib.as_dict(state), meta={"by": jax.process_count()})
    mgr.wait_until_finished()
    mgr.close()


def restore(directory: Path, cfg: Config, mesh) -> tuple:
    """Restore onto mesh's target shardings; (state, whether every leaf got its target sharding)."""
    optimizer = pretrain.optim.adamw(cfg.optim, cfg.train.steps)
    _, abstract, shardings = pretrain.plan_state(cfg, optimizer, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state_lib.as_dict(abstract), state_lib.as_dict(shardings))
    mgr = checkpoint.manager(directory, keep=1, use_async=False)
    restored, _, _ = checkpoint.restore(mgr, target)
    mgr.close()
    applied = all(x.sharding.is_equivalent_to(t.sharding, x.ndim)
                  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
    return state_lib.from_dict(restored), applied


def fsdp_shards(state) -> dict:
    """For each 2-D+ parameter: does every device hold exactly 1/8 of it, with distinct pieces?"""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if x.ndim < 2:
            continue
        shards = x.addressable_shards
        sizes = {s.data.size for s in shards}
        pieces = {tuple((i.start, i.stop) for i in s.index) for s in shards}
        out[jax.tree_util.keystr(path)] = {"devices": len({s.device for s in shards}), "sizes": sorted(sizes),
                                           "full": x.size, "distinct": len(pieces)}
    return out


def run_meshes(out: Path) -> None:
    cfg = tiny_config()
    init1, state1, losses1 = train(cfg, None, STEPS)
    final1 = flat(state1.params)
    np.savez(out / "one_device.npz", **final1)
    report = {"losses_one": losses1, "meshes": {}}
    for shape in MESHES:
        mesh = mesh_lib.make_mesh(MeshConfig(*shape))
        init, state, losses = train(cfg, mesh, STEPS)
        report["meshes"][str(shape)] = {"losses": losses, "init_diff": max_diff(init, init1),
                                        "param_diff": max_diff(flat(state.params), final1)}
        if shape == (1, 1, 8):
            report["kv_heads_spec"] = str(state.params["layers"]["wk"].sharding.spec)
    report["fsdp8"] = fsdp_shards(state)
    report["fsdp8_mu"] = fsdp_shards(state.replace(params=state.opt_state[1][0].mu))
    saved = flat(state_lib.as_dict(state))
    np.savez(out / "fsdp8_state.npz", **saved)
    save(state, out / "ckpt_fsdp8")
    restored, applied = restore(out / "ckpt_fsdp8", cfg, mesh_lib.make_mesh(MeshConfig(2, 2, 2)))
    report["restore_222"] = {"diff": max_diff(flat(state_lib.as_dict(restored)), saved), "applied": applied}
    (out / "meshes.json").write_text(json.dumps(report))


def run_multiproc(out: Path, index: int, port: int) -> None:
    mesh_lib.initialize_distributed(config_lib.ClusterConfig(coordinator_address=f"127.0.0.1:{port}",
                                                             num_processes=2, process_id=index))
    cfg = tiny_config()
    mesh = mesh_lib.make_mesh(MeshConfig(2, 2, 1))
    rows = cfg.train.batch_size // 2
    _, state, losses = train(cfg, mesh, 3, host_rows=slice(index * rows, (index + 1) * rows))
    save(state, out / "ckpt_2proc")
    final = flat(state_lib.as_dict(state))
    if index == 0:
        np.savez(out / "two_proc_state.npz", **final)
        (out / "two_proc.json").write_text(json.dumps({"losses": losses, "devices": jax.device_count()}))


def run_restore(out: Path) -> None:
    cfg = tiny_config()
    report = {"devices": jax.device_count()}
    saved = dict(np.load(out / "fsdp8_state.npz"))
    restored, applied = restore(out / "ckpt_fsdp8", cfg, mesh_lib.make_mesh(MeshConfig(1, 4, 1)))
    report["restore_4dev"] = {"diff": max_diff(flat(state_lib.as_dict(restored)), saved), "applied": applied}
    _, state1, losses1 = train(cfg, None, 3)
    report["losses_one"] = losses1
    report["one_vs_two_proc"] = max_diff(flat(state_lib.as_dict(state1)), dict(np.load(out / "two_proc_state.npz")))
    restored, applied = restore(out / "ckpt_2proc", cfg, mesh_lib.make_mesh(MeshConfig(1, 4, 1)))
    report["restore_2proc"] = {"diff": max_diff(flat(state_lib.as_dict(restored)),
                                                dict(np.load(out / "two_proc_state.npz"))), "applied": applied}
    (out / "restore.json").write_text(json.dumps(report))


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "meshes":
        run_meshes(out_dir)
    elif mode == "multiproc":
        run_multiproc(out_dir, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "restore":
        run_restore(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
