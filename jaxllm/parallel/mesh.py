"""The device mesh from config (axes data, fsdp, tensor) and multi-host start-up through jax.distributed.

The same config runs on one CPU, simulated CPU devices, one or several GPUs, or several hosts: the mesh
shape is resolved against the devices JAX sees (`-1` fills the rest) and every size is checked.
"""

from __future__ import annotations

import logging
import math

import jax
from jax.sharding import AxisType, Mesh

from jaxllm.config import ClusterConfig, ConfigError, MeshConfig

log = logging.getLogger(__name__)
AXES = ("data", "fsdp", "tensor")


def resolve_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the -1 axis filled so that the product is n_devices."""
    sizes = {name: getattr(cfg, name) for name in AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [name for name, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1 (got {', '.join('mesh.' + n for n in free)})")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive or -1; got {sizes}")
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh {_text(sizes)} cannot fill {n_devices} devices: {n_devices} is not divisible by "
                              f"{known}; choose sizes whose product divides the device count")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"mesh {_text(sizes)} needs {math.prod(sizes.values())} devices but {n_devices} are "
                          f"available; make mesh.data*mesh.fsdp*mesh.tensor = {n_devices} or set one axis to -1")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _text(sizes: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")"


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes (data, fsdp, tensor).

    Axes are Auto-typed: shardings come from the rules table and the compiler propagates the rest.
    With several processes, the batch axes (data x fsdp) must split evenly over hosts, since each host
    feeds only its own slice of the batch.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_shape(cfg, len(devices))
    n_proc = len({d.process_index for d in devices})
    if n_proc > 1 and (shape[0] * shape[1]) % n_proc:
        raise ConfigError(f"mesh.data*mesh.fsdp={shape[0] * shape[1]} must be a multiple of the {n_proc} "
                          "processes (each host reads its own slice of the batch); lower mesh.tensor")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(mesh: Mesh, batch_size: int, accum_steps: int = 1) -> None:
    """Each (micro)batch must split evenly over data x fsdp."""
    div = batch_divisor(mesh)
    micro = batch_size // accum_steps
    if micro % div:
        raise ConfigError(f"train.batch_size={batch_size} (microbatch {micro} with optim.accum_steps={accum_steps}) "
                          f"is not divisible by mesh.data*mesh.fsdp={div}; choose a batch that is")


def initialize_distributed(cfg: ClusterConfig) -> None:
    """Start jax.distributed before any JAX computation: explicit arguments or the auto-detected cluster.

    Call once per process, first thing. On CPU, cross-process collectives use `cfg.cpu_collectives`.
    """
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                          f"failed: {first}; outside a TPU pod / SLURM / Open MPI job pass "
                          "cluster.coordinator_address, cluster.num_processes and cluster.process_id") from None
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def describe(mesh: Mesh) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"mesh ({shape}) over {mesh.devices.size} {mesh.devices.flat[0].platform} devices, " \
           f"{jax.process_count()} process(es)"
