"""One device mesh, data parallel: the batch is sharded on 'data', the state is replicated.

This is what `pmap` became: plain `jax.jit` over arrays with `NamedSharding`s. Multi-host
(TPU pods, multi-node GPU): call `initialize_distributed()` first, then run the same program
on every host; `shard_host_batch` assembles a global batch from each host's slice.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize_distributed(num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when this looks like a multi-process launch.

    Detected from the usual launchers' environment (JAX_COORDINATOR_ADDRESS, TPU pod workers,
    SLURM, Open MPI) or forced with FTSAM_JAX_DISTRIBUTED=1. TPU pods, SLURM and Open MPI
    tell JAX the process count and id themselves; a hand-made launch (any machines, e.g.
    multi-node GPU) sets JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every process (or passes `num_processes` / `process_id`, which win).
    Returns whether it initialised; ValueError for an incomplete or inconsistent launch.
    """
    env = os.environ
    auto = ("OMPI_COMM_WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) > 1
            or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    multi = auto or env.get("FTSAM_JAX_DISTRIBUTED") == "1" or address is not None
    if not multi:
        return False
    if not auto and (num_processes is None or process_id is None):
        raise ValueError(
            "a multi-process launch without a cluster manager needs JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID (beside JAX_COORDINATOR_ADDRESS) on every process")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"JAX_NUM_PROCESSES must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"JAX_PROCESS_ID must be in [0, {num_processes}), got {process_id}")
    kwargs: dict[str, Any] = {}
    if address is not None:
        kwargs["coordinator_address"] = address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all hosts).

    Built with Auto axis types: an Explicit mesh breaks the gradient of optax's
    integer-label cross-entropy.
    """
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises ValueError unless `batch_size` splits evenly over the mesh."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"{what} {batch_size} is not divisible by the number of devices ({n}); "
            f"use a multiple of {n}"
        )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree onto every device of the mesh (a fresh buffer, safe to donate)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree)


def shard_host_batch(batch: Any, mesh: Mesh) -> Any:
    """Puts this host's slice of a batch on its devices, returning the global sharded batch."""
    sharding = data_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )
