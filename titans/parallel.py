"""Data parallelism over every device and host: start-up, the mesh, and global batches.

One mesh axis, `data`. Batches are sharded along it, parameters and optimizer state are replicated,
and `jax.jit` inserts the gradient all-reduce. The same code runs on one CPU, 8 simulated CPU
devices, a GPU machine, and a multi-host TPU pod slice (each host feeding its own rows).
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
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
            raise ValueError(
                f"Multi-process run at {addr} needs the process count and this process's id "
                f"(got num_processes={n}, process_id={pid})."
            )
        logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", addr, n, pid)
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in tpu_hosts.split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


class ProcessMismatchError(RuntimeError):
    """The processes of one multi-process run were started with different configs or code."""


def code_fingerprint() -> str:
    """A hash of the titans package's source files: equal on every host that runs the same code."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def check_processes_agree(**fingerprints: str) -> None:
    """Raises ProcessMismatchError, on every process, when any fingerprint differs between processes.

    One small all-gather at start-up: without it, processes started with different configs or code
    would compile different programs and hang in their first collective instead of failing.
    """
    if jax.process_count() == 1:
        return
    names = sorted(fingerprints)
    mine = np.array([int(hashlib.sha256(str(fingerprints[k]).encode()).hexdigest()[:7], 16) for k in names], np.int32)
    everyone = np.asarray(process_allgather(mine))  # (processes, len(names))
    bad = [k for j, k in enumerate(names) if len(set(everyone[:, j].tolist())) > 1]
    if bad:
        groups = {
            k: {
                int(v): [p for p in range(everyone.shape[0]) if everyone[p, j] == v]
                for v in set(everyone[:, j].tolist())
            }
            for j, k in enumerate(names)
            if k in bad
        }
        detail = "; ".join(f"{k}: processes {sorted(g.values())} disagree" for k, g in groups.items())
        raise ProcessMismatchError(
            f"The {jax.process_count()} processes of this run differ in {', '.join(bad)} ({detail}). Start every "
            "process with the same config file, overrides and code (this is process "
            f"{jax.process_index()}: {', '.join(f'{k}={fingerprints[k]}' for k in bad)})."
        )


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
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {n_dev} devices "
            f"of the mesh; pick a multiple of {n_dev}."
        )
    return global_batch_size // n_proc


def to_global(local_batch, mesh: Mesh):
    """Turns this process's rows of a batch into global arrays sharded along `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree, mesh: Mesh):
    """Places a pytree fully replicated on the mesh (the same value on every process).

    With several processes each one builds its local shards from its own host copy (no cross-host
    transfer, which CPU and some GPU backends do not support); every process must hold the same value.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            raise ValueError(f"cannot re-replicate a global array with sharding {x.sharding}")
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(
                jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx]), impl=impl
            )
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def process_allgather(x):
    """Every process's `x`, stacked along a new leading axis (a collective: all processes call it)."""
    return multihost_utils.process_allgather(x)
