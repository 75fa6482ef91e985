"""Teacher outputs on the student's training rows from teachers that did not train on them (cross-fitting).

On its own training rows a strong teacher is right, and sure, almost everywhere: a target that reads
"is the teacher right on this row" (learning to defer, correctness or agreement weights, the budget
objective's hardness) learns a near-constant there. Cross-fitting gives every row a held-out answer:
K teacher runs, each trained on part of the training split (`distill.crossfit_teachers = "dir1,dir2"`),
and each row of the student's training split takes its outputs from the first listed teacher whose own
training split does not contain that row. The rows are compared as absolute example indices of the
dataset's named splits, from the split specs (`train[:50%]`, `train[50%:]+test`), so a row no listed
teacher left out is a named error, not a silent in-sample output.

The assembled outputs are the student's soft labels (`open_crossfit`: a `SoftLabelSource` keyed by row
index, as the teacher cache is) and the per-row "teacher" input of objectives that rank the whole split
(`row_logits`). Without cross-fitting, `check_held_out` refuses an objective that reads the teacher's
correctness when the teacher trained on the student's rows, unless `distill.allow_in_sample_teacher`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from titans import config as config_lib
from titans import data as data_lib
from titans import parallel, runs
from titans.teachers.soft_labels import SoftLabelSource


def teacher_dirs(config) -> list[str]:
    """The run directories of `distill.crossfit_teachers` (empty: no cross-fitting)."""
    return [d.strip() for d in str(config.distill.get("crossfit_teachers", "")).split(",") if d.strip()]


def absolute_rows(info, spec: str) -> np.ndarray:
    """The examples a TFDS split spec reads, in the order it reads them, as absolute indices: a named
    split's example i is `offset(split) + i`, the splits laid end to end in `info.splits`' order."""
    offsets, start = {}, 0
    for name, n in info.splits.items():
        offsets[name] = start
        start += int(n)
    sizes = {name: _SplitSize(int(n)) for name, n in info.splits.items()}
    parts = []
    for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes):
        n = int(info.splits[part.splitname])
        lo = 0 if part.from_ is None else part.from_
        hi = n if part.to is None else part.to
        parts.append(offsets[part.splitname] + np.arange(lo, hi))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


class _SplitSize:
    """What `ReadInstruction.to_absolute` reads of a split: its size."""

    def __init__(self, n: int):
        self.num_examples, self.num_shards, self.shard_lengths = n, 1, [n]


def assignment(info, student_split: str, teacher_splits: list[str], names: list[str] | None = None) -> np.ndarray:
    """For each row of `student_split`, the index of the first teacher whose training split leaves it out.

    Raises ConfigError naming how many rows every teacher trained on."""
    rows = absolute_rows(info, student_split)
    owner = np.full(len(rows), -1, np.int64)
    for k, split in enumerate(teacher_splits):
        free = (owner < 0) & ~np.isin(rows, absolute_rows(info, split))
        owner[free] = k
    missing = int((owner < 0).sum())
    if missing:
        names = names or [str(s) for s in teacher_splits]
        raise config_lib.ConfigError(
            f"distill.crossfit_teachers: {missing} of the {len(rows)} rows of the student's split {student_split!r} "
            f"were in the training split of every listed teacher ({', '.join(names)}; their splits "
            f"{list(teacher_splits)}): each row needs a teacher that did not train on it. Train one teacher per "
            f"fold, each leaving its fold out (e.g. train[:50%] and train[50%:] for K = 2)."
        )
    return owner


def _teacher_split(workdir: str) -> str:
    return runs.RunDir(workdir).config.dataset.train_split


def crossfit_logits(config, info, train_src, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C) float32 on every training row, each from its held-out teacher; the teacher index of
    each row). Images take the evaluation transform (no augmentation)."""
    dirs = teacher_dirs(config)
    owner = assignment(info, config.dataset.train_split, [_teacher_split(d) for d in dirs], dirs)
    if len(owner) != len(train_src):
        raise ValueError(f"the split spec gives {len(owner)} rows, the data source {len(train_src)}")
    out = np.zeros((len(owner), info.num_classes), np.float32)
    mesh = parallel.make_mesh()
    for k, workdir in enumerate(dirs):
        rows = np.nonzero(owner == k)[0]
        if not len(rows):
            continue
        teacher, _ = runs.load_teacher(workdir, info)
        images, _ = data_lib.eval_images(train_src.__getitems__([int(i) for i in rows]), info)
        out[rows] = np.asarray(runs.predict(runs.logits_fn, teacher, images, batch_size=batch_size, mesh=mesh))
    return out, owner


def row_logits(config, info, train_src, workdir: str | None = None, batch_size: int = 512) -> np.ndarray:
    """Logits (N, C+) of one run (`workdir`; default the cross-fitted teachers, else distill.teacher_workdir)
    on every row of the training split, in the split's order, with the evaluation transform."""
    if workdir is None and teacher_dirs(config):
        return crossfit_logits(config, info, train_src, batch_size)[0]
    model, _ = runs.load_teacher(workdir or config.distill.teacher_workdir, info)
    images, _ = runs.split_arrays(train_src, info)
    return np.asarray(runs.predict(runs.logits_fn, model, images, batch_size=batch_size, mesh=parallel.make_mesh()))


def check_held_out(config, objective, info) -> None:
    """Refuses (ConfigError) an objective that reads the teacher's correctness when its teacher outputs on
    the student's rows are in-sample: no cross-fitting, and the teacher's training split shares rows with the
    student's; `distill.allow_in_sample_teacher = True` lets it run."""
    d = config.distill
    if not d.teacher_workdir or teacher_dirs(config) or d.get("allow_in_sample_teacher", False):
        return
    if not objective.reads_teacher_correctness():
        return
    shared = np.isin(
        absolute_rows(info, config.dataset.train_split), absolute_rows(info, _teacher_split(d.teacher_workdir))
    )
    if shared.any():
        raise config_lib.ConfigError(
            f"distill.objective={d.objective!r} reads whether the teacher is right on each training row, but the "
            f"teacher {d.teacher_workdir} trained on {int(shared.sum())} of the student's {len(shared)} rows "
            f"({config.dataset.train_split!r}): there it is right and sure almost everywhere, so the target is "
            f"near-constant. Set distill.crossfit_teachers to teachers trained on other folds, train the teacher "
            f"on rows the student does not use, or set distill.allow_in_sample_teacher=True to run it anyway."
        )


class ArrayLabeler:
    """Soft labels looked up by row index in an in-memory (N, C) array."""

    needs_index = True

    def __init__(self, logits: np.ndarray):
        self.logits = np.asarray(logits, np.float32)

    def submit(self, batch):
        return self.logits[np.asarray(batch["index"])]

    def result(self, ticket):
        return ticket

    def cancel(self, ticket):
        del ticket


def open_crossfit(config, info, train_src) -> SoftLabelSource:
    """The cross-fitted soft labels as a source of the trainer (one output per row: no augmentation)."""
    kind = config.dataset.augmentation or info.augment
    if config.dataset.augment and kind != "none":
        raise config_lib.ConfigError(
            f"distill.crossfit_teachers with dataset.augment=True on '{info.name}' (augmentation '{kind}'): the "
            f"cross-fitted outputs are one per row, on the un-augmented image. Set dataset.augment=False."
        )
    if config.distill.get("teacher_mode", "online") != "online":
        raise config_lib.ConfigError(
            f"distill.crossfit_teachers assembles the soft labels itself; leave distill.teacher_mode='online' "
            f"(got {config.distill.teacher_mode!r})."
        )
    logits, owner = crossfit_logits(config, info, train_src)
    counts = np.bincount(owner, minlength=len(teacher_dirs(config))).tolist()
    return SoftLabelSource(
        ArrayLabeler(logits), in_flight=1, description=f"cross-fitted teachers (rows each: {counts})"
    )
