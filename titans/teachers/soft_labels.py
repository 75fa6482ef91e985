"""Soft labels that arrive with the batches: the loader wrapper, the source, the cache labeler."""

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

    def drain(self) -> int:
        """Waits for every batch labelled ahead and discards it, so no labelling work is left running
        (a benchmark drains before timing the next mode). Returns how many were drained."""
        n = 0
        while self._queue:
            self.labeler.result(self._queue.popleft()[1])
            n += 1
        return n

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
