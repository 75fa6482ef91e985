"""Analysis of one finished run: evaluation on a split, plots, per-example hardness, and an HTML report.

Writes WORKDIR/analysis/ (or ``out``): ``metrics.json``, ``examples.csv`` (per test example: label,
the model's prediction, confidence and correctness, and for a student the teacher's), PNGs (learning
curves, reliability diagram, confusion matrix, per-class accuracy, agreement with the teacher by
class, the hardest examples) and ``report.html`` with everything embedded.
A pipeline directory (stages in sub-directories) is analysed stage by stage, plus a page for the
pipeline itself with the sections methods registered (e.g. the cascade curves).
"""

from __future__ import annotations

import csv
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from titans import data as data_lib
from titans import losses, parallel, paths, runs
from titans.analyze import html, plots
from titans.analyze.errors import AnalysisError
from titans.analyze.sections import SECTIONS
from titans.runs import write_text


def is_run(workdir: str) -> bool:
    return runs.RunDir(workdir).exists


def is_pipeline(workdir: str) -> bool:
    return paths.exists(paths.join(workdir, "summary.json")) and not is_run(workdir)


def analyze_path(
    workdir: str, *, split: str | None = None, step: int = -1, hardest: int = 32, batch_size: int = 500
) -> list[dict]:
    """Analyses a run, or every stage of a pipeline plus the pipeline page; returns the metrics dicts."""
    workdir = paths.text(workdir)  # a local path made absolute; a URL (gs://...) kept as it is
    if is_run(workdir):
        return [analyze_run(workdir, split=split, step=step, hardest=hardest, batch_size=batch_size)]
    if is_pipeline(workdir):
        stages = [d for d in sorted(p.name for p in paths.resolve(workdir).iterdir()) if is_run(paths.join(workdir, d))]
        out = [
            analyze_run(paths.join(workdir, d), split=split, step=step, hardest=hardest, batch_size=batch_size)
            for d in stages
        ]
        _pipeline_page(workdir, out)
        return out
    raise AnalysisError(
        f"{workdir} is not a Titans run (no config.json) nor a pipeline (no summary.json with "
        "stage directories); point at a directory that `python -m titans.main` wrote."
    )


def evaluate_logits(logits, labels, num_classes: int, ece_bins: int = 15) -> dict:
    """Accuracy, loss, ECE, reliability bins, confusion matrix and per-class accuracy of logits (N, >=C)."""
    head = jnp.asarray(logits[:, :num_classes], jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    pred = np.asarray(jnp.argmax(head, -1))
    bins = np.asarray(losses.calibration_bins(head, y, jnp.ones(len(labels), bool), ece_bins))
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (np.asarray(labels), pred), 1)
    per_class = conf.diagonal() / np.maximum(conf.sum(1), 1)
    count, conf_sum, correct_sum = bins
    return {
        "num_examples": int(len(labels)),
        "accuracy": float(np.mean(pred == np.asarray(labels))),
        "loss": float(np.mean(np.asarray(losses.cross_entropy(head, y)))),
        "ece": losses.expected_calibration_error(bins),
        "reliability": {
            "count": count.tolist(),
            "confidence": (conf_sum / np.maximum(count, 1)).tolist(),
            "accuracy": (correct_sum / np.maximum(count, 1)).tolist(),
        },
        "confusion": conf.tolist(),
        "per_class_accuracy": per_class.tolist(),
    }


def analyze_run(
    workdir: str,
    *,
    split: str | None = None,
    step: int = -1,
    hardest: int = 32,
    batch_size: int = 500,
    out: str | None = None,
) -> dict:
    """Evaluates one run's checkpoint on `split` (default: the run's eval split) and writes its analysis."""
    workdir = paths.text(workdir)
    if not is_run(workdir):
        raise AnalysisError(
            f"{workdir} is not a Titans run: no config.json (expected the workdir of a `python -m titans.main` run)."
        )
    if jax.process_count() > 1:
        raise AnalysisError("the analysis runs in a single process")
    model, cfg, info, used_step = runs.load_model(workdir, step=step)
    split = split or cfg.dataset.eval_split
    src = _read_split(info, split, cfg.dataset.data_dir or None)
    images, labels = runs.split_arrays(src, info)
    mesh = parallel.make_mesh()
    C = info.num_classes
    logits = runs.predict(
        runs.logits_fn, model, images, mesh=mesh, batch_size=batch_size, progress=f"[analyze] {cfg.name} on {split}"
    )
    metrics = {
        "workdir": workdir,
        "name": cfg.name,
        "model": cfg.model.name,
        "dataset": info.name,
        "split": split,
        "step": used_step,
        **evaluate_logits(logits, labels, C, cfg.get("ece_bins", 15)),
    }
    teacher_logits = None
    if cfg.distill.teacher_workdir:
        teacher_logits, metrics["teacher"] = _teacher_metrics(
            cfg.distill.teacher_workdir, info, images, labels, logits, mesh, batch_size
        )

    out = out or paths.join(workdir, "analysis")
    _write_analysis(out, workdir, metrics, images, labels, logits, teacher_logits, hardest, info)
    print(f"[analyze] {cfg.name}: accuracy {metrics['accuracy']:.4f} on {split} -> {out}/report.html", flush=True)
    return metrics


def _read_split(info, split: str, data_dir: str | None):
    """The data source of `split`; an AnalysisError naming the dataset's splits if it cannot be read or is empty."""
    try:
        src = data_lib.get_source(info.name, split, data_dir=data_dir)
        if len(src) == 0:
            raise ValueError("the split is empty")
    except data_lib.DatasetNotFoundError:
        raise
    except Exception as e:  # TFDS raises several types for a bad split name
        known = ", ".join(info.splits)
        raise AnalysisError(
            f"split {split!r} of {info.name} cannot be read ({type(e).__name__}: {e}); "
            f"its splits are {known} (slices like 'train[90%:]' work too)"
        ) from None
    return src


def _teacher_metrics(teacher_workdir: str, info, images, labels, logits, mesh, batch_size: int):
    """A student's teacher on the same examples: its logits, and the `teacher` entry of metrics.json.

    The entry holds the teacher's accuracy, loss, ECE and per-class accuracy, and how often the
    student's prediction agrees with the teacher's, overall and by true class.
    """
    C = info.num_classes
    teacher, _ = runs.load_teacher(teacher_workdir, info, dtype=jnp.float32)
    teacher_logits = runs.predict(
        runs.logits_fn, teacher, images, mesh=mesh, batch_size=batch_size, progress="[analyze] teacher"
    )
    t_pred, s_pred = teacher_logits.argmax(-1), logits[:, :C].argmax(-1)
    agree = t_pred == s_pred
    entry = {
        "workdir": teacher_workdir,
        **{
            k: v
            for k, v in evaluate_logits(teacher_logits, labels, C).items()
            if k in ("accuracy", "loss", "ece", "per_class_accuracy")
        },
        "agreement": float(agree.mean()),
        "agreement_by_class": [
            float(agree[labels == c].mean()) if np.any(labels == c) else float("nan") for c in range(C)
        ],
    }
    return teacher_logits, entry


def _write_analysis(out, workdir, metrics, images, labels, logits, teacher_logits, hardest, info) -> None:
    """Writes the analysis into `out`: examples.csv, the PNGs, metrics.json and report.html."""
    paths.makedirs(out)
    examples = _examples(logits, teacher_logits, labels, info.num_classes)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(examples[0]))
    writer.writeheader()
    writer.writerows(examples)
    write_text(paths.join(out, "examples.csv"), table.getvalue())
    pngs = plots.run_plots(workdir, out, metrics, images, labels, examples, hardest, info)
    write_text(paths.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    sections = _sections(workdir)
    html.write_report(paths.join(out, "report.html"), _title(metrics), _summary_rows(metrics), pngs, sections)


def _examples(logits, teacher_logits, labels, C) -> list[dict]:
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits[:, :C])))
    pred = p.argmax(-1)
    rows = []
    # msp gate at a 30% deferral rate on this split: which examples a cascade would send to the teacher.
    score = 1.0 - p.max(-1)
    cut = np.quantile(score, 0.7)
    tp = np.asarray(jax.nn.softmax(jnp.asarray(teacher_logits))) if teacher_logits is not None else None
    for i in range(len(labels)):
        row = {
            "index": i,
            "label": int(labels[i]),
            "pred": int(pred[i]),
            "confidence": float(p[i].max()),
            "p_label": float(p[i, labels[i]]),
            "correct": int(pred[i] == labels[i]),
            "msp_score": float(score[i]),
            "deferred_at_30pct": int(score[i] > cut),
        }
        if tp is not None:
            row.update(
                teacher_pred=int(tp[i].argmax()),
                teacher_confidence=float(tp[i].max()),
                teacher_correct=int(tp[i].argmax() == labels[i]),
            )
        rows.append(row)
    return rows


def _sections(workdir):
    out = []
    for name, fn in SECTIONS.items():
        try:
            items = fn(workdir)
        except Exception as e:  # a broken plug-in must not take the report down
            items = [{"title": f"section {name!r} failed", "text": f"{type(e).__name__}: {e}"}]
        if items:
            out.append((name, items))
    return out


def _title(m):
    return f"Titans analysis: {m['name']} ({m['model']} on {m['dataset']}, {m['split']}, step {m['step']})"


def _summary_rows(m):
    rows = [
        ["metric", "value"],
        ["examples", str(m["num_examples"])],
        ["accuracy", f"{m['accuracy']:.4f}"],
        ["loss", f"{m['loss']:.4f}"],
        ["ECE", f"{m['ece']:.4f}"],
    ]
    if "teacher" in m:
        rows += [
            ["teacher accuracy", f"{m['teacher']['accuracy']:.4f}"],
            ["agreement with the teacher", f"{m['teacher']['agreement']:.4f}"],
        ]
    r = runs.read_json(paths.join(m["workdir"], "results.json"))
    if r is not None:
        for key in ("flops_per_example", "param_count", "train_time_s"):
            if key in r:
                rows.append([key, f"{r[key]:,.0f}" if key != "train_time_s" else f"{r[key]:.0f} s"])
    return rows


def _pipeline_page(workdir, stage_metrics):
    out = paths.join(workdir, "analysis")
    paths.makedirs(out)
    rows = [["stage", "model", "accuracy", "ECE", "agreement with teacher", "report"]]
    for m in stage_metrics:  # a stage's page relative to this one (string arithmetic: URLs alike)
        rel = os.path.relpath(paths.join(m["workdir"], "analysis", "report.html"), out)
        rows.append(
            [
                m["name"],
                m["model"],
                f"{m['accuracy']:.4f}",
                f"{m['ece']:.4f}",
                f"{m['teacher']['agreement']:.4f}" if "teacher" in m else "-",
                rel,
            ]
        )
    write_text(paths.join(out, "metrics.json"), json.dumps({"stages": stage_metrics}, indent=1))
    html.write_report(
        paths.join(out, "report.html"), f"Titans analysis: pipeline {workdir}", rows, [], _sections(workdir)
    )
