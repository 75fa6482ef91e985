"""Orbax checkpoints of a run: atomic async saves, auto-resume, and refusal of foreign checkpoints.

A step directory holds four items:
  model   the model's variables (parameters and batch statistics) as plain nested dicts,
  train   the optimizer state, the step counter and the non-finite marker,
  loader  the input pipeline's position (JSON), so that a resumed run sees the same examples,
  meta    the fields that fix the checkpoint's structure (model, classes, input shape, optimizer)
          and a fingerprint of them; the run's config, its teacher (step and SHA-256 of its
          variables) and its progress (training time so far) (JSON).
A teacher is never saved in a student's checkpoint; loading a teacher reads only its `model` item.

Every file of a finished step is checksummed (SHA-256, WORKDIR/checkpoints_sha256/STEP.json) and
checked before the step is read, so a flipped byte is a named error, not a different model.

Nothing here deletes or rewrites a checkpoint it cannot use: a mismatched or unreadable one raises
an error naming what was expected, and stays on disk as it was.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from titans import config as config_lib
from titans import data as data_lib
from titans import paths

ITEMS = ("model", "train", "loader", "meta")
TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step directory orbax has not committed yet


class CheckpointError(RuntimeError):
    """Base class: a checkpoint that cannot be used for this run."""


class IncompatibleCheckpointError(CheckpointError):
    """The workdir holds a checkpoint of a differently shaped run (other model, classes, optimizer)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step exists but could not be read, or its files do not match their checksums."""


class UnverifiedCheckpointError(CorruptCheckpointError):
    """A step has no recorded checksums: its save never completed (the process died first), or an old
    Titans wrote it. It is not read unless the caller says so."""


class ResumeMismatchError(CheckpointError):
    """Resuming would silently change what the run computes (its config, or its teacher)."""


def file_sha256(path) -> str:
    return paths.sha256(path)


def step_checksums(step_dir) -> dict[str, str]:
    """SHA-256 of every file under a step directory (local or remote), by path relative to it."""
    return paths.tree_sha256(step_dir)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree):
    """Typed PRNG keys (e.g. a dropout stream's) are stored as their raw uint32 data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree, like):
    return jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref)) if _is_key(ref) else x, tree, like
    )


def _key_impl(ref):
    """The PRNG implementation of a key array, or of an abstract key (a model built by `nnx.eval_shape`,
    whose keys come from JAX's default implementation: checked against the abstract key's dtype)."""
    if not isinstance(ref, jax.ShapeDtypeStruct):
        return jax.random.key_impl(ref)
    impl = jax.config.jax_default_prng_impl
    if jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype != ref.dtype:
        raise ValueError(
            f"an abstract PRNG key of type {ref.dtype} is not JAX's default ({impl}): restore into a concretely "
            "built model (RunDir.load_model(module=...))"
        )
    return impl


def _abstract(tree):
    """ShapeDtypeStructs of a tree of arrays, or of abstract arrays (a model built by `nnx.eval_shape`).

    An abstract leaf has no placement. Left without one, orbax would rebuild the sharding the checkpoint was
    saved with, and refuse it where the devices differ (a run saved on 8 devices, read by a 1-device tool).
    It goes to this process's first device, as a model built eagerly does."""

    def spec(x):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        x = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


class Checkpointer:
    """Saves and restores one run's state under WORKDIR/checkpoints (a local directory or a bucket).

    A step counts as saved once its checksums are recorded: a thread waits for orbax to commit the save,
    then process 0 hashes the step's files and writes WORKDIR/checkpoints_sha256/STEP.json, before the
    next save may start. A step without that record (its process died between orbax's commit and the
    hashing) is refused by `verify` unless the caller allows it; the trainer then resumes from the
    newest verified step instead (`newest_verified`).
    """

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.workdir = paths.text(workdir)
        self.directory = paths.join(self.workdir, "checkpoints")
        self.sums_directory = paths.join(self.workdir, "checkpoints_sha256")
        self.read_only = read_only
        self._lock = threading.Lock()
        self._unhashed: list[int] = []
        self._hash_error: BaseException | None = None
        self._hasher: threading.Thread | None = None
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 and not read_only else None,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        if not read_only:
            self._remove_interrupted_saves()
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=self._options)

    def _remove_interrupted_saves(self) -> None:
        """Removes the temporary directories of saves a killed process never finished
        (checkpoints/STEP.orbax-checkpoint-tmp-*): orbax never reads them, and they would stay forever."""
        root = paths.resolve(self.directory)
        if jax.process_index() != 0 or not root.is_dir():
            return
        for child in root.iterdir():
            if TMP_MARK in child.name:
                logging.warning("Removing %s, left by a save that was interrupted.", child)
                child.rmtree()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, model: Any, train: Any, loader: dict, meta: dict) -> None:
        self.wait()  # the previous save is complete and checksummed before the next one starts
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(to_savable(model)),
            train=ocp.args.StandardSave(to_savable(train)),
            loader=ocp.args.JsonSave(loader),
            meta=ocp.args.JsonSave(meta),
        )
        with self._lock:
            self._unhashed.append(step)
        self.manager.save(step, args=args, force=True)
        # The step counts as saved once hashed: a thread waits for orbax to commit it, then hashes it at
        # once (not at the next save), so the window in which a crash leaves it unverified is short.
        self._hasher = threading.Thread(target=self._commit_and_hash, name=f"titans-hash-{step}", daemon=True)
        self._hasher.start()

    def _commit_and_hash(self) -> None:
        try:
            self.manager.wait_until_finished()
        except BaseException as e:  # re-raised by wait() in the caller's thread
            self._hash_error = e
            return
        self._record_checksums()

    def wait(self) -> None:
        """Blocks until every save is on disk and checksummed."""
        try:
            if self._hasher is not None:
                self._hasher.join()
                self._hasher = None
            self.manager.wait_until_finished()
            self._record_checksums()  # normally done already, by the hashing thread
            if self._hash_error is not None:
                raise self._hash_error
        except Exception as e:
            with self._lock:
                pending, self._unhashed, self._hash_error = self._unhashed, [], None
            raise CheckpointError(
                f"Saving checkpoint step(s) {pending} to {self.directory} failed ({type(e).__name__}: {e}). "
                f"Saved steps: {self.all_steps()}. Free space or fix the permissions, then rerun to resume."
            ) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------------------- checksums

    def _sums_path(self, step: int) -> str:
        return paths.join(self.sums_directory, f"{step}.json")

    def _record_checksums(self) -> None:
        """Hashes the steps saved and committed since the last call (the hashing thread, and `wait`)."""
        try:
            with self._lock:
                if self.read_only or jax.process_index() != 0:
                    self._unhashed.clear()  # other processes' saves are hashed by process 0
                    return
                pending = [s for s in self._unhashed if paths.exists(paths.join(self.directory, str(s)))]
                if not pending:
                    return
                paths.makedirs(self.sums_directory)
                for step in pending:
                    sums = step_checksums(paths.join(self.directory, str(step)))
                    paths.write_text(self._sums_path(step), json.dumps({"step": step, "sha256": sums}, indent=1))
                    self._unhashed.remove(step)
                self._drop_stale_sums()
        except Exception as e:  # raised again by wait(): a step that cannot be hashed is not saved
            self._hash_error = e

    def _drop_stale_sums(self) -> None:
        """Removes the records of steps the keep policy deleted."""
        steps = set(self.manager.all_steps())
        for file in paths.resolve(self.sums_directory).iterdir():
            stem = file.name.split(".")[0]
            if stem.isdigit() and int(stem) not in steps:
                file.unlink()

    def verified_steps(self) -> list[int]:
        """The saved steps whose checksums were recorded (whose saves completed)."""
        return [s for s in self.all_steps() if paths.exists(self._sums_path(s))]

    def verify(self, step: int, *, allow_unverified: bool = False) -> None:
        """Raises CorruptCheckpointError naming the first file of `step` whose SHA-256 differs from the
        one recorded when it was saved, and UnverifiedCheckpointError for a step with no record (its save
        never completed), unless `allow_unverified` (then it is read with a warning)."""
        recorded = paths.read_text(self._sums_path(step))
        if recorded is None:
            if allow_unverified:
                logging.warning(
                    "Checkpoint step %d in %s has no recorded checksums; reading it unverified as asked.",
                    step,
                    self.directory,
                )
                return
            raise UnverifiedCheckpointError(
                f"Checkpoint step {step} in {self.directory} has no recorded checksums: its save did not "
                f"complete (the process stopped before hashing it) or an old Titans wrote it, so a damaged "
                f"file there would go unnoticed. It was left as it is. Verified steps: {self.verified_steps()}; "
                f"pick one with --config.checkpoint.restore_step=N, or accept this one with "
                f"--config.checkpoint.allow_unverified=True."
            )
        step_dir = paths.join(self.directory, str(step))
        for rel, want in sorted(json.loads(recorded)["sha256"].items()):
            file = paths.join(step_dir, rel)
            got = file_sha256(file) if paths.exists(file) else "missing"
            if got != want:
                raise CorruptCheckpointError(
                    f"Checkpoint step {step} in {self.directory} fails its checksum: {rel} "
                    f"({'missing' if got == 'missing' else 'SHA-256 ' + got[:12] + '..., recorded ' + want[:12] + '...'}"
                    f"). It was left as it is. Saved steps: {self.all_steps()}; pick another with "
                    f"--config.checkpoint.restore_step=N, or use a fresh workdir."
                )

    # ------------------------------------------------------------------------------- restoring

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

    def restore(
        self, step: int, *, model_like: Any, train_like: Any, expected_meta: dict, allow_unverified: bool = False
    ):
        """Restores (model, train, loader_state) of `step` after checking its meta and checksums."""
        self.check_meta(step, expected_meta)
        self.verify(step, allow_unverified=allow_unverified)
        try:
            try:
                out = self._restore_items(step, model_like, train_like)
            except ValueError as e:
                # Checkpoints written before 2026-12-03 also hold an unused RNG key in `train`.
                if "rng" in train_like or "do not match" not in str(e):
                    raise
                legacy = {**train_like, "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
                out = self._restore_items(step, model_like, legacy)
                out["train"] = {k: v for k, v in out["train"].items() if k != "rng"}
        except Exception as e:
            raise CorruptCheckpointError(
                f"Checkpoint step {step} in {self.directory} could not be restored "
                f"({type(e).__name__}: {e}). It was left as it is. Saved steps: {self.all_steps()}; pick "
                f"another with --config.checkpoint.restore_step=N."
            ) from e
        return (from_savable(out["model"], model_like), from_savable(out["train"], train_like), dict(out["loader"]))

    def _restore_items(self, step: int, model_like: Any, train_like: Any) -> dict:
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(model_like)),
            train=ocp.args.StandardRestore(_abstract(train_like)),
            loader=ocp.args.JsonRestore(),
        )
        return dict(self.manager.restore(step, args=args))

    def restore_model(self, step: int, model_like: Any, *, allow_unverified: bool = False):
        """Restores only the `model` item (how a teacher is loaded), after checking its checksums."""
        self.verify(step, allow_unverified=allow_unverified)
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(model_like)))
            )
        except Exception as e:
            raise CorruptCheckpointError(
                f"Model variables of step {step} in {self.directory} could not be restored ({type(e).__name__}: {e})."
            ) from e
        return from_savable(out["model"], model_like)

    def supersede_after(self, step: int) -> list[int]:
        """Moves the steps saved after `step` to WORKDIR/checkpoints_superseded/<time>/ (kept, not
        deleted), so that a run restarted from `step` can save those steps again. Returns them."""
        later = [s for s in self.all_steps() if s > step]
        if not later:
            return []
        self.wait()
        target = paths.makedirs(paths.join(self.workdir, "checkpoints_superseded", time.strftime("%Y%m%d-%H%M%S")))
        for s in later:
            paths.resolve(paths.join(self.directory, str(s))).rename(target / str(s))
            if paths.exists(self._sums_path(s)):
                paths.resolve(self._sums_path(s)).rename(target / f"{s}.sha256.json")
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=self._options)
        logging.warning("Restarting from step %d: the later steps %s were moved to %s.", step, later, target)
        return later


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
    if config.get("mlm") and config.mlm.enabled:  # a MaskedLM's tree: the classifier under `backbone`, a head
        fields["mlm"] = True
    if getattr(info, "modality", "image") == "text":  # token ids mean nothing under another tokenizer
        fields["tokenizer.sha256"] = data_lib.tokenizer_for(config.dataset.data_dir or None)[1]
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
