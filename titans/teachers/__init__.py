"""Where a student's soft labels come from: the one interface the trainer asks.

`distill.teacher_mode` picks the source:

  online   the teacher's forward pass inside the jitted student step (the trainer's own path; nothing
           here is used);
  cache    teacher outputs read from a sharded ArrayRecord cache written beforehand by
           `python -m titans.teachers.cache` (full logits or top-k), checked against its manifest;
  service  teacher inference on a pool of Ray actors (`titans.teachers.service`), elastic and fault
           tolerant, that the trainer streams its batches through.

`distill.crossfit_teachers` (titans/teachers/crossfit.py) replaces all three: every training row's soft
label comes from a listed teacher that did not train on that row, assembled before training.

For `cache` and `service` the trainer wraps its `TrainLoader` in a `SoftLabelLoader`: every batch
it hands out carries `batch["teacher_logits"]` (float32, (local batch, classes)), which the train
step uses instead of calling the teacher (see `titans.train.steps.make_train_step`). The wrapper keeps a bounded
number of batches in flight, hands them out in the loader's order, and reports the loader state of
the batches it has handed out, so a resumed run continues exactly where the checkpoint was taken.

    source = open_soft_labels(config, info, train_src)   # None for online; checks cache/teacher
    with source:
        loader = source.wrap(loader)
        batch = next(loader)                              # batch["teacher_logits"]
"""

from __future__ import annotations

from titans import config as config_lib
from titans.teachers import cache as cache_lib
from titans.teachers import crossfit
from titans.teachers.soft_labels import (
    MODES,
    CacheLabeler,
    SoftLabeler,
    SoftLabelLoader,
    SoftLabelSource,
    topk_to_logits,
)


def open_soft_labels(config, info, train_src) -> SoftLabelSource | None:
    """The soft-label source `config.distill.teacher_mode` asks for (None for online / no teacher).

    Everything is checked here, before training starts: the cache's manifest against this run's
    teacher, dataset, split and size; the teacher against the data; the service's first workers.
    """
    d = config.distill
    mode = d.get("teacher_mode", "online")
    if d.teacher_workdir and crossfit.teacher_dirs(config):  # each row from a teacher that did not train on it
        return crossfit.open_crossfit(config, info, train_src)
    if not d.teacher_workdir or mode == "online":
        return None
    if mode == "cache":
        kind = config.dataset.augmentation or info.augment
        if config.dataset.augment and kind != "none":
            raise config_lib.ConfigError(
                f"distill.teacher_mode='cache' with dataset.augment=True on '{info.name}' (augmentation "
                f"'{kind}'): the cache holds one soft label per example, computed on the "
                f"un-augmented image, so it cannot label augmented views. Set dataset.augment=False, or use "
                f"teacher_mode='online' or 'service' (both label the augmented images the student sees)."
            )
        identity = cache_lib.teacher_identity(d.teacher_workdir, d.teacher_step, info)
        cache = cache_lib.TeacherCache(d.cache.dir)
        cache.check(
            teacher=identity,
            dataset=config.dataset.name,
            split=config.dataset.train_split,
            num_examples=len(train_src),
            topk=d.cache.topk,
            dtype=d.cache.dtype,
        )
        labeler = CacheLabeler(cache, info.num_classes)
        return SoftLabelSource(
            labeler, in_flight=2, closer=labeler.close, description=f"cache {d.cache.dir} ({cache.describe()})"
        )
    if mode == "service":
        from titans.teachers import service  # noqa: PLC0415  (deferred: imports ray, the optional `ray` extra)

        pool = service.pool_from_config(config, info)
        return SoftLabelSource(
            service.PoolLabeler(pool),
            in_flight=d.service.max_in_flight,
            closer=pool.close,
            description=f"service ({pool.describe()})",
        )
    raise ValueError(f"distill.teacher_mode={mode!r} is not one of {list(MODES)}.")


__all__ = [
    "MODES",
    "CacheLabeler",
    "SoftLabelLoader",
    "SoftLabelSource",
    "SoftLabeler",
    "open_soft_labels",
    "topk_to_logits",
]
