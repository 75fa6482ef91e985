"""Orbax checkpoints of a run: atomic async saves, auto-resume, and refusal of foreign checkpoints.

A step directory holds four items:
  model   the model's variables (parameters and batch statistics) as plain nested dicts,
  train   the optimizer state, the step counter and the RNG key,
  loader  the input pipeline's position (JSON), so that a resumed run sees the same examples,
  meta    the fields that fix the checkpoint's structure (model, classes, input shape, optimizer)
          and a fingerprint of them (JSON).
A teacher is never saved in a student's checkpoint; loading a teacher reads only its `model` item.

Nothing here deletes or rewrites a checkpoint it cannot use: a mismatched or unreadable one raises
an error naming what was expected, and stays on disk as it was.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from titans import config as config_lib

ITEMS = ("model", "train", "loader", "meta")


class CheckpointError(RuntimeError):
    """Base class: a checkpoint that cannot be used for this run."""


class IncompatibleCheckpointError(CheckpointError):
    """The workdir holds a checkpoint of a differently shaped run (other model, classes, optimizer)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step exists but could not be read."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree):
    """Typed PRNG keys (e.g. a dropout stream's) are stored as their raw uint32 data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree, like):
    return jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref) else x, tree, like
    )


def _abstract(tree):
    def spec(x):
        x = jax.random.key_data(x) if _is_key(x) else x
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


class Checkpointer:
    """Saves and restores one run's state under WORKDIR/checkpoints."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 and not read_only else None,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, model: Any, train: Any, loader: dict, meta: dict) -> None:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(to_savable(model)),
            train=ocp.args.StandardSave(to_savable(train)),
            loader=ocp.args.JsonSave(loader),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_meta(self, step: int) -> dict:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:  # orbax raises many types for a damaged step; name the step instead
            raise CorruptCheckpointError(
                f"Checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: {e}). "
                f"It was left as it is. Saved steps: {self.all_steps()}; pick another with "
                f"--config.checkpoint.restore_step=N, or use a fresh workdir."
            ) from e

    def check_meta(self, step: int, expected: dict) -> dict:
        """Raises IncompatibleCheckpointError unless the step's meta fields equal `expected`."""
        found = self.read_meta(step)
        got, want = found.get("fields", {}), expected["fields"]
        diffs = [
            f"{k}: checkpoint has {got.get(k)!r}, this run has {want.get(k)!r}"
            for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)
        ]
        if diffs:
            raise IncompatibleCheckpointError(
                f"The workdir's checkpoint (step {step} in {self.directory}) is from an incompatible run:\n  "
                + "\n  ".join(diffs)
                + "\nIt was left untouched. Use another --workdir, or run with the checkpoint's config."
            )
        return found

    def restore(self, step: int, *, model_like: Any, train_like: Any, expected_meta: dict):
        """Restores (model, train, loader_state) of `step` after checking its meta."""
        self.check_meta(step, expected_meta)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(_abstract(model_like)),
                    train=ocp.args.StandardRestore(_abstract(train_like)),
                    loader=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CorruptCheckpointError(
                f"Checkpoint step {step} in {self.directory} could not be restored "
                f"({type(e).__name__}: {e}). It was left as it is. Saved steps: {self.all_steps()}; pick "
                f"another with --config.checkpoint.restore_step=N."
            ) from e
        return (from_savable(out["model"], model_like), from_savable(out["train"], train_like), dict(out["loader"]))

    def restore_model(self, step: int, model_like: Any):
        """Restores only the `model` item (how a teacher is loaded)."""
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(model_like)))
            )
        except Exception as e:
            raise CorruptCheckpointError(
                f"Model variables of step {step} in {self.directory} could not be restored ({type(e).__name__}: {e})."
            ) from e
        return from_savable(out["model"], model_like)


def meta_for(config, info, num_outputs: int | None = None) -> dict:
    """The fields that fix a checkpoint's structure, and their fingerprint."""
    fields = {
        "num_outputs": int(num_outputs or info.num_classes),
        "model.name": config.model.name,
        "model.kwargs": config_lib.fingerprint(config.model.kwargs.to_dict()),
        "num_classes": int(info.num_classes),
        "image_shape": list(info.image_shape),
        "optimizer.name": config.optimizer.name,
        "dataset.name": config.dataset.name,
    }
    return {"fields": fields, "fingerprint": config_lib.fingerprint(fields)}


def describe(workdir: str) -> dict:
    """Saved steps and the meta of the latest, without loading arrays (for inspection tools)."""
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    return {"steps": steps, "meta": ckpt.read_meta(steps[-1]) if steps else None}


class TreeCheckpoints:
    """Numbered checkpoints of one pytree of fixed shapes (e.g. an active-distillation round's state).

    For a method's own progress between trainer runs; a training run's state goes through
    `Checkpointer`. Saves are synchronous: when `save` returns, the step is on disk.
    """

    def __init__(self, directory: str, keep: int = 2):
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: dict) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(tree))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict) -> dict:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
