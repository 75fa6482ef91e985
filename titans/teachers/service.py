"""Teacher inference as an elastic, fault-tolerant service on Ray: `TeacherPool`.

The student trainer streams its batches (uint8 images) through a pool of Ray actors, each holding
the frozen teacher jitted on its own device (CPU here; a GPU, or a mix of kinds, on a cluster).
Ray is the engine (actors, placement, the object store, death notices); the pool only decides who
gets which batch:

* **bounded, in order**: the trainer's `SoftLabelLoader` keeps at most `max_in_flight` batches
  submitted and takes their results in submission order, whatever order the workers finish in;
* **elastic**: the pool keeps between `min_workers` and `max_workers` actors. Every
  `scale_interval_s` it starts another worker (of the first kind in `kinds` that fits) while the
  cluster has free resources for one and the pool is below its target, so workers on nodes that
  join the cluster (started by hand with `ray start --address=...`, or by Ray's autoscaler) are
  used as they appear. `resize(n)` moves the target by hand; a smaller target retires workers,
  whose batches go back to the queue;
* **fault tolerant**: a call that fails because its worker died (process killed, node lost) or
  timed out puts the batch back at the front of the queue for another worker, and the pool starts a
  replacement. Each batch (sequence number) is accepted exactly once: results of a superseded
  attempt are dropped, so every example gets one soft label, none lost or repeated. An error raised
  by the teacher code itself is retried up to `max_attempts` times, then reported to the trainer.

The teacher's variables are loaded once by the driver and shared through Ray's object store, so
workers on other machines need the code (the `titans` package) but not the teacher's files.

    pool = TeacherPool(model_config=..., dataset="fashion_mnist", variables=..., batch_shape=(128, 28, 28, 1))
    seq = pool.submit(images); logits = pool.result(seq)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import psutil
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import data as data_lib
from titans import runs
from titans.teachers import cache as cache_lib

KINDS = ("cpu", "gpu")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServiceError(RuntimeError):
    """The teacher service could not label a batch (no workers could start, or the teacher failed)."""


class TeacherWorker:
    """One teacher replica: rebuilds the model from its config, loads the shared variables, jits."""

    def __init__(
        self,
        model_config_json: str,
        dataset: str,
        variables: dict,
        batch_shape,
        dtype: str = "auto",
        delay_s: float = 0.0,
    ):
        cfg = ml_collections.ConfigDict(json.loads(model_config_json))
        info = data_lib.dataset_info(dataset)
        compute = runs.compute_dtype(dtype)
        model = runs.build_run_model(cfg, info, seed=0, dtype=compute)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(params, variables["params"])
        rest_like = nnx.to_pure_dict(rest)
        nnx.replace_by_pure_dict(rest, ckpt_lib.from_savable(variables["rest"], rest_like))
        self._teacher = runs.FrozenModel(graphdef, params, rest)
        self._apply = jax.jit(lambda t, x: t.apply(data_lib.normalize(x, info, compute)).astype(jnp.float32))
        self._delay_s = float(delay_s)
        self._platform = jax.devices()[0].platform
        # Compile now, so that a worker counts as ready only once it can answer at full speed.
        jax.block_until_ready(self._apply(self._teacher, np.zeros(tuple(batch_shape), np.uint8)))

    def ready(self) -> dict:
        import ray  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "platform": self._platform}

    def infer(self, images) -> np.ndarray:
        if self._delay_s:
            time.sleep(self._delay_s)  # tests: a slow teacher, so that a kill lands mid-batch
        return np.asarray(self._apply(self._teacher, np.asarray(images)))


@functools.cache
def _remote_worker_cls():
    import ray  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)

    return ray.remote(max_restarts=0, max_task_retries=0)(TeacherWorker)


def connect(address: str = "", *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connects this process to Ray; True if it started (and so owns) a local cluster.

    Already connected: nothing. `address` (e.g. "10.0.0.5:6379", "auto", "ray://head:10001"): join
    that cluster. Empty: start a local one on this machine, bound to 127.0.0.1.
    """
    import ray  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)
    from ray._private import ray_constants  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH", "")]))}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return False
    # A local cluster is reachable from this machine only: with this switch Ray takes the loopback
    # address as its node address (as it does on macOS and Windows), so the GCS, the raylet, the
    # runtime-env agent and the workers all bind 127.0.0.1 (tests/test_teachers.py checks every
    # listening socket). Remote workers need `distill.service.address`, a cluster the user started.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import in this process, which may have imported Ray
    # Ray makes its own temporary directory world-writable; it lives inside an owner-only one.
    temp_dir = tempfile.mkdtemp(prefix="titans-ray-", dir="/tmp")
    _LOCAL["temp_dir"] = temp_dir  # before ray.init: a start that fails or is interrupted is cleaned up too
    # address="local": always a new cluster. Without it, ray.init() joins any Ray already running on the
    # machine (it looks for a GCS process), and dies with it when that cluster's owner exits.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=os.path.join(temp_dir, "r"),
    )
    _restrict(temp_dir)
    return True


_LOCAL: dict = {"temp_dir": None}
_TOKEN = os.path.expanduser("~/.ray/auth_token")


def _restrict(temp_dir: str) -> None:
    """Owner-only permissions on what a local cluster wrote: its directory and the token."""
    os.chmod(temp_dir, 0o700)
    if os.path.exists(_TOKEN):
        os.chmod(_TOKEN, 0o600)


def _session_processes(temp_dir: str) -> list:
    """The processes of the local cluster in `temp_dir`: those whose command line names it, and theirs."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
    found.pop(os.getpid(), None)
    return list(found.values())


def shutdown_local(timeout_s: float = 10.0) -> None:
    """Shuts down the local cluster this process started: Ray first, then any of its processes still
    alive (agents outlive the driver otherwise), then its temporary directory."""
    import ray  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)

    temp_dir = _LOCAL["temp_dir"]
    # Found before Ray shuts down: its workers (ray::...) name the temp dir nowhere in their command
    # line; while the raylet lives they are its children, afterwards nobody's.
    left = _session_processes(temp_dir) if temp_dir else []
    ray.shutdown()
    _LOCAL["temp_dir"] = None
    if not temp_dir:
        return
    left = list({p.pid: p for p in left + _session_processes(temp_dir)}.values())
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


class _Worker:
    def __init__(self, name: str, kind: str, handle, demand: dict):
        self.name, self.kind, self.handle, self.demand = name, kind, handle, demand
        self.state = "starting"
        self.info: dict = {}
        self.busy: set[int] = set()
        self.served = 0
        self.started_at = time.monotonic()


class TeacherPool:
    """A pool of `TeacherWorker` actors; see the module docstring. Thread-safe."""

    def __init__(
        self,
        *,
        model_config: dict,
        dataset: str,
        variables: dict,
        batch_shape,
        dtype: str = "auto",
        min_workers: int = 1,
        max_workers: int = 2,
        target: int | None = None,
        kinds=("cpu",),
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 1.0,
        per_worker: int = 2,
        batch_timeout_s: float = 120.0,
        start_timeout_s: float = 300.0,
        scale_interval_s: float = 2.0,
        max_attempts: int = 3,
        delay_s: float = 0.0,
        owns_ray: bool = False,
        wait: bool = True,
    ):
        import ray  # noqa: PLC0415  (deferred: ray is the optional `ray` extra)

        if not ray.is_initialized():
            raise ServiceError("Ray is not initialised: call titans.teachers.service.connect() first.")
        if not 0 <= min_workers <= max_workers or max_workers < 1:
            raise ValueError(f"need 0 <= min_workers ({min_workers}) <= max_workers ({max_workers}), max >= 1")
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"worker kinds {list(kinds)}: each must be one of {list(KINDS)}")
        self._ray = ray
        self.min_workers, self.max_workers = int(min_workers), int(max_workers)
        self._target = self._clamp(max_workers if target is None else target)
        self.kinds = tuple(kinds)
        self.cpus_per_worker, self.gpus_per_worker = float(cpus_per_worker), float(gpus_per_worker)
        self.per_worker = max(1, int(per_worker))
        self.batch_timeout_s, self.start_timeout_s = float(batch_timeout_s), float(start_timeout_s)
        self.scale_interval_s, self.max_attempts = float(scale_interval_s), int(max_attempts)
        self._owns_ray = owns_ray
        self._ctor = (json.dumps(model_config), dataset, ray.put(variables), tuple(batch_shape), dtype, delay_s)
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._workers: dict[str, _Worker] = {}
        self._pending: collections.deque[int] = collections.deque()
        self._images: dict[int, Any] = {}  # open batches: seq -> ObjectRef of the images
        self._tasks: dict[Any, tuple[int, str, float]] = {}  # live attempts: ObjectRef -> (seq, worker, start)
        self._results: dict[int, np.ndarray] = {}
        self._errors: dict[int, BaseException] = {}
        self._attempts: collections.Counter = collections.Counter()
        self._next_seq = 0
        self._count = 0
        self._closed = False
        self._last_alive = time.monotonic()
        self.stats = collections.Counter()
        self.delivered_by: collections.Counter = collections.Counter()  # worker name -> batches accepted
        self.events: list[str] = []
        self._stop = threading.Event()
        # Ray's completion callbacks only post here; the pool's own thread does the work (calling Ray
        # from inside a callback, on Ray's I/O thread, can deadlock).
        self._inbox: queue.Queue = queue.Queue()
        self._pending_lock = threading.Condition()
        self._callbacks_pending = 0
        with self._lock:
            self._scale()
        self._monitor = threading.Thread(target=self._watch, name="titans-teacher-pool", daemon=True)
        self._monitor.start()
        if wait:
            self.wait_for_workers(max(1, self.min_workers), timeout=self.start_timeout_s)

    # ------------------------------------------------------------------------------ public

    def submit(self, images) -> int:
        """Queues one batch of uint8 images; returns its sequence number."""
        ref = self._ray.put(np.asarray(images))
        with self._lock:
            if self._closed:
                raise ServiceError("the teacher pool is closed")
            seq = self._next_seq
            self._next_seq += 1
            self._images[seq] = ref
            self._pending.append(seq)
            self.stats["submitted"] += 1
            self._dispatch()
            return seq

    def result(self, seq: int, timeout: float | None = None) -> np.ndarray:
        """Blocks until batch `seq` is labelled; float32 logits (batch, classes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while seq not in self._results and seq not in self._errors:
                if seq not in self._images:
                    raise KeyError(f"batch {seq} was never submitted, or was cancelled or already taken")
                if not self._workers and time.monotonic() - self._last_alive > self.start_timeout_s:
                    raise ServiceError(
                        f"no teacher worker alive or starting for {self.start_timeout_s:.0f} s; the cluster has "
                        f"{self._ray.available_resources()} free. Add nodes, or lower "
                        f"distill.service.cpus_per_worker / gpus_per_worker."
                    )
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {seq} not labelled within {timeout} s")
                self._cv.wait(0.5)
            if seq in self._errors:
                self._images.pop(seq, None)
                raise ServiceError(
                    f"batch {seq} failed {self._attempts[seq]} times in the teacher: {self._errors.pop(seq)!r}"
                )
            self._images.pop(seq, None)
            return self._results.pop(seq)

    def cancel(self, seq: int) -> None:
        with self._lock:
            self._images.pop(seq, None)
            self._results.pop(seq, None)
            self._errors.pop(seq, None)

    def resize(self, n: int) -> int:
        """Sets the number of workers wanted (clamped to [min_workers, max_workers]); returns it."""
        with self._lock:
            self._target = self._clamp(n)
            self._scale()
            return self._target

    def wait_for_workers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.num_alive() < n:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"only {self.num_alive()} of {n} teacher workers became ready within {timeout:.0f} s "
                        f"(kinds {list(self.kinds)}, {self.cpus_per_worker} CPU / {self.gpus_per_worker} GPU each; "
                        f"free in the cluster: {self._ray.available_resources()}; events: {self.events[-3:]})."
                    )
                self._cv.wait(0.2)

    def num_alive(self) -> int:
        with self._lock:
            return sum(w.state == "alive" for w in self._workers.values())

    def workers(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "name": w.name,
                    "kind": w.kind,
                    "state": w.state,
                    "pid": w.info.get("pid"),
                    "node": w.info.get("node"),
                    "busy": sorted(w.busy),
                    "served": w.served,
                }
                for w in self._workers.values()
            ]

    def describe(self) -> str:
        return (
            f"{self.num_alive()} worker(s) alive of {self.min_workers}-{self.max_workers}, kinds {'/'.join(self.kinds)}"
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
            self._cv.notify_all()
        self._stop.set()
        for w in workers:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(w.handle)
        self._monitor.join(timeout=10)
        # Let every answer still on its way arrive (killed workers answer at once, with an error), then
        # drop every Ray reference we hold: a reference released after ray.shutdown() makes Ray end the
        # whole process.
        with self._pending_lock:
            self._pending_lock.wait_for(lambda: self._callbacks_pending == 0, timeout=30)
        with self._lock:
            self._tasks.clear()
            self._images.clear()
            self._results.clear()
            self._errors.clear()
            self._ctor = None
        while not self._inbox.empty():
            self._inbox.get_nowait()
        workers = w = None
        gc.collect()
        if self._owns_ray:
            shutdown_local()

    # --------------------------------------------------------------------------- internals

    def _clamp(self, n: int) -> int:
        return max(self.min_workers, min(self.max_workers, int(n)))

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        logging.info("teacher pool: %s", text)

    def _demand(self, kind: str) -> dict:
        d = {"CPU": self.cpus_per_worker}
        if kind == "gpu":
            d["GPU"] = self.gpus_per_worker
        return {k: v for k, v in d.items() if v > 0}

    def _fitting_kind(self) -> str | None:
        """The first kind whose demand fits in the resources not yet claimed (starting workers counted)."""
        free = dict(self._ray.available_resources())
        for w in self._workers.values():
            if w.state == "starting":
                for k, v in w.demand.items():
                    free[k] = free.get(k, 0.0) - v
        for kind in self.kinds:
            if all(free.get(k, 0.0) >= v - 1e-9 for k, v in self._demand(kind).items()):
                return kind
        return None

    def _start_worker(self, kind: str) -> None:
        self._count += 1
        name = f"{kind}-{self._count}"
        model_cfg, dataset, variables, batch_shape, dtype, delay_s = self._ctor
        demand = self._demand(kind)
        env = {"JAX_PLATFORMS": "cpu"} if kind == "cpu" else {}
        opts = dict(
            num_cpus=demand.get("CPU", 0),
            num_gpus=demand.get("GPU", 0),
            name=None,
            runtime_env={"env_vars": env} if env else None,
        )
        handle = (
            _remote_worker_cls()
            .options(**{k: v for k, v in opts.items() if v is not None})
            .remote(model_cfg, dataset, variables, batch_shape, dtype, delay_s)
        )
        w = _Worker(name, kind, handle, demand)
        self._workers[name] = w
        self.stats["workers_started"] += 1
        self._event(f"starting {name}")
        self._when_done(handle.ready.remote(), self._on_ready, name)

    def _when_done(self, ref, handler, key) -> None:
        """Posts (handler, key, future) to the pool's thread when `ref` resolves; counts what is pending."""
        with self._pending_lock:
            self._callbacks_pending += 1

        def posted(fut):
            self._inbox.put((handler, key, fut))
            with self._pending_lock:
                self._callbacks_pending -= 1
                self._pending_lock.notify_all()

        ref.future().add_done_callback(posted)

    def _on_ready(self, name: str, fut) -> None:
        with self._cv:
            w = self._workers.get(name)
            if w is None:
                return
            exc = fut.exception()
            if exc is not None:
                self._lose(name, f"failed to start: {exc!r}")
                return
            w.state, w.info = "alive", fut.result()
            self._last_alive = time.monotonic()
            self._event(f"{name} ready (pid {w.info.get('pid')}, {w.info.get('platform')})")
            self._cv.notify_all()
            self._dispatch()

    def _scale(self) -> None:
        if self._closed:
            return
        live = len(self._workers)
        while live > self._target:  # retire the least busy, starting ones first
            victim = min(self._workers.values(), key=lambda w: (w.state == "alive", len(w.busy)))
            self._lose(victim.name, "retired (pool shrunk)", count_lost=False)
            live -= 1
        while live < self._target:
            kind = self._fitting_kind()
            if kind is None:
                if live >= self.min_workers:
                    break
                kind = self.kinds[0]  # below the minimum: ask anyway; Ray places it when a node joins
            self._start_worker(kind)
            live += 1
        if self._workers:
            self._last_alive = max(self._last_alive, min(w.started_at for w in self._workers.values()))

    def _dispatch(self) -> None:
        while self._pending and not self._closed:
            free = [w for w in self._workers.values() if w.state == "alive" and len(w.busy) < self.per_worker]
            if not free:
                return
            seq = self._pending.popleft()
            if seq not in self._images or seq in self._results:
                continue  # cancelled, or already answered
            w = min(free, key=lambda w: len(w.busy))
            ref = w.handle.infer.remote(self._images[seq])
            self._tasks[ref] = (seq, w.name, time.monotonic())
            w.busy.add(seq)
            self._when_done(ref, self._on_done, ref)

    def _on_done(self, ref, fut) -> None:
        with self._cv:
            task = self._tasks.pop(ref, None)
            if task is None:
                return  # an attempt superseded after its worker was given up on
            seq, name, _ = task
            exc = fut.exception()
            if exc is None:
                w = self._workers.get(name)
                if w is not None:
                    w.busy.discard(seq)
                    w.served += 1
                if seq in self._images and seq not in self._results:
                    self._results[seq] = fut.result()
                    self.stats["delivered"] += 1
                    self.delivered_by[name] += 1
                    self._cv.notify_all()
            elif isinstance(exc, self._ray.exceptions.RayTaskError):
                # The teacher code raised: retry elsewhere a few times, then give the error to the trainer.
                w = self._workers.get(name)
                if w is not None:
                    w.busy.discard(seq)
                self._attempts[seq] += 1
                if self._attempts[seq] >= self.max_attempts:
                    self._errors[seq] = exc
                    self._cv.notify_all()
                else:
                    self._pending.appendleft(seq)
                    self.stats["retried"] += 1
            else:  # the worker died or is unreachable (RayActorError, lost object, ...)
                w = self._workers.get(name)
                if w is not None:
                    self._lose(name, f"died: {type(exc).__name__}")
                else:
                    self._requeue([seq])
            self._dispatch()

    def _requeue(self, seqs) -> None:
        seqs = sorted(s for s in seqs if s in self._images and s not in self._results)
        for s in reversed(seqs):
            self._pending.appendleft(s)
        self.stats["redone"] += len(seqs)

    def _lose(self, name: str, why: str, count_lost: bool = True) -> None:
        """Drops a worker: its batches go back to the front of the queue, late answers are ignored."""
        w = self._workers.pop(name, None)
        if w is None:
            return
        for ref in [r for r, (_, n, _) in self._tasks.items() if n == name]:
            del self._tasks[ref]
        self._requeue(w.busy)
        if count_lost:
            self.stats["workers_lost"] += 1
        self._event(f"{name} {why}; {len(w.busy)} batch(es) requeued")
        with contextlib.suppress(Exception):
            self._ray.kill(w.handle)
        self._scale()
        self._dispatch()

    def _watch(self) -> None:
        period = min(self.scale_interval_s, 1.0)
        next_check = time.monotonic() + period
        while not self._stop.is_set():
            try:
                handler, key, fut = self._inbox.get(timeout=max(0.0, next_check - time.monotonic()))
                try:
                    handler(key, fut)
                except Exception:  # keep the pool alive; the batch times out and is redone
                    logging.exception("teacher pool: error handling a completion")
            except queue.Empty:
                pass
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + period
            with self._cv:
                if self._closed:
                    return
                now = time.monotonic()
                for seq, name, t0 in list(self._tasks.values()):
                    if now - t0 > self.batch_timeout_s and name in self._workers:
                        self.stats["timeouts"] += 1
                        self._lose(name, f"timed out on batch {seq} after {self.batch_timeout_s:.0f} s")
                self._scale()
                self._dispatch()
                self._cv.notify_all()


class PoolLabeler:
    """`SoftLabeler` over a `TeacherPool`: ships each batch's images, takes results in order."""

    needs_index = False

    def __init__(self, pool: TeacherPool):
        self.pool = pool

    def submit(self, batch):
        return self.pool.submit(batch["image"])

    def result(self, ticket):
        return self.pool.result(ticket)

    def cancel(self, ticket):
        self.pool.cancel(ticket)


def pool_from_config(config, info, *, delay_s: float = 0.0) -> TeacherPool:
    """Connects to (or starts) Ray and starts the pool `config.distill.service` describes."""
    d, s = config.distill, config.distill.service
    teacher, t_cfg, _ = cache_lib.load_teacher_with_identity(d.teacher_workdir, d.teacher_step, info)
    variables = {
        "params": jax.device_get(nnx.to_pure_dict(teacher.params)),
        "rest": jax.device_get(ckpt_lib.to_savable(nnx.to_pure_dict(teacher.model_state))),
    }
    local_cpus = s.local_cpus or max(1, math.ceil(s.max_workers * s.cpus_per_worker))
    owns = connect(s.address, num_cpus=local_cpus)
    batch_shape = (config.batch_size // jax.process_count(), *info.image_shape)
    return TeacherPool(
        model_config=t_cfg.to_dict(),
        dataset=info.name,
        variables=variables,
        batch_shape=batch_shape,
        dtype=config.dtype,
        min_workers=s.min_workers,
        max_workers=s.max_workers,
        kinds=tuple(s.kinds),
        cpus_per_worker=s.cpus_per_worker,
        gpus_per_worker=s.gpus_per_worker,
        batch_timeout_s=s.batch_timeout_s,
        start_timeout_s=s.start_timeout_s,
        scale_interval_s=s.scale_interval_s,
        delay_s=delay_s,
        owns_ray=owns,
    )
