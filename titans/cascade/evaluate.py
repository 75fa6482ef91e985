"""Evaluates teacher/student cascades of a finished pipeline run: curves, costs, cascade.json, plots.

For every student and gate:
  1. logits of the teacher and the student on a held-out validation split and on the test split;
  2. gate scores; thresholds are quantiles of the *validation* scores (so a threshold is a validation
     deferral rate), and one vmapped, jitted sweep gives test accuracy and test deferral rate for all;
  3. amortized cost per example c = c_student + c_gate + r * c_teacher in XLA-measured FLOPs, and in
     measured time (each model's time per example on this machine, timed side by side);
  4. operating points chosen on validation only: target deferral rates, 25% / 50% of the teacher's
     FLOPs, and the cheapest threshold whose validation accuracy reaches the teacher's;
  5. the real cascade runner (student, gate, teacher on the deferred rows only) over the test split
     at the target rates, for the gates in `cascade.runner_gates` (default: all): its accuracy, deferral rate and wall time per example, and the number of
     examples where its answer differs from the offline sweep's (float noise at the threshold only).
The learned gate is fitted on the even-indexed validation examples and thresholded on the odd ones.
Writes WORKDIR/cascade.json and WORKDIR/cascade_*.png.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titans import data as data_lib
from titans import figures, parallel, paths, provenance, runs
from titans.cascade import config as cascade_config
from titans.cascade import cost as cost_lib
from titans.cascade import curves as curves_lib
from titans.cascade import gates as gates_lib
from titans.cascade.runner import CascadeRunner


@flax.struct.dataclass
class NormalizedModel:
    """A cascade stage: a frozen run model that takes raw uint8 images (normalised inside `apply`).

    A pytree (its arrays are arguments of jitted calls, not baked-in constants), so the cascade
    runner and `runs.predict` pass it into their jitted functions.
    """

    model: runs.FrozenModel

    @classmethod
    def of(cls, model: runs.FrozenModel, info) -> NormalizedModel:
        return cls(model.replace(mean=tuple(info.mean), std=tuple(info.std)))

    def apply(self, images):
        return self.model.logits(images)


def stage_logits(stage, images):
    """The `runs.predict` function of a cascade stage."""
    return stage.apply(images)


def flops_of(model: runs.FrozenModel, info, inputs=None) -> float:
    """XLA's FLOPs per example. For text with `inputs` (token ids (N, L)): the mean over the rows of the
    FLOPs at each row's bucket, the length it runs at when batches are sorted by length (`runs.predict`);
    else at the dataset's (longest) input shape."""
    if info.modality != "text" or inputs is None:
        return model.flops_per_example(info.image_shape)
    return runs.bucket_flops(model.module(), runs.length_buckets(inputs, info.image_shape[0]))


def _time_per_example(model: NormalizedModel, images, repeats: int = 5) -> float:
    """Median wall seconds per example of the jitted forward pass on one batch (after a compile call)."""
    return cost_lib.measure_time_per_example(model.apply, jnp.asarray(images), repeats=repeats)


def check_threshold_split(stage_configs, info, val_split: str) -> None:
    """Refuses a threshold split that shares examples with any stage's training split: thresholds
    chosen on data a stage trained on make its gate look surer than it is on new data."""
    for cfg in stage_configs:
        workdir = cfg.get("name", "?")
        shared = data_lib.overlap(info, val_split, cfg.dataset.train_split)
        if shared:
            raise ValueError(
                f"The threshold split {val_split!r} shares {shared} examples with the training split "
                f"{cfg.dataset.train_split!r} of stage {workdir!r}: thresholds would be chosen on data that stage "
                f"trained on. Hold out a split no stage trains on (e.g. train[:90%] to train, train[90%:] here)."
            )


def evaluate_cascades(config, workdir: str) -> dict:
    """Evaluates `config.cascade` (see configs/titans_fmnist.py) on the stages in `workdir`."""
    if jax.process_count() > 1:
        raise RuntimeError(
            "The cascade evaluation runs in a single process; the training stages are finished. "
            "Re-run the same command on one host (finished stages are skipped) to evaluate."
        )
    cc = cascade_config.section(config)
    t0 = time.perf_counter()
    workdir = paths.text(workdir)  # a URL (gs://...) kept as it is
    teacher_dir = paths.join(workdir, cc.teacher)
    teacher, t_cfg, info, _ = runs.load_model(teacher_dir)
    data_dir = t_cfg.dataset.data_dir or None
    stage_configs = [runs.RunDir(paths.join(workdir, name)).config for name in (cc.teacher, *cc.students)]
    check_threshold_split(stage_configs, info, cc.val_split)
    mesh = parallel.make_mesh()
    batch_size = runs.round_up(cc.batch_size, mesh.devices.size)
    val_x, y_val = runs.split_arrays(data_lib.get_source(info.name, cc.val_split, data_dir=data_dir), info)
    test_x, y_test = runs.split_arrays(data_lib.get_source(info.name, cc.test_split, data_dir=data_dir), info)
    teacher = NormalizedModel.of(teacher, info)
    logits_of = functools.partial(runs.predict, stage_logits, mesh=mesh, batch_size=batch_size)
    timing_images = test_x[:batch_size]
    t_val, t_test, t_entry = _evaluate_teacher(
        teacher,
        teacher_dir,
        info=info,
        val=(val_x, y_val),
        test=(test_x, y_test),
        logits_of=logits_of,
        timing_images=timing_images,
    )
    setup = _Setup(
        cc=cc,
        info=info,
        teacher=teacher,
        t_entry=t_entry,
        val=_Split(val_x, y_val, t_val),
        test=_Split(test_x, y_test, t_test),
        logits_of=logits_of,
        timing_images=timing_images,
        mesh=mesh,
        batch_size=batch_size,
    )
    raw = {"val/label": y_val, "test/label": y_test, "val/teacher": t_val, "test/teacher": t_test}

    out = {
        "teacher": t_entry,
        "val_split": cc.val_split,
        "test_split": cc.test_split,
        "val_examples": int(len(y_val)),
        "test_examples": int(len(y_test)),
        "batch_size": batch_size,
        "num_devices": int(mesh.devices.size),
        "backend": jax.default_backend(),
        "baselines": list(cc.baselines),
        "students": {},
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),  # the whole pipeline
        **provenance.provenance(),  # revision, dirty, titans_version of the code that evaluated it
    }
    for name in cc.students:
        student = _evaluate_student(setup, paths.join(workdir, name))
        raw[f"val/{name}"], raw[f"test/{name}"] = student.val_logits, student.test_logits
        out["students"][name] = student.entry
        _print_student_summary(name, student.entry)
    out["eval_time_s"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        runs.write_text(paths.join(workdir, "cascade.json"), json.dumps(out, indent=1))
        write_logits(paths.join(workdir, LOGITS_FILE), raw)
        plot(out, workdir)
    return out


LOGITS_FILE = "cascade_logits.npz"


def write_logits(path: str, arrays: dict) -> None:
    """Every stage's logits on the threshold and test splits (float16) and the labels (int16), compressed:
    the compact raw output from which the offline curves are recomputed (titans/results)."""
    compact = {k: np.asarray(v, np.int16 if k.endswith("/label") else np.float16) for k, v in sorted(arrays.items())}
    buf = io.BytesIO()
    np.savez_compressed(buf, **compact)
    paths.write_bytes(path, buf.getvalue())  # atomic, local or in a bucket


@dataclasses.dataclass(frozen=True)
class _Split:
    """A split's images, labels and teacher logits."""

    images: np.ndarray
    labels: np.ndarray
    teacher: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the evaluation of every student and gate shares."""

    cc: ml_collections.ConfigDict  # the cascade section, completed with its defaults (cascade/config.py)
    info: Any  # the dataset's DatasetInfo
    teacher: NormalizedModel
    t_entry: dict  # the teacher's entry of cascade.json
    val: _Split  # where thresholds are chosen
    test: _Split
    logits_of: Callable  # (stage, images) -> logits, batched on the mesh
    timing_images: np.ndarray  # one batch, to time each model on
    mesh: Any
    batch_size: int


@dataclasses.dataclass(frozen=True)
class _Student:
    """A loaded student, its entry of cascade.json and its logits on the validation and test splits."""

    model: NormalizedModel
    entry: dict
    val_logits: np.ndarray
    test_logits: np.ndarray


def _evaluate_teacher(teacher: NormalizedModel, teacher_dir: str, *, info, val, test, logits_of, timing_images):
    """The teacher's logits on the validation and test splits, and its entry of cascade.json.

    `val` and `test` are (images, labels); returns (validation logits, test logits, entry), the entry
    holding the teacher's accuracies, FLOPs and measured time per example.
    """
    (val_x, y_val), (test_x, y_test) = val, test
    t_val, t_test = logits_of(teacher, val_x), logits_of(teacher, test_x)
    c_teacher = flops_of(teacher.model, info, test_x)
    t_time_teacher = _time_per_example(teacher, timing_images)
    teacher_val_acc = float(np.mean(t_val.argmax(-1) == y_val))
    teacher_test_acc = float(np.mean(t_test.argmax(-1) == y_test))
    entry = {
        "workdir": teacher_dir,
        "val_accuracy": teacher_val_acc,
        "test_accuracy": teacher_test_acc,
        "flops_per_example": c_teacher,
        "time_per_example_s": t_time_teacher,
    }
    return t_val, t_test, entry


def _evaluate_student(setup: _Setup, s_dir: str) -> _Student:
    """One student: its entry of cascade.json (its own accuracies and costs, and every gate it supports)
    and its validation and test logits."""
    C = setup.info.num_classes
    model, s_cfg, _, _ = runs.load_model(s_dir)
    model = NormalizedModel.of(model, setup.info)
    s_val, s_test = setup.logits_of(model, setup.val.images), setup.logits_of(model, setup.test.images)
    entry = {
        "objective": s_cfg.distill.get("objective", "standard"),
        "model_kwargs": s_cfg.model.kwargs.to_dict(),
        "flops_per_example": flops_of(model.model, setup.info, setup.test.images),
        "time_per_example_s": _time_per_example(model, setup.timing_images),
        "val_accuracy": float(np.mean(s_val[:, :C].argmax(-1) == setup.val.labels)),
        "test_accuracy": float(np.mean(s_test[:, :C].argmax(-1) == setup.test.labels)),
        "gates": {},
    }
    student = _Student(model, entry, s_val, s_test)
    for gate_name in setup.cc.gates:
        if not gates_lib.supports(gate_name, s_val.shape[-1] - C):
            continue  # e.g. defer_output: only students trained with the defer objective have that output
        entry["gates"][gate_name] = _evaluate_gate(setup, student, gate_name)
    return student


def _print_student_summary(name: str, entry: dict) -> None:
    """One progress line per student: its test accuracy, and each gate's at 25% of the teacher's FLOPs."""
    print(
        f"[cascade] {name}: student {entry['test_accuracy']:.4f}; test accuracy at 25% of the teacher's "
        "FLOPs: "
        + ", ".join(
            f"{g} {e['at_cost_fraction']['0.25'].get('test_accuracy', float('nan')):.4f}"
            for g, e in entry["gates"].items()
        ),
        flush=True,
    )


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """One gate's offline sweep: per threshold, the validation and test curves and the amortized test costs."""

    rates: np.ndarray  # the validation deferral rate each threshold was chosen for
    thresholds: np.ndarray
    val_curve: dict
    test_curve: dict
    test_rate: np.ndarray  # the test deferral rate of each threshold
    flops: np.ndarray  # amortized FLOPs per test example of each threshold
    seconds: np.ndarray  # amortized seconds per test example of each threshold
    c_teacher: float

    def point(self, idx: int) -> dict:
        """The operating point at threshold `idx`, as written to cascade.json."""
        return {
            "threshold": float(self.thresholds[idx]),
            "val_deferral_rate": float(self.val_curve["deferral_rate"][idx]),
            "val_accuracy": float(self.val_curve["accuracy"][idx]),
            "test_deferral_rate": float(self.test_rate[idx]),
            "test_accuracy": float(self.test_curve["accuracy"][idx]),
            "amortized_flops": float(self.flops[idx]),
            "amortized_time_s": float(self.seconds[idx]),
            "flops_fraction_of_teacher": float(self.flops[idx] / self.c_teacher),
        }

    def curve(self) -> dict:
        """The whole curve as lists, for cascade.json and the plots."""
        return {
            "val_deferral_rate": np.asarray(self.val_curve["deferral_rate"]).tolist(),
            "test_deferral_rate": self.test_rate.tolist(),
            "test_accuracy": np.asarray(self.test_curve["accuracy"]).tolist(),
            "amortized_flops": np.asarray(self.flops).tolist(),
            "amortized_time_s": np.asarray(self.seconds).tolist(),
        }


def _evaluate_gate(setup: _Setup, student: _Student, gate_name: str) -> dict:
    """One gate of one student: its curves, its operating points, and the real runner at the target rates."""
    C, cc = setup.info.num_classes, setup.cc
    s_val, s_test, s_entry, t_entry = student.val_logits, student.test_logits, student.entry, setup.t_entry
    y_val, t_val = setup.val.labels, setup.val.teacher
    y_test, t_test = setup.test.labels, setup.test.teacher
    # Thresholds are chosen on validation examples the gate was not fitted on (see `_fit_gate`).
    score_fn, c_gate, sel = _fit_gate(gate_name, s_val, t_val, y_val, C)
    s_val, t_val, y_val = s_val[sel], t_val[sel], y_val[sel]
    batched = jax.jit(jax.vmap(score_fn))
    v_scores = np.asarray(batched(jnp.asarray(s_val)))
    x_scores = np.asarray(batched(jnp.asarray(s_test)))
    rates, thresholds = _thresholds(v_scores, cc.num_thresholds)
    s_test_pred = s_test[:, :C].argmax(-1)
    val_curve = curves_lib.sweep(v_scores, s_val[:, :C].argmax(-1), t_val.argmax(-1), y_val, thresholds, C)
    test_curve = curves_lib.sweep(x_scores, s_test_pred, t_test.argmax(-1), y_test, thresholds, C)
    sweep = _with_costs(rates, thresholds, val_curve, test_curve, c_gate=c_gate, s_entry=s_entry, t_entry=t_entry)
    return {
        "gate_flops_per_example": float(c_gate),
        "threshold_val_examples": int(len(sel)),
        "auroc_teacher_better_test": gates_lib.auroc(x_scores, gates_lib.deferral_targets(s_test, t_test, y_test)),
        "curve": sweep.curve(),
        "reach_teacher": _reach_teacher(sweep, t_entry["val_accuracy"]),
        "at_cost_fraction": _at_cost_fractions(sweep, s_entry["flops_per_example"], c_gate),
        # The real runner runs the teacher over the deferred test rows at every target rate: checked for
        # `cascade.runner_gates` only (default: every gate), which a costly teacher makes worth limiting.
        "at_deferral_rate": _runner_at_target_rates(
            setup, student, sweep, gate_name=gate_name, score_fn=score_fn, x_scores=x_scores
        )
        if gate_name in cc.runner_gates
        else {},
    }


def _fit_gate(gate_name, s_val, t_val, y_val, C):
    """The gate's score function, its FLOPs per example, and the validation indices to threshold it on.

    A fitted gate (`gates.FITTED_GATES`: the learned gate, fitted on the even-indexed validation examples)
    is thresholded on the examples it was not fitted on; a fixed gate (`gates.GATES`) has nothing to fit
    and is thresholded on the whole validation split.
    """
    if gate_name in gates_lib.FITTED_GATES:
        return gates_lib.FITTED_GATES[gate_name](s_val, t_val, y_val)
    score_fn = gates_lib.get_gate(gate_name, num_classes=C)
    return score_fn, gates_lib.gate_flops(score_fn, s_val.shape[-1]), np.arange(len(y_val))


def _thresholds(v_scores, num_thresholds: int):
    """`num_thresholds` validation deferral rates evenly spaced in [0, 1], and the score threshold of each."""
    rates = np.linspace(0.0, 1.0, num_thresholds)
    thresholds = np.array([curves_lib.threshold_for_rate(v_scores, r) for r in rates])
    # The ends of the curve are the student alone and the teacher alone, on any split.
    thresholds[0], thresholds[-1] = np.finfo(np.float32).max, np.finfo(np.float32).min
    return rates, thresholds


def _with_costs(rates, thresholds, val_curve, test_curve, *, c_gate, s_entry, t_entry) -> _Sweep:
    """The sweep with its amortized cost per test example, in FLOPs and in measured seconds."""
    c_student, c_teacher = s_entry["flops_per_example"], t_entry["flops_per_example"]
    t_student, t_teacher = s_entry["time_per_example_s"], t_entry["time_per_example_s"]
    test_rate = np.asarray(test_curve["deferral_rate"])
    flops = cost_lib.amortized_cost(c_student, c_gate, c_teacher, test_rate)
    seconds = cost_lib.amortized_cost(t_student, 0.0, t_teacher, test_rate)
    return _Sweep(rates, thresholds, val_curve, test_curve, test_rate, flops, seconds, c_teacher)


def _reach_teacher(sweep: _Sweep, teacher_val_accuracy: float) -> dict | None:
    """Cheapest validation-chosen threshold whose validation accuracy reaches the teacher's (None if none)."""
    val_acc = np.asarray(sweep.val_curve["accuracy"])
    reach = np.nonzero(val_acc >= teacher_val_accuracy)[0]
    return sweep.point(int(reach[0])) if len(reach) else None


def _at_cost_fractions(sweep: _Sweep, c_student: float, c_gate: float) -> dict:
    """The operating points at 25% and 50% of the teacher's FLOPs, keyed "0.25" and "0.5"."""
    out = {}
    for frac in (0.25, 0.5):
        # The largest validation deferral rate on the grid whose FLOPs stay within the budget.
        target_rate = (frac * sweep.c_teacher - c_student - c_gate) / sweep.c_teacher
        if target_rate < 0:
            out[str(frac)] = {
                "test_accuracy": float("nan"),
                "note": "student + gate alone cost more than this budget",
            }
        else:
            out[str(frac)] = sweep.point(int(np.searchsorted(sweep.rates, target_rate, side="right") - 1))
    return out


def _runner_at_target_rates(setup: _Setup, student: _Student, sweep: _Sweep, *, gate_name, score_fn, x_scores):
    """The operating points at `cc.target_deferral_rates`, each checked against the real cascade runner.

    One runner (compiled once) runs the test split at every rate, its threshold changed in place; its
    accuracy, deferral rate and time per example are added to the point, with the number of examples
    where it disagrees with the offline sweep (an AssertionError if more than float noise explains).
    """
    test_x, y_test, t_test = setup.test.images, setup.test.labels, setup.test.teacher
    s_test_pred = student.test_logits[:, : setup.info.num_classes].argmax(-1)
    batch_size = setup.batch_size
    runner = CascadeRunner([student.model, setup.teacher], [score_fn], [0.0], mesh=setup.mesh)
    runner.warmup(test_x[:batch_size])
    out = {}
    for r in setup.cc.target_deferral_rates:
        idx = int(np.argmin(np.abs(sweep.rates - r)))
        p = sweep.point(idx)
        p["per_class_test_deferral_rate"] = np.asarray(sweep.test_curve["per_class_deferral_rate"][idx]).tolist()
        runner.thresholds = [sweep.thresholds[idx]]
        preds, answered_by, sec = run_runner(runner, test_x, batch_size)
        want = np.where(x_scores > sweep.thresholds[idx], t_test.argmax(-1), s_test_pred)
        p.update(
            runner_test_accuracy=float(np.mean(preds == y_test)),
            runner_test_deferral_rate=float(np.mean(answered_by == 1)),
            runner_time_per_example_s=sec,
            # Logits recomputed in other batch shapes can differ in the last bits, which can move
            # an example sitting on the threshold; anything beyond a handful would be a bug.
            runner_disagreements_with_sweep=int(np.sum(preds != want)),
        )
        if p["runner_disagreements_with_sweep"] > max(3, 1e-3 * len(y_test)):
            raise AssertionError(
                f"cascade runner disagrees with the offline sweep on "
                f"{p['runner_disagreements_with_sweep']} test examples (gate {gate_name}, rate {r})"
            )
        out[str(r)] = p
    return out


def run_runner(runner: CascadeRunner, images, batch_size):
    """The runner over a whole split: predictions (N,), answering stage (N,), wall seconds per example."""
    preds, by = [], []
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        n = min(batch_size, len(images) - start)
        out = runner(runs.pad_batch(images[start : start + batch_size], batch_size))
        preds.append(np.asarray(out.predictions)[:n])
        by.append(out.answered_by[:n])
    elapsed = time.perf_counter() - t0
    return np.concatenate(preds), np.concatenate(by), elapsed / len(images)


def plot(out: dict, workdir: str) -> None:
    """cascade_accuracy_vs_deferral.png, cascade_accuracy_vs_flops.png, cascade_accuracy_vs_time.png."""
    t = out["teacher"]
    specs = [
        ("test_deferral_rate", "deferral rate (test)", "deferral", None),
        ("amortized_flops", "amortized FLOPs per example", "flops", t["flops_per_example"]),
        ("amortized_time_s", "amortized time per example (s, this machine)", "time", t["time_per_example_s"]),
    ]
    for key, xlabel, tag, teacher_x in specs:
        fig, ax = figures.subplots(figsize=(7, 4.5))
        for name, s in out["students"].items():
            for gate, g in s["gates"].items():
                if gate not in ("msp", "defer_output", "learned"):
                    continue
                ax.plot(g["curve"][key], g["curve"]["test_accuracy"], label=f"{name} / {gate}", lw=1.2)
        ax.axhline(t["test_accuracy"], color="k", ls="--", lw=0.8, label="teacher accuracy")
        if teacher_x is not None:
            ax.plot([teacher_x], [t["test_accuracy"]], "k*", ms=10)
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures.save_png(fig, paths.join(workdir, f"cascade_accuracy_vs_{tag}.png"), dpi=120)
