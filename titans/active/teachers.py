"""Imperfect teachers on purpose: training a teacher on less data and/or with label noise.

Less data is a run config's `dataset.train_split` (e.g. 'train[:5%]'). Label noise is either spread over
every class (each moved label goes to a uniformly random other class), or confined to a few confusable
classes (`classes`, e.g. shirt, pullover and coat): only their labels are moved, each to the next class
of the list (cyclically). A teacher trained on such labels is wrong mostly on those classes, and within
them on the ambiguous images, where the student is uncertain too: its mistakes concentrate on the points
an uncertainty selection buys, the setting the robust selection is for. Label noise is added here,
without touching the trainer: `train_and_evaluate` gets a Method whose loss reads each row's
label from a fixed table of noisy labels (indexed by the loader's example index), so the teacher
fits the noisy labels while everything else (checkpoints, resume, evaluation on clean test
labels) is the plain trainer's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from titans import data as data_lib
from titans import losses, paths, runs
from titans.train import Method, ensure_trained, train_and_evaluate


def noisy_labels(labels: np.ndarray, noise: float, num_classes: int, seed: int, classes=()) -> np.ndarray:
    """A copy of `labels` with some moved to a wrong class. Deterministic in `seed`.

    Without `classes`: exactly round(noise * n) labels, chosen at random, each replaced by a uniformly
    random *different* class. With `classes` (at least two): exactly round(noise * n_c) of the n_c labels
    that are one of `classes`, each replaced by the next class of `classes` (the last by the first);
    every other label is kept.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"label noise must be in [0, 1], got {noise}.")
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes.")
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng([seed, 0x401])
    out = labels.copy()
    if len(classes):
        classes = np.asarray(classes, np.int64)
        if len(classes) < 2 or classes.max() >= num_classes or len(set(classes.tolist())) != len(classes):
            raise ValueError(f"noise classes {classes.tolist()} must be >= 2 distinct classes below {num_classes}.")
        eligible = np.flatnonzero(np.isin(labels, classes))
        flip = rng.choice(eligible, size=int(round(noise * len(eligible))), replace=False)
        successor = np.arange(num_classes)
        successor[classes] = np.roll(classes, -1)
        out[flip] = successor[labels[flip]]
        return out.astype(np.int32)
    flip = rng.choice(len(labels), size=int(round(noise * len(labels))), replace=False)
    shift = rng.integers(1, num_classes, size=len(flip))  # never 0: the class always changes
    out[flip] = (labels[flip] + shift) % num_classes
    return out.astype(np.int32)


def noisy_label_method(table: np.ndarray, label_smoothing: float = 0.0) -> Method:
    """A trainer Method: cross-entropy against table[example index] instead of the batch's label."""

    def loss(logits, aux, teacher_logits, batch, frozen, step):
        del aux, teacher_logits, step
        labels = frozen["labels"][batch["index"]]
        return losses.cross_entropy(logits, labels, label_smoothing), jnp.ones(labels.shape, jnp.float32)

    return Method(frozen={"labels": jnp.asarray(table, jnp.int32)}, loss=loss, needs_index=True)


def train_teacher(run_config, workdir: str, *, label_noise: float = 0.0, noise_classes=()) -> dict:
    """Trains (or resumes, or finds finished) a teacher run in `workdir`, with `label_noise` (confined
    to `noise_classes` when given; see `noisy_labels`).

    Writes WORKDIR/label_noise.json (the noise, its classes, how many labels it changed, per class).
    Returns the trainer's results.
    """
    if runs.RunDir(workdir).finished or not label_noise:
        return ensure_trained(run_config, workdir)
    info = data_lib.dataset_info(run_config.dataset.name)
    src = data_lib.get_source(
        run_config.dataset.name, run_config.dataset.train_split, data_dir=run_config.dataset.data_dir or None
    )
    clean = np.fromiter((e["label"] for e in src.__getitems__(range(len(src)))), np.int64, len(src))
    table = noisy_labels(clean, label_noise, info.num_classes, run_config.seed, classes=noise_classes)
    changed = table != clean
    paths.makedirs(workdir)
    runs.write_json(
        paths.join(workdir, "label_noise.json"),
        {
            "label_noise": label_noise,
            "noise_classes": [int(c) for c in noise_classes],
            "num_examples": int(len(table)),
            "num_changed": int(np.sum(changed)),
            "num_changed_per_class": np.bincount(clean[changed], minlength=info.num_classes).tolist(),
            "seed": int(run_config.seed),
        },
    )
    return train_and_evaluate(run_config, workdir, method=noisy_label_method(table, run_config.label_smoothing))
