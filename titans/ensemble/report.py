"""Aggregates B-DISTIL runs (one ensemble.json per seed) into Markdown: mean ± sd over seeds.

python -m titans.ensemble.report workdirs/bdistil_fmnist/seed0 workdirs/bdistil_fmnist/seed1 ... > report.md
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ORDER = ("bdistil", "bdistil_noconn", "resched", "no_resched")
LABEL = {
    "bdistil": "B-DISTIL (connected)",
    "bdistil_noconn": "B-DISTIL, no connection",
    "resched": "resched (independent members, weighted average)",
    "no_resched": "no-resched (one student)",
}


def _ms(values, fmt="{:.4f}") -> str:
    v = np.asarray(values, np.float64)
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.replace('+', '').format(v.std(ddof=1))}"


def load(workdirs: list[str]) -> list[dict]:
    out = []
    for d in workdirs:
        path = os.path.join(d, "ensemble.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{d} has no ensemble.json (the run has not finished)")
        with open(path) as f:
            out.append(json.load(f))
    return out


def members_table(runs: list[dict]) -> str:
    t_flops = np.mean([r["teacher"]["flops_per_example"] for r in runs])
    rows = [
        "| variant | members | test accuracy | cumulative MFLOPs/example | × teacher FLOPs | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        per_seed = [
            r["variants"][name]
            for r in runs
            if name in r["variants"] and r["variants"][name].get("accuracy_by_members")
        ]
        if not per_seed:
            continue
        depth = max(len(v["accuracy_by_members"]) for v in per_seed)
        for w in range(depth):
            have = [v for v in per_seed if len(v["accuracy_by_members"]) > w]
            acc = [v["accuracy_by_members"][w] for v in have]
            flops = [v["cumulative_flops"][w] for v in have]
            rows.append(
                f"| {LABEL[name]} | {w + 1} | {_ms(acc)} | {_ms(np.divide(flops, 1e6), '{:.3f}')} | "
                f"{np.mean(flops) / t_flops:.3f} | {len(have)} |"
            )
    return "\n".join(rows)


def anytime_table(runs: list[dict], name: str = "bdistil", thresholds=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99)) -> str:
    rows = [
        "| confidence threshold | test accuracy | mean members evaluated | mean MFLOPs/example |",
        "|---|---|---|---|",
    ]
    for thr in thresholds:
        acc, mem, cost = [], [], []
        for r in runs:
            v = r["variants"].get(name, {})
            curve = v.get("anytime", {}).get("budget_1")
            if not curve:
                continue
            i = int(np.argmin(np.abs(np.asarray(curve["thresholds"]) - thr)))
            acc.append(curve["accuracy"][i])
            mem.append(curve["mean_members"][i])
            cost.append(curve["mean_cost"][i] / 1e6)
        if acc:
            rows.append(f"| {thr} | {_ms(acc)} | {_ms(mem, '{:.2f}')} | {_ms(cost, '{:.3f}')} |")
    return "\n".join(rows)


def equal_cost_table(runs: list[dict], a: str = "bdistil", b: str = "resched") -> str:
    """Per member count w that both variants reached: accuracy difference a - b, and their FLOPs."""
    rows = [f"| members | {a} - {b} accuracy (points) | seeds | {a} MFLOPs | {b} MFLOPs |", "|---|---|---|---|---|"]
    depth = max((len(r["variants"].get(a, {}).get("accuracy_by_members", [])) for r in runs), default=0)
    for w in range(depth):
        diff, fa, fb = [], [], []
        for r in runs:
            va, vb = r["variants"].get(a, {}), r["variants"].get(b, {})
            if len(va.get("accuracy_by_members", [])) > w and len(vb.get("accuracy_by_members", [])) > w:
                diff.append(100 * (va["accuracy_by_members"][w] - vb["accuracy_by_members"][w]))
                fa.append(va["cumulative_flops"][w] / 1e6)
                fb.append(vb["cumulative_flops"][w] / 1e6)
        if diff:
            rows.append(f"| {w + 1} | {_ms(diff, '{:+.2f}')} | {len(diff)} | {np.mean(fa):.3f} | {np.mean(fb):.3f} |")
    return "\n".join(rows)


def teacher_line(runs: list[dict]) -> str:
    acc = [r["teacher"]["accuracy"] for r in runs]
    flops = runs[0]["teacher"]["flops_per_example"]
    return f"Teacher: test accuracy {_ms(acc)}, {flops / 1e6:.3f} MFLOPs/example."


def find_wl_lines(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        for name in ("bdistil", "bdistil_noconn"):
            v = r["variants"].get(name)
            if not v:
                continue
            steps = ", ".join(
                f"r{e['round']} {e['candidate']} edge {e['edge']:.4f} "
                f"{'accepted' if e['accepted'] else 'rejected'} (F test acc {e['test_accuracy']:.4f})"
                for e in v["log"]
            )
            stop = f"; stopped: {v['stopped']}" if v.get("stopped") else ""
            lines.append(f"- seed {r['seed']}, {name}: {steps}{stop}")
    return "\n".join(lines)


def main(argv=None) -> None:
    dirs = argv if argv is not None else sys.argv[1:]
    if not dirs:
        raise SystemExit(__doc__)
    runs = load(dirs)
    print(teacher_line(runs) + "\n")
    print(members_table(runs) + "\n")
    print("B-DISTIL (connected) against resched with the same number of members (same member sizes):\n")
    print(equal_cost_table(runs) + "\n")
    print("Anytime inference, B-DISTIL (connected), no budget cap:\n")
    print(anytime_table(runs) + "\n")
    print("FIND-WL:\n")
    print(find_wl_lines(runs))


if __name__ == "__main__":
    main()
