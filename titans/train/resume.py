"""What a run may resume from, and with which teacher: the checks that keep a resumed run the run
it was. A resume is refused (ResumeMismatchError, listing what differs) when the config changed in a
field that changes what is computed, or when the teacher it distils from is not the one pinned in its
checkpoint, unless `checkpoint.allow_changes` names the change; an allowed change is recorded in
WORKDIR/config_changes.jsonl.
"""

from __future__ import annotations

import json
import logging
import time

import ml_collections

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import paths, runs
from titans.teachers import cache as cache_lib

# Fields that do not change what a run computes (paths, logging, checkpoint policy, the service's
# pool shape): they may differ between segments of one run. Prefixes end with a dot.
RESUME_IGNORED = (
    "name",
    "dataset.data_dir",
    "distributed.",
    "profile.",
    "log_every_steps",
    "eval_every_steps",
    "eval_batch_size",
    "ece_bins",
    "checkpoint.",
    "distill.service.",
    "distill.cache.dir",
    "distill.teacher_workdir",
    "distill.teacher_step",
    "distill.allow_unfinished_teacher",
)


def _ignored(field: str) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in RESUME_IGNORED)


def config_changes(saved: dict | None, config) -> dict[str, list]:
    """{field: [value in the checkpoint, value now]} over the fields both configs define."""
    if not saved:
        return {}
    old = config_lib.flat_json(ml_collections.ConfigDict(saved))
    new = config_lib.flat_json(config)
    return {k: [old[k], new[k]] for k in sorted(old.keys() & new.keys()) if not _ignored(k) and old[k] != new[k]}


def allowed(config) -> set[str]:
    return {f.strip() for f in config.checkpoint.allow_changes.split(",") if f.strip()}


def _refused(changes: dict, config) -> tuple[dict, str]:
    """The changes `checkpoint.allow_changes` does not name, and how they read in an error."""
    ok = allowed(config)
    refused = {k: v for k, v in changes.items() if k not in ok and "*" not in ok}
    return refused, "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items())


def check_changes(changes: dict, config, step: int, where: str) -> dict:
    """Raises ResumeMismatchError for changes `checkpoint.allow_changes` does not name; returns the
    allowed ones (to be recorded)."""
    refused, shown = _refused(changes, config)
    if refused:
        raise ckpt_lib.ResumeMismatchError(
            f"Resuming {where} from step {step} would change what the run computes: {shown}. Rerun with the "
            f"checkpoint's values, use a fresh workdir, or say the change is intended with "
            f"--config.checkpoint.allow_changes={','.join(refused)} (it is then recorded in config_changes.jsonl)."
        )
    return changes


def check_finished(run: runs.RunDir, config) -> None:
    """Refuses to report a finished run's results for a config that computes something else.

    The run's config.json is compared with `config` by the same rules as a resume (`config_changes`):
    a field that changes what is computed (learning rate, seed, model, teacher's step...) raises
    ResumeMismatchError listing each difference, unless `checkpoint.allow_changes` names it.
    """
    refused, shown = _refused(config_changes(run.config.to_dict() if run.exists else None, config), config)
    if refused:
        raise ckpt_lib.ResumeMismatchError(
            f"{run.path} holds a finished run of another config: {shown}. Its results are not this config's. "
            f"Use a fresh workdir, or rerun with the finished run's values."
        )


def record_changes(workdir: str, step: int, changes: dict) -> None:
    if not changes:
        return
    line = json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "changes": changes})
    paths.append_text(paths.join(workdir, "config_changes.jsonl"), line + "\n")
    logging.warning("Resuming %s from step %d with intended config changes: %s", workdir, step, changes)


# ---------------------------------------------------------------------------------- the teacher


def resolve_teacher(config, info, pinned: dict | None) -> tuple[int, dict]:
    """(teacher step to use, its identity) for a distillation run.

    A fresh run takes `distill.teacher_step` (the latest for -1) of a finished teacher (an unfinished
    one is refused unless `distill.allow_unfinished_teacher`); a resumed run takes the step pinned in
    its checkpoint, and is refused when that step is gone or its variables changed.
    """
    d = config.distill
    teacher = runs.RunDir(d.teacher_workdir)
    if not teacher.exists:
        raise runs.NotARunError(
            f"distill.teacher_workdir={d.teacher_workdir!r} is not a Titans run "
            f"(no config.json); train the teacher there first."
        )
    if pinned is None and not teacher.finished and not d.get("allow_unfinished_teacher", False):
        raise runs.UnfinishedTeacherError(
            f"The teacher in {teacher.path} has not finished (no results.json): a student would learn from a "
            f"teacher that is still changing. Finish it first, or set distill.allow_unfinished_teacher=True."
        )
    step = pinned["step"] if pinned is not None else teacher.resolve_step(d.teacher_step)
    if step not in teacher.checkpoint_steps():
        raise ckpt_lib.ResumeMismatchError(
            f"This run distils from the teacher in {teacher.path} at step {step} (pinned in its checkpoint), "
            f"which is no longer saved there (saved: {teacher.checkpoint_steps()}). Use a fresh workdir."
        )
    identity = cache_lib.teacher_identity(teacher.path, step, info)
    if (
        pinned is not None
        and identity["variables_sha256"] != pinned["variables_sha256"]
        and "teacher" not in allowed(config)
    ):
        raise ckpt_lib.ResumeMismatchError(
            f"The teacher in {teacher.path} at step {step} is not the one this run started with (its variables' "
            f"SHA-256 changed). Use a fresh workdir, or --config.checkpoint.allow_changes=teacher."
        )
    return step, identity
