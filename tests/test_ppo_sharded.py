"""ppo_update on a simulated 8-device mesh (data 4 x fsdp 2; params sharded by the rules table, rollout by
batch) gives the single-device result. Runs in a subprocess: XLA_FLAGS must be set before jax starts.
tensor stays 1: the tiny model's single KV head cannot be split."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jaxllm import models
    from jaxllm.models import heads
    from jaxllm.parallel import rules
    sys.path.insert(0, "tests")
    import test_ppo_update as t

    cfg = t.UPDATE_CFG
    rollout, _, state, update = t.rollout_and_state(cfg)
    key = jax.random.PRNGKey(0)
    want, want_m = update(state, rollout, key)

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    axes = models.logical_axes(t.CFG)
    def place(tree, axes_tree):
        return jax.tree.map(lambda x, a: jax.device_put(x, NamedSharding(mesh, rules.spec(a))), tree, axes_tree,
                            is_leaf=lambda a: isinstance(a, tuple))
    with jax.set_mesh(mesh):
        sharded_state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))  # replicated
        sharded_state = sharded_state.replace(
            policy_params=place(state.policy_params, axes),
            value_params=place(state.value_params, heads.logical_axes(t.CFG)))
        batch_sharding = NamedSharding(mesh, rules.spec(("batch", None)))
        sharded_rollout = {k: jax.device_put(v, batch_sharding) for k, v in rollout.items()}
        got, got_m = update(sharded_state, sharded_rollout, key)
    assert len(got.policy_params["embed"].sharding.device_set) == 8
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
    for k in want_m:
        np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-4, atol=2e-5, err_msg=k)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_ppo_update_sharded_matches_single_device():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
