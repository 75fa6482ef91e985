"""The cascade study's tables over seeds, from each seed's cascade.json (docs/results/titans_fmnist.md).

    titans-results rebuild                                   # every docs/results page, from results/
    python -m titans.cascade.report DIR_SEED0 DIR_SEED1 ...  # the tables of these run directories

Every operating point is chosen on the validation split: at a budget of f x the teacher's FLOPs, the
largest validation deferral rate r among the swept thresholds with c_student + c_gate + r * c_teacher
<= f * c_teacher; its *test* accuracy is reported. Each number is
mean ± sd (ddof=1) over seeds; each comparison is a paired difference over seeds with its 95%
t-interval and a verdict (titans/stats.py): better, worse, or unresolved when the interval spans zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings

import numpy as np

from titans import figures, paths
from titans.cascade import fair
from titans.stats import (
    bootstrap_difference,
    claim_verdict,
    mean_sd,
    not_worse_verdict,
    paired_difference,
)

BUDGETS = (0.1, 0.25, 0.5)  # fractions of the teacher's FLOPs in the headline tables
HEADLINE_GATE = "msp"


def load(workdirs: list[str]) -> list[dict]:
    runs = []
    for w in workdirs:
        path = paths.join(w, "cascade.json")
        text = paths.read_text(path)
        if text is None:
            raise FileNotFoundError(f"{path} not found: run the cascade config in {w} first.")
        runs.append(json.loads(text))
    return runs


def at_budget(run: dict, student: str, gate: str, fraction: float) -> float:
    """Test accuracy of the validation-chosen operating point within `fraction` of the teacher's FLOPs
    (NaN when the student and gate alone cost more)."""
    s = run["students"][student]
    g = s["gates"][gate]
    c_t = run["teacher"]["flops_per_example"]
    val_cost = s["flops_per_example"] + g["gate_flops_per_example"] + np.asarray(g["curve"]["val_deferral_rate"]) * c_t
    ok = np.nonzero(val_cost <= fraction * c_t)[0]
    return float(g["curve"]["test_accuracy"][ok.max()]) if len(ok) else float("nan")


def reach_fraction(run: dict, student: str, gate: str) -> float | None:
    """Test FLOPs (fraction of the teacher's) of the cheapest point whose validation accuracy reaches the teacher's."""
    p = run["students"][student]["gates"][gate]["reach_teacher"]
    return p["flops_fraction_of_teacher"] if p else None


def _students(runs: list[dict]) -> list[str]:
    return list(runs[0]["students"])


def _baselines(runs: list[dict]) -> list[str]:
    return [b for b in runs[0].get("baselines", []) if b in runs[0]["students"]]


def _fraction(runs: list[dict], student: str) -> float:
    return float(
        np.mean([r["students"][student]["flops_per_example"] / r["teacher"]["flops_per_example"] for r in runs])
    )


def headline_table(runs: list[dict], gate: str = HEADLINE_GATE) -> str:
    """Per student: its cost, its accuracy alone, the cascade's at 10/25/50% of the teacher's FLOPs, and
    the FLOPs at which the validation-chosen cascade reaches the teacher's validation accuracy."""
    t = [r["teacher"] for r in runs]
    lines = [
        f"Teacher: test accuracy {mean_sd([x['test_accuracy'] for x in t])}, "
        f"{np.mean([x['flops_per_example'] for x in t]) / 1e6:.3f} MFLOPs/example. Seeds: {len(runs)}. "
        f"Gate: {gate}.",
        "",
        "| student | objective | FLOPs, % of teacher | student alone | "
        + " | ".join(f"cascade @ {b:.0%}" for b in BUDGETS)
        + " | FLOPs to reach teacher, % | test acc there | reached |",
        "|---|---|---|---|" + "---|" * len(BUDGETS) + "---|---|---|",
    ]
    for name in _students(runs):
        if gate not in runs[0]["students"][name]["gates"]:
            continue
        s = [r["students"][name] for r in runs]
        reach = [r["students"][name]["gates"][gate]["reach_teacher"] for r in runs]
        cells = [mean_sd([at_budget(r, name, gate, b) for r in runs]) for b in BUDGETS]
        lines.append(
            f"| {name} | {s[0]['objective']} | {100 * _fraction(runs, name):.1f} | "
            f"{mean_sd([x['test_accuracy'] for x in s])} | " + " | ".join(cells) + " | "
            f"{mean_sd([100 * p['flops_fraction_of_teacher'] if p else None for p in reach], '{:.1f}')} | "
            f"{mean_sd([p['test_accuracy'] if p else None for p in reach])} | "
            f"{sum(p is not None for p in reach)}/{len(reach)} |"
        )
    return "\n".join(lines)


def baseline_table(runs: list[dict], gate: str = HEADLINE_GATE) -> str:
    """Each cascade against the single student that costs as much: the cascade's test accuracy at the
    baseline's own FLOPs minus the baseline alone, paired by seed."""
    lines = []
    for base in _baselines(runs):
        f = _fraction(runs, base)
        alone = [r["students"][base]["test_accuracy"] for r in runs]
        lines += [
            f"Equal-cost baseline `{base}` alone ({100 * f:.1f}% of the teacher's FLOPs): test accuracy "
            f"{mean_sd(alone)}.",
            "",
            f"| cascade (gate {gate}) | cascade acc @ {100 * f:.1f}% | Δ vs {base} [95% CI] | verdict |",
            "|---|---|---|---|",
        ]
        for name in _students(runs):
            if name in _baselines(runs) or gate not in runs[0]["students"][name]["gates"]:
                continue
            acc = [at_budget(r, name, gate, f) for r in runs]
            d = paired_difference(acc, alone)
            lines.append(f"| {name} | {mean_sd(acc)} | {d.format()} | {d.verdict} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def objective_table(runs: list[dict], reference: str = "standard", gate: str = HEADLINE_GATE) -> str:
    """Each student objective minus standard KD of the same size at equal amortized FLOPs, paired by seed
    (msp gate for both; defer students also with their own defer gate)."""
    lines = [
        "| size | objective (gate) | "
        + " | ".join(f"Δ acc @ {b:.0%} [95% CI]" for b in BUDGETS)
        + " | verdict @ 25% | Δ FLOPs to reach teacher, % |",
        "|---|---|" + "---|" * len(BUDGETS) + "---|---|",
    ]
    for name in _students(runs):
        size, _, objective = name.partition("_")
        ref = f"{size}_{reference}"
        if name == ref or ref not in runs[0]["students"]:
            continue
        own = [g for g in ("defer_output",) if g in runs[0]["students"][name]["gates"]]
        for g in [gate, *own]:
            diffs = [
                paired_difference([at_budget(r, name, g, b) for r in runs], [at_budget(r, ref, gate, b) for r in runs])
                for b in BUDGETS
            ]
            dreach = paired_difference(
                [_pct(reach_fraction(r, name, g)) for r in runs], [_pct(reach_fraction(r, ref, gate)) for r in runs]
            )
            lines.append(
                f"| {size} | {objective} ({g}) | "
                + " | ".join(d.format() for d in diffs)
                + f" | {diffs[BUDGETS.index(0.25)].verdict} | {dreach.format('{:+.1f}')} |"
            )
    return "\n".join(lines)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def gate_table(runs: list[dict], fraction: float = 0.25) -> str:
    """Every gate of every student at one budget, with the gate's test AUROC for "the teacher is right
    and the student wrong"."""
    gates = list(dict.fromkeys(g for s in runs[0]["students"].values() for g in s["gates"]))
    lines = [
        "| student | " + " | ".join(f"{g}: acc @ {fraction:.0%} / AUROC" for g in gates) + " |",
        "|---|" + "---|" * len(gates),
    ]
    for name in _students(runs):
        cells = []
        for g in gates:
            if g not in runs[0]["students"][name]["gates"]:
                cells.append("—")
                continue
            acc = mean_sd([at_budget(r, name, g, fraction) for r in runs])
            auc = mean_sd([r["students"][name]["gates"][g]["auroc_teacher_better_test"] for r in runs], "{:.3f}")
            cells.append(f"{acc} / {auc}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runner_table(runs: list[dict]) -> str:
    """The real cascade runner against the offline sweep at the validation-chosen target rates."""
    points = [
        (float(target), p)
        for r in runs
        for s in r["students"].values()
        for g in s["gates"].values()
        for target, p in g["at_deferral_rate"].items()
    ]
    if not points:
        return "(no runner measurements in these runs)"
    differing = [p["runner_disagreements_with_sweep"] for _, p in points]
    gap = max(abs(p["runner_test_deferral_rate"] - target) for target, p in points)
    same_rate = max(abs(p["runner_test_deferral_rate"] - p["test_deferral_rate"]) for _, p in points)
    return (
        f"The runner (student on every row, teacher on the deferred rows only) at the validation-chosen target "
        f"deferral rates: {len(points)} runs over the test split. Runs whose answers differ from the offline "
        f"sweep's: {sum(d > 0 for d in differing)} (at most {max(differing)} examples); largest difference "
        f"between the runner's and the sweep's test deferral rate: {same_rate:.4f}; largest |test deferral "
        f"rate − validation target|: {gap:.4f}."
    )


def time_table(runs: list[dict]) -> str:
    """Measured time per example of each model's jitted forward pass (this machine) against its FLOPs."""
    t = [r["teacher"] for r in runs]
    t_time = np.mean([x["time_per_example_s"] for x in t])
    lines = [
        "| model | FLOPs, % of teacher | µs/example | time, % of teacher |",
        "|---|---|---|---|",
        f"| teacher | 100.0 | {mean_sd([1e6 * x['time_per_example_s'] for x in t], '{:.1f}')} | 100.0 |",
    ]
    for name in _students(runs):
        times = [r["students"][name]["time_per_example_s"] for r in runs]
        lines.append(
            f"| {name} | {100 * _fraction(runs, name):.1f} | {mean_sd([1e6 * x for x in times], '{:.1f}')} | "
            f"{100 * np.mean(times) / t_time:.1f} |"
        )
    return "\n".join(lines)


TEACHER_MARGIN = 0.002  # "reaches the teacher": the whole interval of (cascade - teacher) above -0.2 points
# The study's one declared primary claim: the paper's, that the easy-focused student's cascade beats the standard
# student's at equal cost (the smallest CNN, 25% of the teacher's FLOPs). Every other claim is exploratory.
PRIMARY = ("tiny_easy", "tiny_standard", 0.25)


def _scores(logits: np.ndarray, gate: str, num_classes: int) -> np.ndarray | None:
    """Per-row gate scores recomputed from stored logits (msp and defer_output; None for the others)."""
    z = logits.astype(np.float64)
    if gate == "msp":
        head = z[:, :num_classes]
        p = np.exp(head - head.max(-1, keepdims=True))
        return 1.0 - p.max(-1) / p.sum(-1)
    if gate == "defer_output" and z.shape[-1] == num_classes + 1:
        logp = z - z.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return logp[:, num_classes] - logp[:, :num_classes].max(-1)
    return None


def _operating_index(run: dict, student: str, gate: str, fraction: float) -> int | None:
    s = run["students"][student]
    g = s["gates"][gate]
    c_t = run["teacher"]["flops_per_example"]
    val_cost = s["flops_per_example"] + g["gate_flops_per_example"] + np.asarray(g["curve"]["val_deferral_rate"]) * c_t
    ok = np.nonzero(val_cost <= fraction * c_t)[0]
    return int(ok.max()) if len(ok) else None


def correct_rows(run: dict, logits: dict, arm: tuple) -> np.ndarray | None:
    """Per test image 0/1 correctness of one arm: ("teacher",), ("alone", student) or ("cascade", student, gate,
    fraction): the validation-chosen operating point's test deferral rate applied to the gate's test scores
    recomputed from the stored logits (the highest scores deferred). None where the logits cannot say."""
    y = logits["test/label"]
    teacher = logits["test/teacher"].argmax(-1) == y
    if arm[0] == "teacher":
        return teacher.astype(np.float64)
    C = logits["test/teacher"].shape[-1]
    student = logits[f"test/{arm[1]}"]
    right = student[:, :C].argmax(-1) == y
    if arm[0] == "alone":
        return right.astype(np.float64)
    _, name, gate, fraction = arm
    idx = _operating_index(run, name, gate, fraction)
    scores = _scores(student, gate, C)
    if idx is None or scores is None:
        return None
    k = int(round(run["students"][name]["gates"][gate]["curve"]["test_deferral_rate"][idx] * len(y)))
    deferred = np.zeros(len(y), bool)
    deferred[np.argsort(-scores, kind="stable")[:k]] = True
    return np.where(deferred, teacher, right).astype(np.float64)


def oracle_accuracy(run: dict, logits: dict, student: str, gate: str, fraction: float) -> float:
    """Test accuracy of the oracle gate at the cascade's own test deferral rate: it defers exactly the rows where
    the teacher is right and the student wrong, as many as that rate allows."""
    idx = _operating_index(run, student, gate, fraction)
    if idx is None:
        return float("nan")
    y = logits["test/label"]
    C = logits["test/teacher"].shape[-1]
    right = logits[f"test/{student}"][:, :C].argmax(-1) == y
    gain = (logits["test/teacher"].argmax(-1) == y) & ~right
    rate = run["students"][student]["gates"][gate]["curve"]["test_deferral_rate"][idx]
    return float(right.mean() + min(rate, gain.mean()))


def _claim(runs, logits, text, arms, verdict_fn, oracle=None):
    """One claim row: (text, interval with test sampling, oracle at the same cost, verdict)."""
    a, b = arms
    d = paired_difference([_arm_accuracy(r, a) for r in runs], [_arm_accuracy(r, b) for r in runs])
    if logits is not None:
        rows = [(correct_rows(r, lg, a), correct_rows(r, lg, b)) for r, lg in zip(runs, logits)]
        if all(x is not None and y is not None for x, y in rows):
            d = bootstrap_difference(d, [x - y for x, y in rows])
    acc = "—"
    if logits is not None and oracle is not None:
        acc = mean_sd([oracle_accuracy(r, lg, *oracle) for r, lg in zip(runs, logits)])
    return text, d, acc, verdict_fn(d)


def _arm_accuracy(run: dict, arm: tuple) -> float:
    if arm[0] == "teacher":
        return run["teacher"]["test_accuracy"]
    if arm[0] == "alone":
        return run["students"][arm[1]]["test_accuracy"]
    return at_budget(run, *arm[1:])


def claims(
    runs: list[dict], gate: str = HEADLINE_GATE, logits: list[dict] | None = None, primary: tuple = PRIMARY
) -> str:
    """The paper's claims this study can test, each with its paired difference (seeds and, with the stored logits,
    test-set sampling), the oracle gate's accuracy at the cascade's cost, its role (`primary`: the one declared
    claim, (objective student, standard student, share of the teacher's FLOPs)) and its verdict."""
    rows = []
    names = _students(runs)
    for name in [n for n in names if n.endswith("_standard") and n not in _baselines(runs)]:
        arm = ("cascade", name, gate, 0.5)
        text = f"The {name} cascade ({gate}) is as accurate as the teacher at 50% of its FLOPs (tolerance {TEACHER_MARGIN})"
        verdict = functools.partial(not_worse_verdict, margin=TEACHER_MARGIN)
        rows.append(_claim(runs, logits, text, (arm, ("teacher",)), verdict, (name, gate, 0.5)))
        for base in _baselines(runs):
            f = _fraction(runs, base)
            text = f"The {name} cascade beats the single {base} student at its cost"
            arms = (("cascade", name, gate, f), ("alone", base))
            rows.append(_claim(runs, logits, text, arms, claim_verdict, (name, gate, f)))
    for name in names:
        size, _, objective = name.partition("_")
        ref = f"{size}_standard"
        if objective == "standard" or ref not in names:
            continue
        g = "defer_output" if "defer_output" in runs[0]["students"][name]["gates"] else gate
        text = f"{name} ({g}) beats {ref} ({gate}) at 25% of the teacher's FLOPs"
        arms = (("cascade", name, g, 0.25), ("cascade", ref, gate, 0.25))
        rows.append(_claim(runs, logits, text, arms, claim_verdict, (name, g, 0.25)))
    declared = f"{primary[0]} ("
    lines = [
        "| claim | role | paired difference [95% CI: seeds and test images] | oracle gate at the same cost | verdict |",
        "|---|---|---|---|---|",
    ]
    for text, d, oracle, verdict in rows:
        role = "primary" if text.startswith(declared) and f"beats {primary[1]} " in text else "exploratory"
        lines.append(f"| {text} | {role} | {d.format()} | {oracle} | {verdict} |")
    return "\n".join(lines)


CLAIMS_NOTE = (
    "One claim is declared primary before looking: {primary} (the paper's claim); every "
    "other row is exploratory. Each interval combines the seeds' paired t-interval with a bootstrap over the "
    "test images (500 resamples, the same resample for both arms and every seed; half-widths added in "
    "quadrature). The oracle gate defers exactly where the teacher is right and the student wrong, at the "
    "cascade's own test deferral rate: the headroom a better gate could reach at that cost."
)


def _fair_rates(run: dict) -> tuple[float, ...]:
    fair_cfg = ((run.get("config") or {}).get("cascade") or {}).get("fair") or {}
    return tuple(fair_cfg.get("learning_rates") or ())


def select_learning_rates(runs: list[dict], logits: list[dict] | None = None):
    """(runs, logits, choices): in each run made with the fair recipe's learning-rate grid (titans/cascade/fair.py:
    a student `s` trained as `s_lr0`, `s_lr1`, ...), the variant with the best validation accuracy
    (`fair.select`, never the test split) kept under the student's own name and the others dropped, its stored
    logits renamed alike; `choices` is {student: [chosen rate per run]}. Runs without the grid pass unchanged."""
    out_runs, out_logits, choices = [], [], {}
    for i, run in enumerate(runs):
        lg = None if logits is None else logits[i]
        rates = _fair_rates(run)
        if not rates:
            out_runs.append(run)
            out_logits.append(lg)
            continue
        chosen = fair.select(run)
        variants = set(run["students"])
        if lg is not None:  # every student's stored logits dropped, the chosen variants' kept under the base name
            kept = {k: v for k, v in lg.items() if k.partition("/")[2] not in variants}
            lg = kept | {
                f"{k.partition('/')[0]}/{b}": lg[k] for b, n in chosen.items() for k in lg if k.partition("/")[2] == n
            }
        run = dict(run)
        run["students"] = {base: run["students"][name] for base, name in chosen.items()}
        run["baselines"] = [b for b in chosen if chosen[b] in run.get("baselines", [])]
        for base, name in chosen.items():
            choices.setdefault(base, []).append(rates[int(name.rsplit("_lr", 1)[1])] if "_lr" in name else None)
        out_runs.append(run)
        out_logits.append(lg)
    return out_runs, (None if logits is None else out_logits), choices


def learning_rate_table(choices: dict) -> str:
    """The learning rate each student's validation accuracy chose, per seed."""
    if not choices:
        return ""
    n = max(len(v) for v in choices.values())
    rows = ["| student | " + " | ".join(f"seed {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
    for name, rates in choices.items():
        rows.append(f"| {name} | " + " | ".join("-" if r is None else f"{r:g}" for r in rates) + " |")
    return "\n".join(rows)


def provenance_line(runs: list[dict]) -> str:
    """The code revisions that evaluated the raw outputs, and whether they hold their pipeline config."""
    revs = sorted({(r.get("revision") or "not recorded") + (" (dirty)" if r.get("dirty") else "") for r in runs})
    configs = sum("config" in r for r in runs)
    return f"Code revision of the raw outputs: {', '.join(revs)}. Pipeline config recorded in {configs} of {len(runs)} runs."


def render(runs: list[dict], logits: list[dict] | None = None, primary: tuple = PRIMARY) -> str:
    """The generated part of the study's page: every table, in reading order (`logits`: each run's stored
    cascade logits, for the intervals over test images and the oracle gate; `primary`: the study's declared
    claim, see `claims`). Learning-rate variants of the fair recipe are first reduced to the rate chosen on
    validation (`select_learning_rates`)."""
    runs, logits, choices = select_learning_rates(runs, logits)
    parts = [
        "## Claims and verdicts",
        CLAIMS_NOTE.format(primary=f"{primary[0]} against {primary[1]} at {primary[2]:.0%} of the teacher's FLOPs"),
        claims(runs, logits=logits, primary=primary),
        "## Headline: accuracy at a FLOPs budget",
        headline_table(runs),
        "## Against a single student of the same cost",
        baseline_table(runs) or "(no baseline student in these runs)",
        "## Student objectives against standard KD at equal cost",
        "Paired by seed; positive = the objective is more accurate than standard KD at the same amortized FLOPs.",
        objective_table(runs),
        "## Gates at 25% of the teacher's FLOPs",
        gate_table(runs),
        "## The real runner",
        runner_table(runs),
        "## Measured time per example",
        "Each model's jitted forward pass on one batch, on the machine that ran the study (see the header).",
        time_table(runs),
        "## Provenance",
        provenance_line(runs),
    ]
    if choices:
        parts[-2:-2] = [
            "## Learning rates chosen on validation",
            "Every student was trained at each rate of the shared recipe's grid; the rows above use, per seed, the "
            "rate with the best validation accuracy.",
            learning_rate_table(choices),
        ]
    return "\n\n".join(parts) + "\n"


def plot_mean_curves(runs: list[dict], out_path: str, gate: str = HEADLINE_GATE) -> str:
    """Accuracy vs amortized FLOPs (msp gate; defer students also with their defer gate), mean ± sd over
    seeds on a common FLOPs grid, one panel per student size; baselines as points."""
    acc_t = np.mean([r["teacher"]["test_accuracy"] for r in runs])
    baselines = _baselines(runs)
    sizes = list(dict.fromkeys(n.split("_")[0] for n in _students(runs) if n not in baselines))
    fig, axes = figures.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    grid = np.linspace(0, 1.0, 101)
    for ax, size in zip(axes[0], sizes):
        for name in [n for n in _students(runs) if n.startswith(size + "_")]:
            for g in (gate, "defer_output"):
                if g not in runs[0]["students"][name]["gates"]:
                    continue
                curves = np.array([[at_budget(r, name, g, b) for b in grid] for r in runs])
                with warnings.catch_warnings():  # budgets below a student's own cost are NaN for every seed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(curves, 0)
                    std = np.nanstd(curves, 0, ddof=1) if len(runs) > 1 else 0 * grid
                ax.plot(grid, mean, label=f"{name} / {g}", lw=1.3)
                ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
        for b in baselines:
            ax.errorbar(
                [_fraction(runs, b)],
                [np.mean([r["students"][b]["test_accuracy"] for r in runs])],
                yerr=[np.std([r["students"][b]["test_accuracy"] for r in runs], ddof=1) if len(runs) > 1 else 0],
                fmt="ks",
                label=f"{b} alone",
            )
        ax.axhline(acc_t, color="k", ls="--", lw=0.8, label="teacher")
        ax.set_xlabel("budget: amortized FLOPs / teacher FLOPs (validation-chosen)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{size} students (mean ± sd over {len(runs)} seeds)")
        ax.set_ylim(max(0.8, ax.get_ylim()[0]), None)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    figures.save_png(fig, out_path, dpi=120)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--plot", default="", help="also write the accuracy-vs-FLOPs figure here (.png)")
    a = p.parse_args(argv)
    runs = load(a.workdirs)
    if a.plot:
        plot_mean_curves(runs, a.plot)
    print(render(runs))


if __name__ == "__main__":
    main()
