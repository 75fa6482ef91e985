"""Where a student's soft labels come from: the one interface the trainer asks.

`distill.teacher_mode` picks the source:

  online   the teacher's forward pass inside the jitted student step (the trainer's own path; nothing
           here is used);
  cache    teacher outputs read from a sharded ArrayRecord cache written beforehand by
           `python -m titans.teachers.cache` (full logits or top-k), checked against its manifest;
  service  teacher inference on a pool of Ray actors (`titans.teachers.service`), elastic and fault
           tolerant, that the trainer streams its batches through.

For `cache` and `service` the trainer wraps its `TrainLoader` in a `SoftLabelLoader`: every batch
it hands out carries `batch["teacher_logits"]` (float32, (local batch, classes)), which the train
step uses instead of calling the teacher (see `train.make_train_step`). The wrapper keeps a bounded
number of batches in flight, hands them out in the loader's order, and reports the loader state of
the batches it has handed out, so a resumed run continues exactly where the checkpoint was taken.

    source = open_soft_labels(config, info, train_src)   # None for online; checks cache/teacher
    with source:
        loader = source.wrap(loader)
        batch = next(loader)                              # batch["teacher_logits"]
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Protocol

import numpy as np

MODES = ("online", "cache", "service")


class SoftLabeler(Protocol):
    """Asynchronous soft labels for batches: submit, then ask for the result (in any order)."""

    needs_index: bool

    def submit(self, batch: dict) -> Any: ...

    def result(self, ticket: Any) -> np.ndarray: ...

    def cancel(self, ticket: Any) -> None: ...


class SoftLabelLoader:
    """A `TrainLoader` whose batches carry `teacher_logits`, with `in_flight` batches labelled ahead.

    Batches are handed out in the loader's order whatever order their labels arrive in. The state
    (`get_state`) is the wrapped loader's state at the last batch handed out, not at the last batch
    taken from it, so batches labelled ahead and never used are recomputed after a resume.
    """

    def __init__(self, loader, labeler: SoftLabeler, in_flight: int = 2):
        self.loader = loader
        self.labeler = labeler
        self.in_flight = max(1, int(in_flight))
        self.step = int(loader.get_state()["step"])
        self._queue: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._queue) < self.in_flight:
            batch = next(self.loader)
            self._queue.append((batch, self.labeler.submit(batch)))
        batch, ticket = self._queue.popleft()
        batch["teacher_logits"] = self.labeler.result(ticket)
        self.step += 1
        return batch

    def _drop_queue(self):
        while self._queue:
            self.labeler.cancel(self._queue.popleft()[1])

    def get_state(self) -> dict:
        state = dict(self.loader.get_state())
        state["step"] = self.step
        return state

    def set_state(self, state: dict) -> None:
        self._drop_queue()
        self.loader.set_state(state)
        self.step = int(state["step"])

    def close(self) -> None:
        self._drop_queue()
        self.loader.close()

    def __getattr__(self, name):  # steps_per_epoch, global_indices, augment, ... of the wrapped loader
        if name in ("loader", "labeler", "_queue"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class SoftLabelSource:
    """An open source of soft labels (cache reader or teacher pool); a context manager."""

    def __init__(self, labeler: SoftLabeler, in_flight: int, closer=None, description: str = ""):
        self.labeler, self.in_flight, self._closer = labeler, in_flight, closer
        self.description = description

    @property
    def needs_index(self) -> bool:
        return self.labeler.needs_index

    def wrap(self, loader) -> SoftLabelLoader:
        return SoftLabelLoader(loader, self.labeler, self.in_flight)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class CacheLabeler:
    """Looks a batch's example indices up in a `TeacherCache`, on a background thread."""

    needs_index = True

    def __init__(self, cache, num_classes: int):
        self.cache, self.num_classes = cache, num_classes
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="titans-cache")

    def submit(self, batch):
        return self._pool.submit(self.cache.logits, np.asarray(batch["index"]))

    def result(self, ticket):
        return ticket.result()

    def cancel(self, ticket):
        ticket.cancel()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def topk_to_logits(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense logits from a teacher's top-k (values, indices), float32 (n, num_classes).

    Classes outside the top k get the row's smallest kept logit minus 1e4: their softmax
    probability is exactly 0 at any temperature a run uses, so the distillation target is the
    teacher's distribution renormalised over its top k (and stays finite, unlike -inf, which
    would make 0 * log 0 a NaN in the KL term).
    """
    values = np.asarray(values, np.float32)
    indices = np.asarray(indices, np.int64)
    fill = values.min(axis=-1, keepdims=True) - np.float32(1e4)
    out = np.broadcast_to(fill, (values.shape[0], num_classes)).copy()
    np.put_along_axis(out, indices, values, axis=-1)
    return out


def open_soft_labels(config, info, train_src) -> SoftLabelSource | None:
    """The soft-label source `config.distill.teacher_mode` asks for (None for online / no teacher).

    Everything is checked here, before training starts: the cache's manifest against this run's
    teacher, dataset, split and size; the teacher against the data; the service's first workers.
    """
    d = config.distill
    mode = d.get("teacher_mode", "online")
    if not d.teacher_workdir or mode == "online":
        return None
    from titans.teachers import cache as cache_lib

    if mode == "cache":
        if config.dataset.augment and info.augment != "none":
            from titans.config import ConfigError
            raise ConfigError(
                f"distill.teacher_mode='cache' with dataset.augment=True on '{info.name}' (augmentation "
                f"'{info.augment}'): the cache holds one soft label per example, computed on the "
                f"un-augmented image, so it cannot label augmented views. Set dataset.augment=False, or use "
                f"teacher_mode='online' or 'service' (both label the augmented images the student sees).")
        identity = cache_lib.teacher_identity(d.teacher_workdir, d.teacher_step, info)
        cache = cache_lib.TeacherCache(d.cache.dir)
        cache.check(teacher=identity, dataset=config.dataset.name, split=config.dataset.train_split,
                    num_examples=len(train_src), topk=d.cache.topk, dtype=d.cache.dtype)
        labeler = CacheLabeler(cache, info.num_classes)
        return SoftLabelSource(labeler, in_flight=2, closer=labeler.close,
                               description=f"cache {d.cache.dir} ({cache.describe()})")
    if mode == "service":
        from titans.teachers import service
        pool = service.pool_from_config(config, info)
        return SoftLabelSource(service.PoolLabeler(pool), in_flight=d.service.max_in_flight, closer=pool.close,
                               description=f"service ({pool.describe()})")
    raise ValueError(f"distill.teacher_mode={mode!r} is not one of {list(MODES)}.")


__all__ = ["MODES", "CacheLabeler", "SoftLabelLoader", "SoftLabelSource", "open_soft_labels", "topk_to_logits"]
