"""Aggregates cascade.json files of several seeds into a Markdown report with mean and spread.

    python -m titans.cascade.report workdirs/titans_fmnist/seed0 workdirs/titans_fmnist/seed1 \
        workdirs/titans_fmnist/seed2 --out=docs/results/titans_fmnist.md --plots=docs/results

Each number is the mean ± standard deviation (ddof=1) over the seeds, from the test split, at
operating points chosen on the validation split only.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np

from titans import figures


def _ms(values, fmt="{:.4f}") -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "n/a"
    spread = v.std(ddof=1) if len(v) > 1 else 0.0
    out = f"{fmt.format(v.mean())} ± {fmt.replace('+', '').format(spread)}"
    return out if len(v) == len(values) else f"{out} ({len(v)}/{len(values)} seeds)"


def load(workdirs: list[str]) -> list[dict]:
    runs = []
    for w in workdirs:
        path = os.path.join(w, "cascade.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run the cascade config in {w} first.")
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def table(runs: list[dict]) -> str:
    t = [r["teacher"] for r in runs]
    lines = [
        f"Teacher: test accuracy {_ms([x['test_accuracy'] for x in t])}, "
        f"{np.mean([x['flops_per_example'] for x in t]) / 1e6:.3f} MFLOPs/example, "
        f"{np.mean([x['time_per_example_s'] for x in t]) * 1e6:.1f} µs/example (this machine). Seeds: {len(runs)}.",
        "",
        "| student | objective | gate | MFLOPs (student) | student alone | acc @ 25% teacher FLOPs | "
        "acc @ 50% teacher FLOPs | FLOPs to reach teacher (val-chosen), % of teacher | test acc there | reached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(runs[0]["students"])
    for name in names:
        students = [r["students"][name] for r in runs]
        for gate in students[0]["gates"]:
            g = [s["gates"][gate] for s in students]
            reach = [x["reach_teacher"] for x in g]
            lines.append(
                f"| {name} | {students[0]['objective']} | {gate} | {students[0]['flops_per_example'] / 1e6:.3f} | "
                f"{_ms([s['test_accuracy'] for s in students])} | "
                f"{_ms([x['at_cost_fraction']['0.25']['test_accuracy'] for x in g])} | "
                f"{_ms([x['at_cost_fraction']['0.5']['test_accuracy'] for x in g])} | "
                f"{_ms([100 * p['flops_fraction_of_teacher'] if p else None for p in reach], '{:.1f}')} | "
                f"{_ms([p['test_accuracy'] if p else None for p in reach])} | "
                f"{sum(p is not None for p in reach)}/{len(reach)} |"
            )
    return "\n".join(lines)


def deferral_table(runs: list[dict], rate: str = "0.3") -> str:
    """Test accuracy at validation-chosen deferral rates, and the runner's agreement with the sweep."""
    rates = list(next(iter(runs[0]["students"].values()))["gates"]["msp"]["at_deferral_rate"])
    head = "| student | gate | " + " | ".join(f"acc @ r={r}" for r in rates) + " |"
    lines = [head, "|---|---|" + "---|" * len(rates)]
    for name in runs[0]["students"]:
        for gate in runs[0]["students"][name]["gates"]:
            cells = [
                _ms([r["students"][name]["gates"][gate]["at_deferral_rate"][k]["test_accuracy"] for r in runs])
                for k in rates
            ]
            lines.append(f"| {name} | {gate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _acc_on_cost_grid(gate_entry: dict, c_teacher: float, grid: np.ndarray) -> np.ndarray:
    """Test accuracy of one curve interpolated at amortized-FLOPs fractions `grid` of the teacher's."""
    c = gate_entry["curve"]
    frac = np.asarray(c["amortized_flops"]) / c_teacher
    order = np.argsort(frac, kind="stable")
    return np.interp(grid, frac[order], np.asarray(c["test_accuracy"])[order], left=np.nan, right=np.nan)


def comparison_table(
    runs: list[dict], baseline: str = "standard", gate: str = "msp", cost_range: tuple[float, float] = (0.1, 0.6)
) -> str:
    """Each objective minus standard KD at equal cost, paired by seed (same teacher, same gate).

    Columns: the difference of test accuracy at 25% and at 50% of the teacher's FLOPs (operating
    points chosen on validation), the mean difference of the test accuracy/FLOPs curves over
    `cost_range` (fractions of the teacher's FLOPs), and the difference of the FLOPs needed to reach
    the teacher's accuracy (negative = cheaper). Mean ± sd over seeds, and how many seeds were better.
    """
    grid = np.linspace(*cost_range, 51)
    names = list(runs[0]["students"])
    sizes = list(dict.fromkeys(n.split("_", 1)[0] for n in names))
    lines = [
        f"| size | objective (gate) | Δ acc @ 25% | Δ acc @ 50% | mean Δ acc over {cost_range[0]:.0%}-"
        f"{cost_range[1]:.0%} of teacher FLOPs | seeds better (curve) | Δ FLOPs to reach teacher, % of teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        base = f"{size}_{baseline}"
        if base not in runs[0]["students"]:
            continue
        for name in names:
            if not name.startswith(size + "_") or name == base:
                continue
            gates = [gate] + (["defer_output"] if "defer_output" in runs[0]["students"][name]["gates"] else [])
            for g in gates:
                d25, d50, dcurve, dreach = [], [], [], []
                for r in runs:
                    b, o = r["students"][base]["gates"][gate], r["students"][name]["gates"][g]
                    ct = r["teacher"]["flops_per_example"]
                    for frac, acc in (("0.25", d25), ("0.5", d50)):
                        acc.append(
                            o["at_cost_fraction"][frac]["test_accuracy"] - b["at_cost_fraction"][frac]["test_accuracy"]
                        )
                    dcurve.append(float(np.nanmean(_acc_on_cost_grid(o, ct, grid) - _acc_on_cost_grid(b, ct, grid))))
                    if o["reach_teacher"] and b["reach_teacher"]:
                        dreach.append(
                            100
                            * (
                                o["reach_teacher"]["flops_fraction_of_teacher"]
                                - b["reach_teacher"]["flops_fraction_of_teacher"]
                            )
                        )
                    else:
                        dreach.append(None)
                better = sum(d > 0 for d in dcurve)
                lines.append(
                    f"| {size} | {name.split('_', 1)[1]} ({g}) | {_ms(d25, '{:+.4f}')} | "
                    f"{_ms(d50, '{:+.4f}')} | {_ms(dcurve, '{:+.4f}')} | {better}/{len(runs)} | "
                    f"{_ms(dreach, '{:+.1f}')} |"
                )
    return "\n".join(lines)


def plot_mean_curves(runs: list[dict], out_dir: str, prefix: str = "titans_fmnist") -> list[str]:
    """Accuracy vs amortized FLOPs (msp gate; defer students also with their defer gate), averaged over
    seeds on a common FLOPs grid, one panel per student size."""
    c_t = np.mean([r["teacher"]["flops_per_example"] for r in runs])
    acc_t = np.mean([r["teacher"]["test_accuracy"] for r in runs])
    sizes = list(dict.fromkeys(n.split("_")[0] for n in runs[0]["students"]))
    fig, axes = figures.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for name in [n for n in runs[0]["students"] if n.startswith(size + "_")]:
            for gate in ("msp", "defer_output"):
                if gate not in runs[0]["students"][name]["gates"]:
                    continue
                grid = np.linspace(0, 1.0, 101)
                curves = []
                for r in runs:
                    c = r["students"][name]["gates"][gate]["curve"]
                    frac = np.asarray(c["amortized_flops"]) / c_t
                    order = np.argsort(frac)
                    curves.append(
                        np.interp(grid, frac[order], np.asarray(c["test_accuracy"])[order], left=np.nan, right=np.nan)
                    )
                curves = np.array(curves)
                with warnings.catch_warnings():  # grid points below a student's own cost are NaN for every seed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(curves, 0)
                    std = np.nanstd(curves, 0, ddof=1) if len(runs) > 1 else 0 * grid
                ax.plot(grid, mean, label=f"{name} / {gate}", lw=1.3)
                ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
        ax.axhline(acc_t, color="k", ls="--", lw=0.8, label="teacher")
        ax.set_xlabel("amortized FLOPs / teacher FLOPs")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{size} students (mean ± sd over {len(runs)} seeds)")
        ax.set_ylim(max(0.8, ax.get_ylim()[0]), None)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_accuracy_vs_flops.png")
    fig.savefig(path, dpi=120)
    return [path]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default="")
    p.add_argument("--plots", default="")
    a = p.parse_args(argv)
    runs = load(a.workdirs)
    text = (
        table(runs) + "\n\n" + deferral_table(runs) + "\n\nEach objective against standard KD (msp gate), "
        "paired by seed:\n\n" + comparison_table(runs)
    )
    if a.plots:
        os.makedirs(a.plots, exist_ok=True)
        plot_mean_curves(runs, a.plots)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
