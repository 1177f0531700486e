"""Sharding over a device mesh (parallel/mesh.py, parallel/rules.py, parallel/memory.py).

Multi-device checks run tests/parallel_worker.py in subprocesses, because the simulated CPU device count
(XLA_FLAGS=--xla_force_host_platform_device_count=N) must be set before jax starts. The oracle is the same
model trained on one device without any mesh. Tolerances (fixed in advance): the initial parameters agree to
1e-7 (same threefry bits; only fusion differs), the loss to a relative 1e-5 (float32 sums in another order),
parameters after one AdamW step (lr 1e-3) to 1e-5: a dropped or doubled gradient contribution, or a flipped
first-step sign, moves an element by ~1e-3. Checkpoint round trips must be exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm.config import ConfigError, MeshConfig
from jaxllm.parallel import memory, mesh as mesh_lib, rules

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8), (1, 8, 1)]
# Unoptimised XLA CPU code compiles several times faster; the comparisons are within one process.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker(devices: int, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=_env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: int = 600) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Runs every worker once: 8 devices, then two processes of 2 devices, then one process of 4."""
    out = tmp_path_factory.mktemp("parallel")
    _wait(_worker(8, "meshes", out))
    import portpicker

    port = portpicker.pick_unused_port()
    procs = [_worker(2, "multiproc", out, i, port) for i in range(2)]
    for p in procs:
        _wait(p, timeout=300)
    _wait(_worker(4, "restore", out))
    return out


@pytest.fixture(scope="module")
def meshes(workdir):
    return json.loads((workdir / "meshes.json").read_text())


@pytest.fixture(scope="module")
def restored(workdir):
    return json.loads((workdir / "restore.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Eight simulated devices: every mesh trains like one device.


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_one_step_on_mesh_matches_one_device(meshes, shape):
    got = meshes["meshes"][str(shape)]
    assert got["init_diff"] <= 1e-7, "sharded init differs from the one-device init"
    np.testing.assert_allclose(got["losses"], meshes["losses_one"], rtol=1e-5)
    assert got["param_diff"] <= 1e-5, f"updated params differ by {got['param_diff']}"


def test_fsdp8_each_device_holds_an_eighth(meshes):
    for tree in ("fsdp8", "fsdp8_mu"):  # parameters, and Adam's first moment following them
        for name, info in meshes[tree].items():
            assert info["devices"] == 8 and info["distinct"] == 8, (tree, name, info)
            assert info["sizes"] == [info["full"] // 8], (tree, name, info)


def test_kv_heads_fewer_than_tensor_are_replicated(meshes):
    # 2 kv heads on tensor=8: replicated over tensor, still split over embed by fsdp (size 1 here).
    assert meshes["kv_heads_spec"] == "P(None, 'fsdp', None, None)"


def test_checkpoint_from_fsdp8_restores_on_2x2x2(meshes):
    assert meshes["restore_222"] == {"diff": 0.0, "applied": True}


def test_checkpoint_from_fsdp8_restores_on_4_devices(restored):
    assert restored["devices"] == 4
    assert restored["restore_4dev"] == {"diff": 0.0, "applied": True}


# ---------------------------------------------------------------------------------------------------------
# Two processes on 127.0.0.1 (jax.distributed, gloo).


def test_two_processes_match_one(workdir, restored):
    two = json.loads((workdir / "two_proc.json").read_text())
    assert two["devices"] == 4
    np.testing.assert_allclose(two["losses"], restored["losses_one"], rtol=1e-5)
    assert restored["one_vs_two_proc"] <= 1e-5


def test_checkpoint_by_two_processes_restores_in_one(restored):
    assert restored["restore_2proc"] == {"diff": 0.0, "applied": True}


# ---------------------------------------------------------------------------------------------------------
# In-process unit tests (one CPU device).


@pytest.mark.parametrize("sizes,n,want", [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)),
                                          ((1, 1, -1), 4, (1, 1, 4)), ((2, 4, 1), 8, (2, 4, 1))])
def test_resolve_shape(sizes, n, want):
    assert mesh_lib.resolve_shape(MeshConfig(*sizes), n) == want


@pytest.mark.parametrize("sizes,n,match", [((3, -1, 1), 8, "not divisible"), ((2, 2, 1), 8, "needs 4 devices"),
                                           ((-1, -1, 1), 8, "only one mesh axis")])
def test_resolve_shape_errors(sizes, n, match):
    with pytest.raises(ConfigError, match=match):
        mesh_lib.resolve_shape(MeshConfig(*sizes), n)


def test_make_mesh_checks_device_count():
    with pytest.raises(ConfigError, match="mesh.data\\*mesh.fsdp\\*mesh.tensor"):
        mesh_lib.make_mesh(MeshConfig(2, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("override,match", [
    ("mesh.fsdp=0", "mesh.fsdp=0 must be a positive size"),
    ("mesh.tensor=-1", "only one mesh axis may be -1"),
    ("cluster.num_processes=2", "distributed=true"),
    ("cluster.cpu_collectives=nccl", "cluster.cpu_collectives"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.load(None, [override])


def test_config_distributed_fields():
    cfg = config_lib.load(None, ["distributed=true", "cluster.coordinator_address=10.0.0.1:1234",
                                 "cluster.num_processes=4", "cluster.process_id=3", "mesh.fsdp=4"])
    assert cfg.distributed and cfg.cluster.process_id == 3 and cfg.mesh.fsdp == 4
    with pytest.raises(ConfigError, match="process_id=4 must be in"):
        config_lib.load(None, ["distributed=true", "cluster.num_processes=4", "cluster.process_id=4"])


def test_fit_drops_axes_that_do_not_divide():
    sizes = {"data": 2, "fsdp": 4, "tensor": 4}
    assert rules.fit(P(None, "fsdp", "tensor", None), (2, 32, 2, 8), sizes) == P(None, "fsdp", None, None)
    assert rules.fit(P(("data", "fsdp"), None), (4, 16), sizes) == P("data", None)
    assert rules.fit(P(("data", "fsdp"), None), (8, 16), sizes) == P(("data", "fsdp"), None)
    assert rules.fit(P(("data", "fsdp")), (1,), sizes) == P(None)


def test_check_batch():
    mesh = mesh_lib.make_mesh(MeshConfig(1, 1, 1))
    mesh_lib.check_batch(mesh, 4, 2)
    fake = type("M", (), {"shape": {"data": 2, "fsdp": 2, "tensor": 1}})()
    with pytest.raises(ConfigError, match="not divisible by mesh.data\\*mesh.fsdp=4"):
        mesh_lib.check_batch(fake, 8, 4)


def _tiny_cfg():
    return config_lib.replace(config_lib.Config(), **{
        "model.vocab_size": 256, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_seq_len": 32, "model.dtype": "float32"})


def test_state_shardings_follow_params_and_memory_report():
    from jaxllm import models, optim
    from jaxllm.stages import pretrain

    cfg = _tiny_cfg()
    mesh = mesh_lib.make_mesh(MeshConfig())
    _, abstract, shardings = pretrain.plan_state(cfg, optim.adamw(cfg.optim, 10), mesh)
    adam = shardings.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(abstract.params)
    assert adam.mu["layers"]["wq"].spec == shardings.params["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert adam.count.spec == P() and shardings.step.spec == P()
    rep = memory.report(abstract, shardings, mesh, cfg.model, batch_size=4, seq_len=16)
    n = models.count_params(abstract.params)
    assert rep["params"] == 4 * n  # float32, one device holds all
    assert rep["opt_state"] == 2 * 4 * n + 2 * 4  # mu, nu, and the int32 counts of Adam and the schedule
    assert "memory per device: params" in memory.format_report(rep)


def test_activation_estimate_scales():
    cfg = config_lib.replace(_tiny_cfg().model, n_layers=16)  # remat pays off only past a few layers
    none = memory.activation_bytes(cfg, 4, 16)
    assert memory.activation_bytes(cfg, 2, 16) * 2 == pytest.approx(none, rel=1e-6)
    full = memory.activation_bytes(config_lib.replace(cfg, remat="full"), 4, 16)
    saved = memory.activation_bytes(config_lib.replace(cfg, remat="save_matmuls"), 4, 16)
    assert full < saved < none


def test_host_batch_to_global_one_process():
    mesh = mesh_lib.make_mesh(MeshConfig())
    batch = {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4)}
    out = rules.host_batch_to_global(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
    assert out["tokens"].sharding.spec == P(("data", "fsdp"), None)
    full = rules.full_batch_to_global(batch, mesh)
    np.testing.assert_array_equal(np.asarray(full["tokens"]), batch["tokens"])


@pytest.mark.slow
def test_cli_pretrain_on_8_devices_then_resume_on_another_mesh(tmp_path):
    """`jaxllm pretrain mesh.*=...` end to end, then the same run resumed on a different mesh."""
    common = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
              "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32",
              "data.max_documents=60", "data.heldout_fraction=0.1", "train.batch_size=8", "train.log_every=2",
              "train.eval_every=3", "train.eval_batches=2", "train.progress=false", "train.num_samples=1",
              "train.sample_tokens=4", "checkpoint.every=3", f"train.runs_dir={tmp_path}", "train.name=m"]
    env = _env(8)
    env.setdefault("JAXLLM_CACHE", str(tmp_path / "cache"))
    for steps, mesh in ((3, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), (6, ["mesh.data=1", "mesh.fsdp=8"])):
        res = subprocess.run([sys.executable, "-m", "jaxllm.cli", "pretrain", *common, f"train.steps={steps}", *mesh],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == [2, 3, 4, 6]
    assert "resuming from step 3" in res.stdout + res.stderr


def test_distributed_without_cluster_is_a_one_line_error():
    code = ("from jaxllm.config import ClusterConfig, ConfigError\nfrom jaxllm.parallel import mesh\n"
            "try:\n    mesh.initialize_distributed(ClusterConfig())\nexcept ConfigError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in _env(1).items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "ERR jax.distributed.initialize() failed" in res.stdout and "cluster.coordinator_address" in res.stdout, \
        res.stdout + res.stderr[-2000:]
