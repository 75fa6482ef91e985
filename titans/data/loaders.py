"""Host input pipelines: the infinite shuffled `TrainLoader` and the one-pass `eval_batches`.

Both are pure functions of (seed, step) underneath: batch k is computed from its global
indices and its own random numbers, never from the batches before it. That is what makes
the state a single step counter, lets a background thread compute batches ahead without
touching that state, and makes the batches independent of the number of processes.

Multi-host layout: global batch k holds `global_batch_size` example indices; process p
takes rows [p * local_bs, (p + 1) * local_bs). Concatenating all processes' step-k batches
gives the single-process step-k batch, row for row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import threading
from collections.abc import Callable, Iterator

import grain
import numpy as np

from titans.data import augment as aug
from titans.data import text
from titans.data.info import DatasetInfo


def _shuffle_seed(seed: int) -> int:
    """A 32-bit grain shuffle seed hashed from `seed`.

    grain shuffles epoch e with seed + e, so passing seeds straight through would make
    seed s + 1 replay seed s's orders one epoch early.
    """
    return int(np.random.SeedSequence([seed % 2**64, 0x5EED]).generate_state(1)[0])


def _check_layout(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a positive multiple of process_count {process_count}"
        )
    return global_batch_size // process_count


def _stack(examples: list[dict], image_shape) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([e["image"] for e in examples])
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise ValueError(f"source images have shape {images.shape[1:]}, expected {image_shape}")
    labels = np.fromiter((e["label"] for e in examples), dtype=np.int32, count=len(examples))
    return images, labels


def eval_images(examples: list[dict], info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Stacked images after the deterministic (evaluation) transform of `info.augment`."""
    if info.augment == "imagenet":
        examples = [{"image": aug.imagenet_eval_one(e["image"]), "label": e["label"]} for e in examples]
    return _stack(examples, info.image_shape)


class _Prefetcher:
    """Yields fn(start), fn(start + 1), ... computed up to `depth` items ahead in threads.

    Items are handed out strictly in order; the caller's notion of position is only
    advanced by what it has received, so anything computed ahead is simply discarded on
    `close()`.
    """

    def __init__(self, fn: Callable[[int], dict], start: int, stop: int | None, depth: int, threads: int):
        self._fn, self._next, self._stop = fn, start, stop
        self._depth = max(0, depth)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="titans-data")
            if self._depth
            else None
        )
        self._queue: collections.deque = collections.deque()
        self._submitted = start

    def _fill(self):
        while len(self._queue) < self._depth and (self._stop is None or self._submitted < self._stop):
            self._queue.append(self._pool.submit(self._fn, self._submitted))
            self._submitted += 1

    def __next__(self) -> dict:
        if self._stop is not None and self._next >= self._stop:
            raise StopIteration
        if self._pool is None:
            item = self._fn(self._next)
        else:
            self._fill()
            item = self._queue.popleft().result()
            self._fill()
        self._next += 1
        return item

    def close(self):
        for f in self._queue:
            f.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._depth = 0


class TrainLoader:
    """Infinite, deterministic, resumable training batches for one process.

    Each epoch is a fresh shuffle (grain `MapDataset.range(n).shuffle(seed).repeat()`) cut
    into `steps_per_epoch = n // global_batch_size` global batches; the last partial batch
    of every epoch is dropped. `next(loader)` gives this process's rows of the next global
    batch: {'image': uint8 (local_bs, H, W, C), 'label': int32 (local_bs,)}, plus
    'index': int32 (local_bs,) (each row's position in `src`) when `with_index=True`.
    """

    def __init__(
        self,
        src,
        info: DatasetInfo,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        augment: bool = True,
        prefetch: int = 2,
        num_threads: int = 1,
        with_index: bool = False,
        augmentation: str | None = None,
        group_by_length: int = 0,
    ):
        self.local_batch_size = _check_layout(global_batch_size, process_index, process_count)
        self.src, self.info = src, info
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.num_examples = len(src)
        self.steps_per_epoch = self.num_examples // global_batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"global_batch_size {global_batch_size} > {self.num_examples} examples")
        # The training transform: the dataset's own unless `augmentation` names another.
        self.kind = augmentation or info.augment
        self.augment = augment and self.kind != "none"
        # Each row's example index into `src` as batch["index"] (int32), for per-example state
        # kept outside the batch, such as a boosting weight player's weights.
        self.with_index = bool(with_index)
        self._prefetch, self._threads = prefetch, num_threads
        # Text: each epoch's rows are sorted by length within windows of `group_by_length` batches, so that a
        # batch's longest row (which sets its bucket) is close to its typical row (`_grouped_epoch`).
        self.group_by_length = int(group_by_length)
        self._lengths = self._row_lengths() if self.group_by_length else None
        self._set(seed=seed, step=0)

    def _row_lengths(self) -> np.ndarray:
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 (batches per sorting window), got {self.group_by_length}")
        if self.info.modality != "text":
            raise ValueError(f"group_by_length applies to text datasets; {self.info.name!r} holds images")
        lengths = np.empty(self.num_examples, np.int32)
        for a in range(0, self.num_examples, 8192):
            b = min(a + 8192, self.num_examples)
            lengths[a:b] = text.token_lengths(self._rows(np.arange(a, b))[0])
        return lengths

    def _set(self, seed: int, step: int):
        self.seed = int(seed)
        self.step = int(step)
        self._order = grain.MapDataset.range(self.num_examples).shuffle(seed=_shuffle_seed(self.seed)).repeat()
        self._grouped = {}  # (order, seed, epoch) -> that epoch's batches of indices, when grouping by length
        self._grouped_lock = threading.Lock()
        # Bound now, so a batch still being computed for a replaced state cannot mix states.
        fn = functools.partial(self._batch, self._order, self.seed)
        self._prefetcher = _Prefetcher(fn, self.step, None, self._prefetch, self._threads)

    # ----------------------------------------------------------------- batches as functions

    def global_indices(self, step: int) -> np.ndarray:
        """The example indices of global batch `step`, in row order."""
        return self._indices(self._order, step, 0, self.global_batch_size, self.seed)

    def _indices(self, order, step: int, row0: int, rows: int, seed: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._lengths is not None:
            return self._grouped_epoch(order, seed, epoch)[k, row0 : row0 + rows]
        first = epoch * self.num_examples + k * self.global_batch_size + row0
        return np.fromiter((order[first + j] for j in range(rows)), dtype=np.int64, count=rows)

    def _grouped_epoch(self, order, seed: int, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s batches when grouping by length, a function of (seed, epoch) only: the epoch's
        shuffled order (the same as without grouping), its dropped tail left out, each window of
        `group_by_length` batches stably sorted by row length and cut into batches, then the batches of the
        epoch put in a random order."""
        key = (id(order), seed, epoch)
        with self._grouped_lock:
            cached = self._grouped.get(key)
            if cached is None:
                cached = self._grouped[key] = self._group_epoch(order, seed, epoch)
                while len(self._grouped) > 2:  # the prefetcher reaches at most one epoch ahead
                    self._grouped.pop(next(iter(self._grouped)))
            return cached

    def _group_epoch(self, order, seed: int, epoch: int) -> np.ndarray:
        n, b, steps = self.num_examples, self.global_batch_size, self.steps_per_epoch
        perm = np.fromiter((order[epoch * n + j] for j in range(steps * b)), dtype=np.int64, count=steps * b)
        window = self.group_by_length * b
        for a in range(0, len(perm), window):
            chunk = perm[a : a + window]
            perm[a : a + window] = chunk[np.argsort(self._lengths[chunk], kind="stable")]
        rng = np.random.default_rng([seed % 2**64, epoch, 0x1E46])
        return perm.reshape(steps, b)[rng.permutation(steps)]

    def _batch(self, order, seed: int, step: int) -> dict:
        if self.info.modality == "text":
            return self._token_batch(order, seed, step)
        indices = self._indices(order, step, self.process_index * self.local_batch_size, self.local_batch_size, seed)
        batch = self._batch_examples(indices, seed, step)
        if self.with_index:
            batch["index"] = indices.astype(np.int32)
        return batch

    def _token_batch(self, order, seed: int, step: int) -> dict:
        """Token ids cut to the bucket of the GLOBAL batch's longest example (`text.bucket_length`), so
        that every process hands out the same length: each reads the whole global batch's rows."""
        indices = self._indices(order, step, 0, self.global_batch_size, seed)
        tokens, labels = self._rows(indices)
        rows = slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
        batch = {"image": tokens[rows, : text.bucket_length(tokens)], "label": labels[rows]}
        if self.with_index:
            batch["index"] = indices[rows].astype(np.int32)
        return batch

    def _rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-shape rows, untransformed: one gather per array from an in-memory source (`take`),
        else one record read per example, stacked."""
        if hasattr(self.src, "take"):
            return self.src.take(indices)
        return _stack(self.src.__getitems__(indices.tolist()), self.info.image_shape)

    def _batch_examples(self, indices: np.ndarray, seed: int, step: int) -> dict:
        lbs = self.local_batch_size
        row0 = self.process_index * lbs
        rows = slice(row0, row0 + lbs)
        kind = self.kind
        if not self.augment:
            if self.info.augment == "imagenet":
                images, labels = eval_images(self.src.__getitems__(indices.tolist()), self.info)
            else:
                images, labels = self._rows(indices)
            return {"image": images, "label": labels}
        # Random numbers are drawn for the whole global batch and then sliced, so each
        # example's augmentation depends on (seed, step, global row) only.
        rng = np.random.default_rng([seed % 2**64, step])
        n = self.global_batch_size
        if kind == "crop_flip":
            images, labels = self._rows(indices)
            params = {k: v[rows] for k, v in aug.crop_flip_params(rng, n).items()}
            images = aug.crop_flip(images, params)
        elif kind == "imagenet":
            examples = self.src.__getitems__(indices.tolist())
            params = {k: v[rows] for k, v in aug.random_resized_crop_params(rng, n).items()}
            images = np.stack([aug.imagenet_train_one(e["image"], params, i) for i, e in enumerate(examples)])
            labels = np.fromiter((e["label"] for e in examples), dtype=np.int32, count=lbs)
        else:
            raise ValueError(f"unknown augmentation {kind!r}")
        return {"image": images, "label": labels}

    # ------------------------------------------------------------------------ iteration

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self._prefetcher)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable; `step` counts the batches handed out (not those prefetched)."""
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
        }

    def set_state(self, state: dict) -> None:
        """Continue from `state`; the process count may differ from the one that saved it."""
        for key in ("global_batch_size", "num_examples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state[key]}, this loader {getattr(self, key)}: "
                    "the example order could not be continued"
                )
        self._prefetcher.close()
        self._set(seed=state.get("seed", self.seed), step=state["step"])

    def close(self) -> None:
        self._prefetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return math.ceil(num_examples / global_batch_size)


def eval_batches(
    src,
    info: DatasetInfo,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
    by_length: bool = False,
) -> Iterator[dict]:
    """One ordered pass over `src`, no augmentation, every example exactly once overall.

    All processes get the same number of batches (ceil(n / global_batch_size)); rows past
    the end are zero images with label 0 and mask False. With `by_length`, a text split is read
    in order of its rows' lengths (stable), so most batches fit a short bucket: for consumers that
    only sum over the examples (accuracy, loss), not those that keep outputs in the split's order.
    """
    lbs = _check_layout(global_batch_size, process_index, process_count)
    n = len(src)

    def batch(b: int) -> dict:
        start = b * global_batch_size + process_index * lbs
        stop = min(start + lbs, n)
        images = np.zeros((lbs, *info.image_shape), np.uint8)
        labels = np.zeros((lbs,), np.int32)
        mask = np.zeros((lbs,), bool)
        if stop > start:
            got_images, got_labels = eval_images(src.__getitems__(range(start, stop)), info)
            images[: stop - start], labels[: stop - start] = got_images, got_labels
            mask[: stop - start] = True
        return {"image": images, "label": labels, "mask": mask}

    if info.modality == "text":
        order = _length_order(src, info) if by_length else np.arange(n)
        batch = functools.partial(_token_eval_batch, src, info, global_batch_size, process_index, lbs, order)
    prefetcher = _Prefetcher(batch, 0, num_eval_batches(n, global_batch_size), prefetch, num_threads)
    try:
        while True:
            try:
                item = next(prefetcher)
            except StopIteration:
                return
            yield item
    finally:
        prefetcher.close()


def _length_order(src, info: DatasetInfo) -> np.ndarray:
    """The rows of a text split in order of their number of tokens (stable)."""
    lengths = np.concatenate(
        [
            text.token_lengths(eval_images(src.__getitems__(range(a, min(a + 4096, len(src)))), info)[0])
            for a in range(0, len(src), 4096)
        ]
    )
    return np.argsort(lengths, kind="stable")


def _token_eval_batch(
    src, info: DatasetInfo, global_batch_size: int, process_index: int, lbs: int, order: np.ndarray, b: int
) -> dict:
    """Eval batch `b` of a text split (rows `order[b * global_batch_size:]`): every process reads the whole
    global batch, so that all cut the token ids to the same bucket (that of the batch's longest example);
    rows past the end are all padding."""
    start, n = b * global_batch_size, len(src)
    stop = min(start + global_batch_size, n)
    tokens = np.zeros((global_batch_size, *info.image_shape), np.int32)
    labels = np.zeros((global_batch_size,), np.int32)
    mask = np.arange(global_batch_size) < stop - start
    rows_read = src.__getitems__(order[start:stop].tolist())
    tokens[: stop - start], labels[: stop - start] = eval_images(rows_read, info)
    rows = slice(process_index * lbs, (process_index + 1) * lbs)
    return {"image": tokens[rows, : text.bucket_length(tokens)], "label": labels[rows], "mask": mask[rows]}
