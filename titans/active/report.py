"""Aggregates active.json files over seeds: accuracy vs queries, mean ± sd, as Markdown and a plot.

    python -m titans.active.report --runs 'good=workdirs/active_fmnist/good/seed*' \
        --runs 'imperfect=workdirs/active_fmnist/imperfect/seed*' --plot active_fmnist.png

Each `--runs LABEL=GLOB` is one setting (e.g. one teacher); its runs must share budgets.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from titans import figures


def load(pattern: str) -> list[dict]:
    runs = []
    for d in sorted(glob.glob(pattern)):
        path = os.path.join(d, "active.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def aggregate(runs: list[dict]) -> dict:
    """{strategy: {"queries": [...], "mean": [...], "sd": [...], "n": seeds, "teacher_error_bought": mean}}"""
    if not runs:
        raise ValueError("No finished runs (active.json) to aggregate.")
    out = {}
    names = [s for s in runs[0]["strategies"] if all(s in r["strategies"] for r in runs)]
    for s in names:
        qs = runs[0]["strategies"][s]["queries"]
        for r in runs:
            if r["strategies"][s]["queries"] != qs:
                raise ValueError(
                    f"Runs of strategy {s} have different budgets: {qs} vs {r['strategies'][s]['queries']}."
                )
        acc = np.array([r["strategies"][s]["accuracy"] for r in runs], np.float64)
        terr = np.array(
            [[np.nan if x is None else x for x in r["strategies"][s]["teacher_error_bought"]] for r in runs]
        )
        out[s] = {
            "queries": qs,
            "mean": acc.mean(0).tolist(),
            "sd": acc.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(qs),
            "n": len(runs),
            "accuracy": acc.tolist(),
            "teacher_error_bought": np.nanmean(terr[:, -1]).item() if terr.shape[1] > 1 else None,
        }
    return out


def teacher_summary(runs: list[dict]) -> str:
    accs = [r["teacher"].get("test_accuracy") for r in runs if r.get("teacher")]
    accs = [a for a in accs if a is not None]
    if not accs:
        return "teacher test accuracy: unknown"
    return f"teacher test accuracy {100 * np.mean(accs):.1f}% (seeds: {', '.join(f'{100 * a:.1f}' for a in accs)})"


def markdown(label: str, runs: list[dict], agg: dict) -> str:
    any_s = next(iter(agg.values()))
    qs = any_s["queries"]
    lines = [
        f"**{label}** ({teacher_summary(runs)}; seeds {', '.join(str(r['seed']) for r in runs)}): "
        f"student test accuracy (%) after each round, mean ± sd over {any_s['n']} seeds",
        "",
        "| strategy | " + " | ".join(f"{q} queries" for q in qs) + " | teacher wrong on bought (final) |",
        "|---|" + "---|" * (len(qs) + 1),
    ]
    finals = {s: a["mean"][-1] for s, a in agg.items()}
    best = max(finals.values())
    for s, a in agg.items():
        cells = [f"{100 * m:.2f} ± {100 * sd:.2f}" for m, sd in zip(a["mean"], a["sd"])]
        if finals[s] == best:
            cells[-1] = f"**{cells[-1]}**"
        terr = "" if a["teacher_error_bought"] is None else f"{100 * a['teacher_error_bought']:.1f}%"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {terr} |")
    return "\n".join(lines)


def paired(agg: dict, a: str, b: str) -> str:
    """Per-budget mean and sd of the seed-paired difference a - b (percentage points)."""
    if a not in agg or b not in agg:
        return ""
    d = 100 * (np.array(agg[a]["accuracy"]) - np.array(agg[b]["accuracy"]))
    cells = [f"{m:+.2f} ± {s:.2f}" for m, s in zip(d.mean(0), d.std(0, ddof=1) if len(d) > 1 else np.zeros(d.shape[1]))]
    wins = (d[:, 1:] > 0).sum()
    return f"| {a} − {b} | " + " | ".join(cells) + f" | {wins}/{d[:, 1:].size} |"


def plot(settings: dict, path: str) -> None:
    fig, axes = figures.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, (label, (runs, agg)) in zip(axes[0], settings.items()):
        for s, a in agg.items():
            m, sd = np.array(a["mean"]), np.array(a["sd"])
            ax.errorbar(a["queries"], 100 * m, yerr=100 * sd, marker="o", capsize=3, label=s)
        ax.set_title(f"{label}: {teacher_summary(runs)}", fontsize=9)
        ax.set_xlabel("teacher queries")
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", action="append", required=True, help="LABEL=GLOB of run workdirs")
    ap.add_argument("--plot", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    settings = {}
    for spec in args.runs:
        label, _, pattern = spec.partition("=")
        runs = load(pattern)
        settings[label] = (runs, aggregate(runs))
    for label, (runs, agg) in settings.items():
        print(markdown(label, runs, agg))
        print()
        qs = next(iter(agg.values()))["queries"]
        print("Seed-paired differences (percentage points, mean ± sd over seeds; last column: budgets×seeds won):")
        print()
        print("| pair | " + " | ".join(f"{q}" for q in qs) + " | wins |")
        print("|---|" + "---|" * (len(qs) + 1))
        for other in ("margin", "random", "entropy", "kcenter"):
            row = paired(agg, "robust", other)
            if row:
                print(row)
        print()
    if args.plot:
        plot(settings, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v[1] for k, v in settings.items()}, f, indent=2)


if __name__ == "__main__":
    main()
