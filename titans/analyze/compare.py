"""Several runs as one table: grouped by the config fields that differ (seeds pooled), mean ± sd, CSV, curves."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from titans import figures, paths, runs
from titans.analyze import plots
from titans.analyze.errors import AnalysisError
from titans.runs import write_text

# Fields that differ between seeds of one setting without defining a different setting.
IGNORED = ("seed", "name", "dataset.data_dir", "distill.teacher_workdir")
METRICS = ("accuracy", "loss", "ece", "teacher_agreement")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


def _load(workdir):
    if not runs.RunDir(workdir).exists:
        raise AnalysisError(f"{workdir} is not a Titans run (no config.json)")
    config = runs.read_json(paths.join(workdir, "config.json"))
    results = {}
    for name in ("results.json", "analysis/metrics.json"):
        r = runs.read_json(paths.join(workdir, name))
        if r is not None:
            results.update({k: v for k, v in r.items() if k in METRICS})
            if "teacher" in r and isinstance(r["teacher"], dict) and "agreement" in r["teacher"]:
                results["teacher_agreement"] = r["teacher"]["agreement"]
    if not results:
        raise AnalysisError(f"{workdir} has no results.json: the run has not finished")
    return config, results


def compare_runs(workdirs: list[str], out: str) -> dict:
    """Writes OUT/comparison.md, OUT/runs.csv, OUT/groups.csv and OUT/curves.png; returns the groups."""
    runs = [(paths.text(w), *_load(w)) for w in workdirs]
    flats = [_flat(c) for _, c, _ in runs]
    keys = sorted(set().union(*flats))
    differing = [k for k in keys if k not in IGNORED and len({f.get(k) for f in flats}) > 1]
    groups: dict[tuple, list] = {}
    for (w, _, res), flat in zip(runs, flats):
        key = tuple((k, flat.get(k)) for k in differing)
        groups.setdefault(key, []).append((w, res))
    metrics = [m for m in METRICS if any(m in r for _, _, r in runs)]
    rows = []
    for key, members in groups.items():
        row = {
            "setting": ", ".join(f"{k}={json.loads(v) if v else v}" for k, v in key) or "(all runs alike)",
            "runs": len(members),
            "workdirs": [w for w, _ in members],
        }
        for m in metrics:
            vals = np.array([r[m] for _, r in members if m in r], float)
            if len(vals):
                row[m] = {
                    "mean": float(vals.mean()),
                    "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "n": int(len(vals)),
                }
        rows.append(row)
    paths.makedirs(out)
    lines = [
        f"Compared {len(runs)} runs; fields that differ: {', '.join(differing) or 'none'} "
        f"(seeds pooled; ignored: {', '.join(IGNORED)}).",
        "",
        "| setting | runs | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for row in rows:
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['sd']:.4f}" if m in row else "-" for m in metrics]
        lines.append(f"| {row['setting']} | {row['runs']} | " + " | ".join(cells) + " |")
    write_text(paths.join(out, "comparison.md"), "\n".join(lines) + "\n")
    write_text(
        paths.join(out, "runs.csv"),
        _csv(
            ["workdir", *differing, *metrics],
            [
                [wd, *(flat.get(k, "") for k in differing), *(res.get(m, "") for m in metrics)]
                for (wd, _, res), flat in zip(runs, flats)
            ],
        ),
    )
    write_text(
        paths.join(out, "groups.csv"),
        _csv(
            ["setting", "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd"))],
            [
                [row["setting"], row["runs"], *(row[m][s] if m in row else "" for m in metrics for s in ("mean", "sd"))]
                for row in rows
            ],
        ),
    )
    _overlay(rows, paths.join(out, "curves.png"))
    return {"differing": differing, "groups": rows, "markdown": "\n".join(lines)}


def _csv(header: list, rows: list) -> str:
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(header)
    w.writerows(rows)
    return table.getvalue()


def _overlay(rows, path):
    fig, ax = figures.subplots(figsize=(6.5, 4))
    colors = figures.color_cycle()
    for i, row in enumerate(rows):
        for j, w in enumerate(row["workdirs"]):
            pts = [(r["step"], r["train/loss"]) for r in plots.read_metrics_jsonl(w) if "train/loss" in r]
            if pts:
                ax.plot(
                    *zip(*pts),
                    color=colors[i % len(colors)],
                    lw=1,
                    alpha=0.8,
                    label=row["setting"][:60] if j == 0 else None,
                )
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_png(fig, path)
