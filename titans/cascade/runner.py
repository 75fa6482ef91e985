"""The cascade at inference: each later stage runs only on the examples the gates deferred to it.

    runner = CascadeRunner([student_fn, teacher.apply], [get_gate("msp", num_classes=10)], [0.3])
    out = runner(images)      # out.predictions, out.logits, out.answered_by, out.ran, out.padded

Per batch: stage 0 and its gate run on the whole batch in one jitted call, which also compares the
scores with the threshold on the device. The (B,) defer mask is the only thing copied to the host.
The host turns it into the indices of the deferred examples and packs them into fixed-capacity
buffers: the smallest capacity that holds them all (padded with copies of the first deferred
example), or, when more are deferred than the largest capacity holds, several full buffers of the
largest capacity plus one smaller one. No example is dropped and none runs twice. Stage i+1 gathers
its buffer from the batch on the device, runs, applies its own gate, and scatters its logits back
into the batch's output in place (padding rows are dropped by the scatter); all in one jitted call
per capacity, so each stage compiles once per (batch shape, capacity) and never for a new count.

Stages are callables ``images -> logits`` (or ``-> (logits, aux)``, in which case the gate is called
as ``gate(logits_row, aux_row)``, e.g. for a learned gate over penultimate features). A flax NNX
module is run as ``model(x, train=False)``. A bound method of a pytree (``Teacher.apply``) gets its
object passed into the jitted call as an argument rather than baked in as constants.
Logits of a stage wider than the last stage's (a learning-to-defer student's ``C + 1`` outputs) are
cut to the last stage's ``C`` for the output and the predictions; gates still see the full row.

Data parallelism: with ``mesh``, the batch, the output and every buffer are sharded along ``data``
(``NamedSharding(mesh, P('data'))``) and stage parameters are replicated, so the batch size and every
capacity must be multiples of the device count.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from titans import parallel
from titans.runs import round_up

__all__ = ["CascadeOutput", "CascadeRunner", "capacity_ladder", "pow2_capacities", "plan_buffers"]


class CascadeOutput(NamedTuple):
    predictions: jax.Array  # (B,) int32: argmax of `logits`
    logits: jax.Array  # (B, C) float32: logits of the stage that answered each example
    answered_by: np.ndarray  # (B,) int32: index of the answering stage
    ran: np.ndarray  # (k,) examples each stage ran on in this batch, padding excluded
    padded: np.ndarray  # (k,) padding rows each stage ran on in this batch

    @property
    def answered(self) -> np.ndarray:
        """(k,) number of examples each stage answered."""
        return np.bincount(self.answered_by, minlength=len(self.ran))


def pow2_capacities(batch_size: int, multiple: int = 1) -> tuple[int, ...]:
    """``(B/8, B/4, B/2, B)``, each rounded up to a multiple of ``multiple`` (the device count)."""
    caps = {round_up(max(1, math.ceil(batch_size / d)), multiple) for d in (8, 4, 2, 1)}
    return tuple(sorted(caps))


def capacity_ladder(batch_size: int, multiple: int = 8, max_waste: float = 0.125) -> tuple[int, ...]:
    """Capacities up to ``batch_size`` (rounded up to ``multiple``) such that the smallest capacity
    holding n examples pads at most ``max_waste * n`` rows beyond rounding n up to ``multiple``.

    The runner's default. Finer than :func:`pow2_capacities` (less padded work on the expensive
    stage) at the price of one compilation per capacity.
    """
    if multiple < 1 or max_waste < 0:
        raise ValueError("multiple must be >= 1 and max_waste >= 0")
    top = round_up(batch_size, multiple)
    caps = [multiple]
    while caps[-1] < top:
        caps.append(min(top, max(caps[-1] + multiple, round_up(math.floor(caps[-1] * (1 + max_waste)), multiple))))
    return tuple(caps)


def plan_buffers(count: int, capacities: Sequence[int]) -> list[tuple[int, int]]:
    """How ``count`` deferred examples are packed: a list of ``(capacity, rows used)``.

    The smallest capacity that holds them; beyond the largest, full buffers of the largest plus one
    buffer (the smallest that fits) for the rest.
    """
    caps = sorted(capacities)
    plan = []
    while count > caps[-1]:
        plan.append((caps[-1], caps[-1]))
        count -= caps[-1]
    if count > 0:
        plan.append((caps[bisect.bisect_left(caps, count)], count))
    return plan


def _as_stage(stage) -> tuple[Callable, Any]:
    """``(fn(consts, images) -> output, consts)``, with the stage's arrays as explicit arguments."""
    if isinstance(stage, nnx.Module):
        graphdef, state = nnx.split(stage)
        return (lambda st, x: nnx.merge(graphdef, st)(x, train=False)), state
    if not callable(stage) and callable(getattr(stage, "apply", None)):
        stage = stage.apply
    if not callable(stage):
        raise TypeError(f"a cascade stage must be a callable images -> logits, got {type(stage).__name__}")
    obj, func = getattr(stage, "__self__", None), getattr(stage, "__func__", None)
    if obj is not None and func is not None:
        leaves, treedef = jax.tree.flatten(obj)
        # An unregistered object flattens to itself; only a real pytree of arrays can be an argument.
        if leaves and treedef.num_nodes > 1 and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
            return (lambda o, x: func(o, x)), obj
    return (lambda _, x: stage(x)), None


def _split_output(out):
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError("a stage returns logits or (logits, aux)")
        return out[0], out[1]
    return out, None


class CascadeRunner:
    """Runs a k-stage cascade, each stage only on the examples deferred to it.

    Args:
      stages: k callables ``images (B, ...) -> logits (B, C_i)`` (see the module docstring).
      gates: k-1 per-example gate functions (``titans.cascade.gates``); gate i scores stage i.
      thresholds: k-1 floats; stage i defers an example iff its gate score > ``thresholds[i]``.
      capacities: buffer sizes for the later stages, or None for the default
        ``capacity_ladder(B, lcm(8, devices), 0.125)`` of each batch size B: at most 12.5% padding
        beyond rounding, about 20 sizes for B = 512 (each compiled once, lazily or by :meth:`warmup`).
        ``pow2_capacities(B, devices)`` gives 4 sizes (faster compilation, up to 2x padding);
        benchmarks/cascade_speed.py compares the two.
      mesh: a 1-D ``data`` mesh (``titans.parallel.make_mesh``) for data-parallel runs, or None.
      num_classes: width of the output logits; default: the last stage's.

    Counters (cumulative, padding excluded unless named so): ``counters['ran']`` (k,) examples run
    per stage, ``counters['padded']`` (k,) padding rows, ``counters['calls']`` (k,) jitted calls,
    ``counters['batches']``; ``reset_counters()`` zeroes them. ``trace_counts`` (k,) counts how
    often each stage's jitted function was traced (i.e. compiled), so tests can check that nothing
    recompiles after :meth:`warmup`.
    """

    def __init__(
        self,
        stages: Sequence,
        gates: Sequence[Callable],
        thresholds: Sequence[float],
        capacities: Sequence[int] | None = None,
        mesh=None,
        num_classes: int | None = None,
    ):
        stages = list(stages)
        self.k = len(stages)
        if self.k < 1:
            raise ValueError("a cascade needs at least one stage")
        if len(gates) != self.k - 1:
            raise ValueError(f"{self.k} stages need {self.k - 1} gates, got {len(gates)}")
        self.gates = list(gates)
        self.thresholds = thresholds
        self.mesh = mesh
        self.num_devices = 1 if mesh is None else int(mesh.devices.size)
        if capacities is not None:
            capacities = self._check_capacities(capacities)
        self.capacities = capacities
        self._num_classes = None if num_classes is None else int(num_classes)
        self._num_classes_by_shape: dict = {}

        fns, consts = zip(*(_as_stage(s) for s in stages))
        self._stage_fns = list(fns)
        if mesh is not None:
            consts = parallel.replicate(list(consts), mesh)
        self._consts = list(consts)
        self._batch_sharding = None if mesh is None else NamedSharding(mesh, P(parallel.DATA_AXIS))
        self._replicated = None if mesh is None else NamedSharding(mesh, P())
        self.trace_counts = np.zeros(self.k, np.int64)
        self._jitted = [self._build_first()] + [self._build_later(i) for i in range(1, self.k)]
        self._finish = jax.jit(lambda logits: jnp.argmax(logits, -1).astype(jnp.int32))
        self.reset_counters()

    # -- configuration ---------------------------------------------------------------------------

    @property
    def thresholds(self) -> list[float]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values):
        values = [float(v) for v in np.asarray(values, np.float64).reshape(-1)]
        if len(values) != self.k - 1:
            raise ValueError(f"{self.k} stages need {self.k - 1} thresholds, got {len(values)}")
        self._thresholds = values
        # Passed as arrays, so changing a threshold does not recompile anything.
        self._thr = [np.float32(v) for v in values]

    def _check_capacities(self, capacities) -> tuple[int, ...]:
        caps = [int(c) for c in capacities]
        if not caps or min(caps) < 1:
            raise ValueError(f"capacities must be positive integers, got {tuple(capacities)}")
        bad = [c for c in caps if c % self.num_devices]
        if bad:
            raise ValueError(
                f"capacities {bad} are not multiples of the {self.num_devices} devices of the mesh; "
                f"each buffer is split evenly over the devices (try "
                f"{sorted({round_up(c, self.num_devices) for c in caps})})"
            )
        return tuple(sorted(set(caps)))

    def capacities_for(self, batch_size: int) -> tuple[int, ...]:
        """The capacities used for batches of ``batch_size``: the given ones, else the default ladder."""
        if self.capacities is not None:
            return self.capacities
        return capacity_ladder(batch_size, math.lcm(8, self.num_devices), 0.125)

    def reset_counters(self) -> None:
        self.counters = {
            "ran": np.zeros(self.k, np.int64),
            "padded": np.zeros(self.k, np.int64),
            "calls": np.zeros(self.k, np.int64),
            "batches": 0,
        }

    # -- jitted pieces ---------------------------------------------------------------------------

    def _constrain(self, x):
        if self._batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, self._batch_sharding)

    def _stage_and_gate(self, i, consts, images, thr):
        logits, aux = _split_output(self._stage_fns[i](consts, images))
        C = self._num_classes_cur
        head = logits[:, :C].astype(jnp.float32)
        if head.shape[-1] != C:
            raise ValueError(f"stage {i} returns {logits.shape[-1]} logits; the cascade's output has {C} classes")
        if i == self.k - 1:
            return head, None
        gate = self.gates[i]
        scores = jax.vmap(gate)(logits) if aux is None else jax.vmap(gate)(logits, aux)
        return head, scores > thr

    def _build_first(self):
        def first(consts, images, thr):
            self.trace_counts[0] += 1
            head, defer = self._stage_and_gate(0, consts, images, thr)
            if defer is None:
                defer = jnp.zeros(head.shape[0], bool)
            return self._constrain(head), self._constrain(defer)

        return jax.jit(first)

    def _build_later(self, i):
        def later(consts, images, out, gather_idx, scatter_idx, thr):
            self.trace_counts[i] += 1
            buf = self._constrain(jnp.take(images, gather_idx, axis=0))
            head, defer = self._stage_and_gate(i, consts, buf, thr)
            # Padding rows carry an out-of-range index and are dropped here.
            out = self._constrain(out.at[scatter_idx].set(head, mode="drop"))
            return (out,) if defer is None else (out, defer)

        return jax.jit(later, donate_argnums=(2,))

    # -- running ---------------------------------------------------------------------------------

    def _place(self, images):
        if self.mesh is None:
            return images if isinstance(images, jax.Array) else jnp.asarray(images)
        B = images.shape[0]
        if B % self.num_devices:
            raise ValueError(f"batch of {B} is not divisible by the {self.num_devices} devices of the mesh")
        if isinstance(images, jax.Array) and images.sharding == self._batch_sharding:
            return images
        return jax.device_put(images, self._batch_sharding)

    def _index(self, idx):
        idx = np.asarray(idx, np.int32)
        return idx if self._replicated is None else jax.device_put(idx, self._replicated)

    def _resolve_num_classes(self, images):
        if self._num_classes is not None:
            return self._num_classes
        key = (tuple(images.shape[1:]), str(images.dtype))
        if key not in self._num_classes_by_shape:
            spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
            out = jax.eval_shape(self._stage_fns[-1], self._consts[-1], spec)
            self._num_classes_by_shape[key] = int(_split_output(out)[0].shape[-1])
        return self._num_classes_by_shape[key]

    def __call__(self, images) -> CascadeOutput:
        return self._run(images, count=True)

    def _run(self, images, count: bool) -> CascadeOutput:
        images = self._place(images)
        B = images.shape[0]
        caps = self.capacities_for(B)
        self._num_classes_cur = self._resolve_num_classes(images)
        ran = np.zeros(self.k, np.int64)
        padded = np.zeros(self.k, np.int64)
        calls = np.zeros(self.k, np.int64)
        answered_by = np.zeros(B, np.int32)

        out, defer = self._jitted[0](self._consts[0], images, self._thr[0] if self.k > 1 else np.float32(0))
        ran[0], calls[0] = B, 1
        rows = np.arange(B)  # batch rows the current stage ran on, in buffer order
        for i in range(1, self.k):
            deferred = rows[np.asarray(defer)]  # the one device->host copy per stage
            if deferred.size == 0:
                break
            answered_by[deferred] = i
            last = i == self.k - 1
            masks, start = [], 0
            for cap, used in plan_buffers(deferred.size, caps):
                chunk = deferred[start : start + used]
                start += used
                gather = np.full(cap, chunk[0], np.int32)
                gather[:used] = chunk
                scatter = np.full(cap, B, np.int32)
                scatter[:used] = chunk
                res = self._jitted[i](
                    self._consts[i],
                    images,
                    out,
                    self._index(gather),
                    self._index(scatter),
                    np.float32(0) if last else self._thr[i],
                )
                out = res[0]
                if not last:
                    masks.append((res[1], used))
                ran[i] += used
                padded[i] += cap - used
                calls[i] += 1
            if not last:
                # All buffers were dispatched before any mask is read, so they run back to back.
                defer = np.concatenate([np.asarray(m)[:used] for m, used in masks])
            rows = deferred

        if count:
            self.counters["ran"] += ran
            self.counters["padded"] += padded
            self.counters["calls"] += calls
            self.counters["batches"] += 1
        return CascadeOutput(predictions=self._finish(out), logits=out, answered_by=answered_by, ran=ran, padded=padded)

    def warmup(self, example_images) -> None:
        """Compiles stage 0 for this batch shape and every later stage for every capacity.

        Nothing is counted. Thresholds do not matter: they are arguments, not constants.
        """
        images = self._place(example_images)
        B = images.shape[0]
        self._num_classes_cur = self._resolve_num_classes(images)
        out, defer = self._jitted[0](self._consts[0], images, np.float32(0))
        for i in range(1, self.k):
            for cap in self.capacities_for(B):
                res = self._jitted[i](
                    self._consts[i],
                    images,
                    out,
                    self._index(np.zeros(cap, np.int32)),
                    self._index(np.full(cap, B, np.int32)),
                    np.float32(0),
                )
                out = res[0]
        jax.block_until_ready((out, self._finish(out)))
