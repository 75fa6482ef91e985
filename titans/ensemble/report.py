"""Aggregates B-DISTIL runs (one ensemble.json per seed) into Markdown: mean ± sd over seeds.

python -m titans.ensemble.report workdirs/bdistil_fmnist/seed0 workdirs/bdistil_fmnist/seed1 ... > report.md
"""

from __future__ import annotations

import json

import numpy as np

from titans import cli, paths
from titans.stats import claim_verdict, claims_table, mean_sd, non_inferiority_verdict, paired_difference

ORDER = ("bdistil", "bdistil_noconn", "resched", "no_resched")
LABEL = {
    "bdistil": "B-DISTIL (connected)",
    "bdistil_noconn": "B-DISTIL, no connection",
    "resched": "resched (independent members, weighted average)",
    "no_resched": "no-resched (one student per budget)",
}
# The paper claims B-DISTIL is *competitive with* no-resched (one student per FLOPs budget), not that it beats
# it: the page tests non-inferiority, B-DISTIL - no-resched > -NON_INFERIORITY_MARGIN points (stats.py).
NON_INFERIORITY_MARGIN = 0.5
# The weight player's two games (ensemble.weights). Raw outputs written before ensemble.json recorded its game
# all played the per-example one: it was the only game the committed studies' configs ran.
GAMES = {
    "example": "the per-example game (weights over training examples)",
    "example_class": "the example-by-class game (weights over example-class pairs)",
}


def load(workdirs: list[str]) -> list[dict]:
    out = []
    for d in workdirs:
        text = paths.read_text(paths.join(d, "ensemble.json"))
        if text is None:
            raise FileNotFoundError(f"{d} has no ensemble.json (the run has not finished)")
        out.append(json.loads(text))
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
                f"| {LABEL[name]} | {w + 1} | {mean_sd(acc)} | {mean_sd(np.divide(flops, 1e6), '{:.3f}')} | "
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
            rows.append(f"| {thr} | {mean_sd(acc)} | {mean_sd(mem, '{:.2f}')} | {mean_sd(cost, '{:.3f}')} |")
    return "\n".join(rows)


def _at(r: dict, variant: str, key: str, w: int):
    v = r["variants"].get(variant, {}).get(key, [])
    return v[w] if len(v) > w else None


def paired_table(runs: list[dict], a: str, b: str, margin: float | None = None) -> str:
    """Per member count w: accuracy of `a` minus `b` (percentage points), paired by seed, with the 95%
    t-interval and the verdict, and both variants' MFLOPs (for no-resched: the student matched to
    B-DISTIL's prefix w); with `margin`, also the non-inferiority verdict of `a` against `b` within it."""
    depth = max((len(r["variants"].get(a, {}).get("accuracy_by_members", [])) for r in runs), default=0)
    ni = f" non-inferiority (margin {margin:g} points) |" if margin is not None else ""
    rows = [
        f"| members w | {LABEL[a]} − {LABEL[b]}, points [95% CI] | verdict |{ni} seeds | {a} MFLOPs | {b} MFLOPs |",
        "|---|---|---|---|---|---|" + ("---|" if ni else ""),
    ]
    for w in range(depth):
        d = paired_difference(_acc(runs, a, w), _acc(runs, b, w))
        if d.n == 0:
            continue
        fa = [x / 1e6 for r in runs if (x := _at(r, a, "cumulative_flops", w)) is not None]
        fb = [x / 1e6 for r in runs if (x := _at(r, b, "cumulative_flops", w)) is not None]
        cell = f" {non_inferiority_verdict(d, margin)} |" if ni else ""
        rows.append(
            f"| {w + 1} | {d.format('{:+.2f}')} | {d.verdict} |{cell} {d.n} | {np.mean(fa):.3f} | {np.mean(fb):.3f} |"
        )
    return "\n".join(rows)


def teacher_line(runs: list[dict]) -> str:
    acc = [r["teacher"]["accuracy"] for r in runs]
    flops = runs[0]["teacher"]["flops_per_example"]
    return f"Teacher: test accuracy {mean_sd(acc)}, {flops / 1e6:.3f} MFLOPs/example."


def game(r: dict) -> str:
    """The weight player's game of a run (`ensemble.weights`); "example" where the run predates the record."""
    return r.get("weights") or "example"


def by_game(runs: list[dict]) -> dict[str, list[dict]]:
    """{game: its runs}, the per-example game first. Runs of one game must share their gamma: a gamma sweep
    is one study per gamma (ValueError otherwise)."""
    groups = {g: [r for r in runs if game(r) == g] for g in GAMES}
    groups = {g: rs for g, rs in groups.items() if rs}
    for g, rs in groups.items():
        gammas = sorted({r["gamma"] for r in rs if r.get("gamma") is not None})
        if len(gammas) > 1:
            raise ValueError(f"runs of {g!r} weights with several gammas {gammas} in one study: one study per gamma")
    return groups


def head_lines(runs: list[dict], groups: dict[str, list[dict]]) -> str:
    """What the generated part declares before any result: the margin, the games, where edges were measured,
    and the code revisions that made the raw outputs."""
    games = "; ".join(
        f"{GAMES[g]} (`weights={g}`): " + (f"{len(groups[g])} seed(s)" if g in groups else "no raw outputs yet")
        for g in GAMES
    )
    rows = sorted({e.get("edge_rows", "training rows") for r in runs for v in r["variants"].values() for e in v["log"]})
    revs = sorted({(r.get("revision") or "not recorded") + (" (dirty)" if r.get("dirty") else "") for r in runs})
    return "\n".join(
        [
            f"- Non-inferiority margin, declared for the no-resched claim: {NON_INFERIORITY_MARGIN:g} points of test "
            "accuracy (B-DISTIL is non-inferior when the whole 95% interval of B-DISTIL − no-resched lies above "
            f"−{NON_INFERIORITY_MARGIN:g}).",
            f"- Weight player: {games}.",
            f'- FIND-WL\'s edge measured on: {", ".join(rows) or "n/a"} ("training rows": the rows the candidate '
            "trained on).",
            f"- Code revision of the raw outputs: {', '.join(revs)}.",
        ]
    )


def _edge_text(e: dict, teacher_flops: float) -> str:
    rows = e.get("edge_rows", "training rows")
    share = f" ({100 * e['flops'] / teacher_flops:.2f}% of teacher FLOPs)" if e.get("flops") else ""
    held = f" on {rows} ({e['train_edge']:.4f} on its training rows)" if rows != "training rows" else ""
    return (
        f"r{e['round']} {e['candidate']}{share} edge {e['edge']:.4f}{held} "
        f"{'accepted' if e['accepted'] else 'rejected'} (F test acc {e['test_accuracy']:.4f})"
    )


def find_wl_lines(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        for name in ("bdistil", "bdistil_noconn"):
            v = r["variants"].get(name)
            if not v:
                continue
            steps = ", ".join(_edge_text(e, r["teacher"]["flops_per_example"]) for e in v["log"])
            stop = f"; stopped: {v['stopped']}" if v.get("stopped") else ""
            lines.append(f"- seed {r['seed']}, {name}: {steps}{stop}")
    return "\n".join(lines)


def _depth(r: dict, variant: str) -> int:
    return len(r["variants"].get(variant, {}).get("accuracy_by_members", []))


def _claim_depth(runs: list[dict], a: str, b: str, min_w: int = 1) -> int:
    """The largest member count w >= min_w that every seed reached in both variants; else that two seeds
    reached (else one; 0 if none): FIND-WL may stop a seed's ensemble early, and such a seed leaves that
    pair out."""
    for need in (len(runs), 2, 1):
        ok = [w for w in range(min_w, 9) if sum(min(_depth(r, a), _depth(r, b)) >= w for r in runs) >= need]
        if ok:
            return max(ok)
    return 0


def _acc(runs: list[dict], variant: str, w: int) -> list[float | None]:
    """Each seed's accuracy (points) with w + 1 members, None where the seed's ensemble stopped earlier."""
    return [None if (x := _at(r, variant, "accuracy_by_members", w)) is None else 100 * x for r in runs]


def claim_rows(runs: list[dict], suffix: str = "") -> list[tuple]:
    """The paper's claims this study can test, each at the deepest member count every seed reached (or, if
    none beyond the minimum, two seeds): (claim, paired difference, verdict)."""
    rows = []
    variants = set().union(*(r["variants"] for r in runs))
    if "bdistil" not in variants:
        return rows
    w = _claim_depth(runs, "bdistil", "bdistil", min_w=2)
    if w:
        d = paired_difference(_acc(runs, "bdistil", w - 1), _acc(runs, "bdistil", 0))
        rows.append(
            (f"Accuracy grows with members: F_{w} beats F_1 ({d.n} seeds, points{suffix})", d, claim_verdict(d))
        )
    for other, claim, min_w in (
        ("resched", "B-DISTIL beats resched with the same members", 1),
        (
            "no_resched",
            f"B-DISTIL is competitive with one student of the same FLOPs (no-resched, the paper's oracle): "
            f"non-inferior within {NON_INFERIORITY_MARGIN:g} points",
            1,
        ),
        ("bdistil_noconn", "The connection helps: B-DISTIL beats its unconnected version, same members", 2),
    ):
        w = _claim_depth(runs, "bdistil", other, min_w) if other in variants else 0
        if w:
            d = paired_difference(_acc(runs, "bdistil", w - 1), _acc(runs, other, w - 1))
            verdict = claim_verdict(d)
            if other == "no_resched":  # non-inferior -> reproduced, inferior -> not reproduced
                ni = non_inferiority_verdict(d, NON_INFERIORITY_MARGIN)
                verdict = {"non-inferior": "reproduced", "inferior": "not reproduced"}.get(ni, "unresolved")
            rows.append((f"{claim} (w = {w}, {d.n} seeds, points{suffix})", d, verdict))
    return rows


def claims(runs: list[dict]) -> str:
    """The claims table of one game's runs (see claim_rows)."""
    return claims_table(claim_rows(runs), "{:+.2f}")


def games_table(groups: dict[str, list[dict]]) -> str:
    """B-DISTIL (connected) with example-class weights minus with example weights, per member count, paired by
    seed (points, 95% CI)."""
    a, b = groups["example_class"], groups["example"]
    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    a = [{r["seed"]: r for r in a}[s] for s in seeds]
    b = [{r["seed"]: r for r in b}[s] for s in seeds]
    rows = ["| members w | example-class − example, points [95% CI] | verdict | seeds |", "|---|---|---|---|"]
    for w in range(max((_depth(r, "bdistil") for r in a + b), default=0)):
        d = paired_difference(_acc(a, "bdistil", w), _acc(b, "bdistil", w))
        if d.n:
            rows.append(f"| {w + 1} | {d.format('{:+.2f}')} | {d.verdict} | {d.n} |")
    return "\n".join(rows)


def _game_sections(runs: list[dict]) -> list[str]:
    """Members table, paired tables, anytime table and FIND-WL log of one game's runs."""
    parts = ["## Accuracy by members and FLOPs (mean ± sd over seeds)", members_table(runs)]
    variants = set().union(*(r["variants"] for r in runs))
    for b, what in (
        ("no_resched", "the no-resched curve (one student per B-DISTIL prefix, matched in FLOPs)"),
        ("resched", "resched with the same number of members (same member sizes)"),
        ("bdistil_noconn", "B-DISTIL without the connection, same number of members"),
    ):
        if "bdistil" in variants and b in variants:
            margin = NON_INFERIORITY_MARGIN if b == "no_resched" else None
            parts += [f"## B-DISTIL (connected) against {what}", paired_table(runs, "bdistil", b, margin)]
    parts += [
        "## Anytime inference, B-DISTIL (connected), no budget cap",
        anytime_table(runs),
        "## FIND-WL, per seed",
        find_wl_lines(runs),
    ]
    return parts


def render(runs: list[dict]) -> str:
    """The generated page of a B-DISTIL study over seeds: the per-example game's results, then the
    example-by-class game's next to them when the study has its runs."""
    groups = by_game(runs)
    main = "example" if "example" in groups else next(iter(groups))
    rows = claim_rows(groups[main])
    for g, rs in groups.items():
        if g != main:
            rows += claim_rows(rs, suffix=f"; {g} weights")
    parts = [teacher_line(runs), head_lines(runs, groups), "## Claims and verdicts", claims_table(rows, "{:+.2f}")]
    parts += _game_sections(groups[main])
    for g, rs in groups.items():
        if g == main:
            continue
        sections = _game_sections(rs)
        parts += [f"## {GAMES[g][0].upper() + GAMES[g][1:]}"]
        parts += [("#" + p if p.startswith("## ") else p) for p in sections]
    if len(groups) == 2:
        parts += ["## The two games, B-DISTIL (connected), paired by seed", games_table(groups)]
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
    p = cli.parser("python -m titans.ensemble.report", __doc__)
    p.add_argument("dirs", nargs="+", metavar="WORKDIR", help="ensemble run directories (one per seed)")
    print(render(load(p.parse_args(argv).dirs)))


if __name__ == "__main__":
    main()
