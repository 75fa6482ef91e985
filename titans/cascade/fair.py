"""Fair baselines: every single-student baseline and every cascade student trained alike.

A comparison between a cascade and a single student of the same cost, or between two student objectives,
says something about the method only when the students had the same recipe and budget. `apply_recipe`
gives every student stage of a cascade pipeline (`cascade.students`, baselines included) the same
number of epochs, the same augmentation, and the same small learning-rate search: one stage per rate of
the grid, `<stage>_lr<i>`, each evaluated on `select_split` (held out from every stage's training).
`select` then keeps, per student, the rate with the best validation accuracy (the cascade evaluation's
`val_accuracy`, on the cascade's threshold split), so the choice never reads the test split.

Augmentation applies only where the soft labels are computed on the augmented image (online or service
teachers); a student whose soft labels are one per row (a teacher cache, cross-fitted teachers) cannot
augment, so a recipe with `augment=True` is refused for such a stage rather than applied to some students only.
"""

from __future__ import annotations

import ml_collections

from titans import config as config_lib


def apply_recipe(
    pipeline: ml_collections.ConfigDict,
    *,
    epochs: float,
    augment: bool,
    learning_rates: tuple[float, ...],
    select_split: str,
) -> ml_collections.ConfigDict:
    """`pipeline` with every student stage replaced by one stage per learning rate, all with `epochs` epochs,
    `dataset.augment = augment` and `dataset.eval_split = select_split`; `cascade.students`/`baselines` list
    the new stages and `cascade.fair` records the recipe."""
    if not learning_rates or any(lr <= 0 for lr in learning_rates):
        raise config_lib.ConfigError(f"fair recipe: learning_rates={learning_rates!r} must be positive rates.")
    c = pipeline
    students = list(c.cascade.students)
    order, variants = [], {}
    for name in c.stage_order:
        if name not in students:
            order.append(name)
            continue
        base = c.stages[name]
        if augment and (base.distill.teacher_mode != "online" or base.distill.get("crossfit_teachers", "")):
            raise config_lib.ConfigError(
                f"fair recipe: stage {name!r} reads one soft label per row (teacher_mode={base.distill.teacher_mode!r}"
                f"{', cross-fitted' if base.distill.get('crossfit_teachers', '') else ''}): it cannot augment."
            )
        variants[name] = []
        for i, lr in enumerate(learning_rates):
            s = ml_collections.ConfigDict(base.to_dict())
            s.name = f"{name}_lr{i}"
            s.total_epochs, s.total_steps = float(epochs), 0
            s.dataset.augment = bool(augment)
            s.dataset.eval_split = select_split
            s.optimizer.learning_rate = float(lr)
            c.stages[s.name] = s
            variants[name].append(s.name)
            order.append(s.name)
        del c.stages[name]
    c.stage_order = tuple(order)
    c.cascade.students = tuple(v for n in students for v in variants.get(n, [n]))
    c.cascade.baselines = tuple(v for n in c.cascade.get("baselines", ()) for v in variants.get(n, [n]))
    c.cascade.fair = ml_collections.ConfigDict(
        dict(
            epochs=float(epochs), augment=bool(augment), learning_rates=tuple(learning_rates), select_split=select_split
        )
    )
    return c


def select(cascade_result: dict, suffix: str = "_lr") -> dict[str, str]:
    """{student: its learning-rate variant with the best validation accuracy} from a cascade.json (ties: the
    first rate of the grid)."""
    best: dict[str, tuple[float, str]] = {}
    for name, entry in cascade_result["students"].items():
        base = name.rsplit(suffix, 1)[0] if suffix in name else name
        acc = float(entry["val_accuracy"])
        if base not in best or acc > best[base][0]:
            best[base] = (acc, name)
    return {base: name for base, (_, name) in best.items()}
