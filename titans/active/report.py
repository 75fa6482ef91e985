"""Aggregates active.json files over seeds: accuracy vs queries, mean ± sd, as Markdown and a plot.

    python -m titans.active.report --runs 'good=workdirs/active_fmnist/good/seed*' \
        --runs 'imperfect=workdirs/active_fmnist/imperfect/seed*' --plot active_fmnist.png

Each `--runs LABEL=GLOB` is one setting (e.g. one teacher); its runs must share budgets.
"""

from __future__ import annotations

import glob
import json

import numpy as np

from titans import cli, figures, paths
from titans.stats import bootstrap_difference, claim_verdict, claims_table, mean_sd, paired_difference, unpack_bits


def load(pattern: str) -> list[dict]:
    """The active.json of every run directory matching `pattern` (a local glob, or a URL whose last part
    may hold wildcards, e.g. gs://bucket/active/seed*), in name order; unfinished runs are skipped."""
    runs = []
    for d in _matching_dirs(pattern):
        run = read_json(paths.join(d, "active.json"))
        if run is not None:
            runs.append(run)
    return runs


def _matching_dirs(pattern: str) -> list[str]:
    if not paths.is_remote(pattern):
        return sorted(glob.glob(pattern))
    scheme, _, rest = pattern.rstrip("/").partition("://")
    parts = rest.split("/")  # parts[0] is the bucket, taken literally
    first = next((i for i in range(1, len(parts)) if any(c in parts[i] for c in "*?[")), len(parts))
    base = f"{scheme}://" + "/".join(parts[:first])
    if first == len(parts):
        return [base] if paths.exists(base) else []
    return sorted(str(p) for p in paths.resolve(base).glob("/".join(parts[first:])))


def read_json(path: str):
    text = paths.read_text(path)
    return None if text is None else json.loads(text)


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
        n_test = None if not runs[0].get("test_rows") else int(runs[0]["test_rows"])
        packed = [r["strategies"][s].get("test_correct") for r in runs]
        correct = None
        if n_test and all(packed):
            correct = [[None if b is None else unpack_bits(b, n_test) for b in p] for p in packed]
        out[s] = {
            "test_correct": correct,
            "queries": qs,
            "mean": acc.mean(0).tolist(),
            "sd": acc.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(qs),
            "n": len(runs),
            "accuracy": acc.tolist(),
            "teacher_error_bought": np.nanmean(terr[:, -1]).item() if terr.shape[1] > 1 else None,
        }
    return out


def teacher_summary(runs: list[dict]) -> str:
    """The teachers' accuracy as their runs measured it: on the test split, or on the split named (a teacher
    evaluated on validation has no test accuracy of its own)."""
    teachers = [r["teacher"] for r in runs if r.get("teacher")]
    accs = [t.get("test_accuracy") for t in teachers]
    where = "test"
    if not teachers or any(a is None for a in accs):
        accs = [t.get("accuracy") for t in teachers]
        splits = {t.get("accuracy_split") for t in teachers}
        if not teachers or any(a is None for a in accs) or len(splits) != 1 or None in splits:
            return "teacher test accuracy: unknown"
        where = splits.pop()
    return f"teacher {where} accuracy {100 * np.mean(accs):.1f}% (seeds: {', '.join(f'{100 * a:.1f}' for a in accs)})"


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


def paired_table(agg: dict, pairs: list[tuple[str, str]], other: dict | None = None) -> str:
    """Seed-paired differences a - b (percentage points) per budget, with 95% intervals (`_difference`: test rows
    resampled where stored) and the verdict at the largest budget. `b` is looked up in `other` (another
    setting's aggregate) when given."""
    other = agg if other is None else other
    rows = [(a, b) for a, b in pairs if a in agg and b in other]
    if not rows:
        return ""
    qs = agg[rows[0][0]]["queries"]
    lines = [
        "| pair | " + " | ".join(f"{q} queries" for q in qs[1:]) + f" | verdict @ {qs[-1]} |",
        "|---|" + "---|" * len(qs),
    ]
    for a, b in rows:
        diffs = [_difference(agg[a], other[b], j) for j in range(1, len(qs))]
        lines.append(f"| {a} − {b} | " + " | ".join(d.format("{:+.2f}") for d in diffs) + f" | {diffs[-1].verdict} |")
    return "\n".join(lines)


def selection_table(runs: list[dict], strategy: str = "robust") -> str:
    """The robust selection's statistics per round (mean over seeds): m, the support of the game's
    distribution, its largest inclusion probability, the overlap with margin's top-b."""
    if not runs or strategy not in runs[0]["strategies"]:
        return ""
    s0 = runs[0]["strategies"][strategy]
    if "support" not in s0:
        return ""
    keys = ("m", "support", "max_p", "overlap_margin")
    lines = ["| round | queries | m | support | max p | shared with margin's top-b |", "|---|---|---|---|---|---|"]
    for rnd in range(1, len(s0["queries"])):
        cells = [mean_sd([r["strategies"][strategy][k][rnd] for r in runs], "{:.2f}") for k in keys]
        lines.append(f"| {rnd} | {s0['queries'][rnd]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_rounds(num_rounds: int) -> list[int]:
    """The rounds at which claims are tested: the first, the middle and the last (an exhausted pool makes
    every strategy buy the same points at the end, so the last round alone would hide the differences)."""
    return sorted({1, max(1, num_rounds // 2), num_rounds})


def _difference(a: dict, b: dict, i: int):
    """Strategy a - strategy b after round i, percentage points, paired by seed; widened by a bootstrap over
    the test rows where both hold each seed's per-row correctness (`test_correct`)."""
    d = paired_difference([100 * x[i] for x in a["accuracy"]], [100 * x[i] for x in b["accuracy"]])
    rows_a, rows_b = a.get("test_correct"), b.get("test_correct")
    if not rows_a or not rows_b or any(x[i] is None for x in rows_a + rows_b):
        return d
    return bootstrap_difference(d, [100.0 * (x[i].astype(float) - y[i].astype(float)) for x, y in zip(rows_a, rows_b)])


def claims(aggs: dict, primary: tuple | None = None) -> str:
    """The paper's claims this study can test, per teacher, at the first, middle and last budget
    (percentage points); `primary` = (setting, other strategy, round): the claim declared before the runs that
    robust beats that strategy there (a role column then marks the rest exploratory)."""
    rows = []
    for label, agg in aggs.items():
        if ABLATION_SUFFIX in label or "robust" not in agg:
            continue
        queries = agg["robust"]["queries"]
        for i in claim_rounds(len(queries) - 1):
            for other in ("margin", "entropy", "random", "kcenter"):
                if other in agg:
                    d = _difference(agg["robust"], agg[other], i)
                    rows.append((f"{label} teacher: robust beats {other} at {queries[i]} queries", d, claim_verdict(d)))
            for ablation, a in aggs.items():
                base, sep, estimate = ablation.partition(ABLATION_SUFFIX)
                if sep and base == label and "robust" in a:
                    d = _difference(agg["robust"], a["robust"], i)
                    rows.append(
                        (
                            f"{label} teacher: an estimated m beats m_estimate={estimate} at {queries[i]} queries",
                            d,
                            claim_verdict(d),
                        )
                    )
    declared = ""
    if primary is not None:
        label, other, rnd = primary
        declared = f"{label} teacher: robust beats {other} at {aggs[label]['robust']['queries'][rnd]} queries"
    return claims_table(rows, "{:+.2f}", primary=declared) if rows else ""


ABLATION_SUFFIX = "_m"  # a setting named <teacher>_m<estimate> runs robust with active.m_estimate=<estimate>


CLAIMS_NOTE = (
    "One claim is declared primary before the runs: {primary}; every other row is exploratory. Each interval is "
    "the seeds' paired t-interval, widened where the runs stored each student's per-row test correctness by a "
    "bootstrap over the test rows (500 resamples, the same for both strategies and every seed; half-widths added "
    "in quadrature)."
)


def render(settings: dict[str, list[dict]], primary: tuple | None = None) -> str:
    """The generated page: per main setting, accuracy vs queries, robust against every other strategy,
    the selection statistics; then the m ablation (robust with m estimated vs robust with another m).
    `primary` = (setting, other strategy, round): the study's declared claim (see `claims`)."""
    aggs = {label: aggregate(runs) for label, runs in settings.items() if runs}
    parts = ["## Claims and verdicts"]
    if primary is not None:
        label, other, rnd = primary
        queries = aggs[label]["robust"]["queries"][rnd]
        parts.append(CLAIMS_NOTE.format(primary=f"with the {label} teacher, robust beats {other} at {queries} queries"))
    parts.append(claims(aggs, primary))
    for label, runs in settings.items():
        if ABLATION_SUFFIX in label or label not in aggs:
            continue
        agg = aggs[label]
        parts += [
            f"## Teacher: {label}",
            markdown(label, runs, agg),
            "Robust against each other strategy, paired by seed (percentage points, 95% CI):",
            paired_table(agg, [("robust", o) for o in ("margin", "entropy", "random", "kcenter")]),
            "The robust selection per round (mean ± sd over seeds):",
            selection_table(runs),
        ]
    ablation = []
    for label in settings:
        base, sep, estimate = label.partition(ABLATION_SUFFIX)
        if not sep or base not in aggs or label not in aggs:
            continue
        agg = {"robust": aggs[base]["robust"], f"robust (m={estimate})": aggs[label]["robust"]}
        ablation += [
            f"Teacher {base}: robust with m estimated from the teacher's validation error (m_estimate=overall) "
            f"against robust with m_estimate={estimate}:",
            paired_table(agg, [("robust", f"robust (m={estimate})")]),
            f"Selection statistics with m_estimate={estimate}:",
            selection_table(settings[label]),
        ]
    if ablation:
        parts += ["## Does an informative m matter?", *ablation]
    return "\n\n".join(p for p in parts if p) + "\n"


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
    figures.save_png(fig, path, dpi=120)


def main(argv=None):
    ap = cli.parser("python -m titans.active.report", __doc__)
    ap.add_argument("--runs", action="append", required=True, help="LABEL=GLOB of run workdirs")
    ap.add_argument("--plot", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    settings = {}
    for spec in args.runs:
        label, _, pattern = spec.partition("=")
        runs = load(pattern)
        settings[label] = (runs, aggregate(runs))
    print(render({label: runs for label, (runs, _) in settings.items()}))
    if args.plot:
        plot(settings, args.plot)
    if args.json:
        paths.write_text(args.json, json.dumps({k: v[1] for k, v in settings.items()}, indent=2))


if __name__ == "__main__":
    main()
