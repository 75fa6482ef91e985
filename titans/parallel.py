"""Data parallelism over every device and host: start-up, the mesh, and global batches.

One mesh axis, `data`. Batches are sharded along it, parameters and optimizer state are replicated,
and `jax.jit` inserts the gradient all-reduce. The same code runs on one CPU, 8 simulated CPU
devices, a GPU machine, and a multi-host TPU pod slice (each host feeding its own rows).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
    """Calls `jax.distributed.initialize` when this run is one of several processes.

    Sources, in order: explicit arguments (from the config), the environment
    (TITANS_COORDINATOR_ADDRESS, TITANS_NUM_PROCESSES, TITANS_PROCESS_ID), and Cloud TPU pod slices
    (several TPU worker hostnames), where JAX discovers everything itself. Returns whether it ran.
    """
    if jax.distributed.is_initialized():
        return True
    addr = coordinator_address or os.environ.get("TITANS_COORDINATOR_ADDRESS", "")
    n = num_processes or int(os.environ.get("TITANS_NUM_PROCESSES", "0"))
    pid = process_id if process_id >= 0 else int(os.environ.get("TITANS_PROCESS_ID", "-1"))
    if addr:
        if n <= 0 or pid < 0:
            raise ValueError(f"Multi-process run at {addr} needs the process count and this process's id "
                             f"(got num_processes={n}, process_id={pid}).")
        logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", addr, n, pid)
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in tpu_hosts.split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of all processes), axis `data`."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Returns the per-process batch size, or raises if the global batch does not split evenly."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(f"Global batch size {global_batch_size} is not divisible by the {n_dev} devices "
                         f"of the mesh; pick a multiple of {n_dev}.")
    return global_batch_size // n_proc


def to_global(local_batch, mesh: Mesh):
    """Turns this process's rows of a batch into global arrays sharded along `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree, mesh: Mesh):
    """Places a pytree fully replicated on the mesh (the same value on every process)."""
    return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
    return jax.process_index() == 0
