"""docs/serving.md's tables of the served benchmark, regenerated from the raw outputs of benchmarks/serving.py.

    python benchmarks/serving_table.py            # prints both tables as docs/serving.md holds them

`table()`: the ResNet-56 teacher's runs (open loops at fractions of the teacher's capacity);
`table(HOP_RUNS, HOP_HEADER)`: the ResNet-20 teacher's runs (open loops at fixed request rates). Reads only
the committed JSONs (json, no JAX, no Ray); tests/test_results.py and tests/test_docs.py check the page
against them.
"""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS = (
    ("CNN student, run 1", "serving_fmnist_resnet56_cnn_2026-12-04.json"),
    ("CNN student, run 2", "serving_fmnist_resnet56_cnn_rerun_2026-12-04.json"),
    ("CNN student, run 3 (6-row bucket)", "serving_fmnist_resnet56_cnn_bucket6_2026-12-04.json"),
    ("CNN student, run 4 (8 clients)", "serving_fmnist_resnet56_cnn_concurrency8_2026-12-05.json"),
    ("ResNet-20 student", "serving_fmnist_resnet56_resnet20_2026-12-04.json"),
)
HEADER = (
    "| pair, run | r (served) | closed loop images/s: teacher / student / cascade | cascade / teacher, per repeat "
    "| cascade / ideal (per repeat) | closed p99 ms: teacher / cascade | open-loop p99 ms teacher / cascade, "
    "cascade - teacher [95% CI], at 0.3 / 0.6 / 0.9 of the teacher's capacity "
    "| served test accuracy: teacher / student / cascade |\n|---|---:|---|---|---|---|---|---|"
)
HOP_RUNS = (
    ("tiny student, run 1", "serving_fmnist_strong_tiny_thread_2026-12-03.json"),
    ("tiny student, run 2", "serving_fmnist_strong_tiny_thread_rerun_2026-12-03.json"),
    ("tiny student, run 3", "serving_fmnist_strong_tiny_thread_rerun2_2026-12-03.json"),
    ("medium student", "serving_fmnist_strong_medium_thread_2026-12-03.json"),
)
HOP_HEADER = HEADER.replace("at 0.3 / 0.6 / 0.9 of the teacher's capacity", "per offered rate")


def ideal_ratios(d: dict) -> list[float]:
    """The cascade's throughput over 1 / (t_student + r t_teacher) per repeat; recomputed from the repeats'
    throughputs for outputs written before serving.py recorded it."""
    if "cascade_over_ideal_repeats" in d:
        return d["cascade_over_ideal_repeats"]
    m, r = d["modes"], d["modes"]["cascade"]["teacher_fraction"]
    repeats = zip(*(m[k]["closed_images_per_s_repeats"] for k in ("cascade", "student", "teacher")), strict=True)
    return [c * (1 / s + r / t) for c, s, t in repeats]


def row(name: str, d: dict) -> str:
    m = d["modes"]
    loops = []
    for rps, o in d["open_loop"].items():
        x = o["cascade_minus_teacher_p99"]
        load = f"{d['open_loads'][rps]:g} ({float(rps):.1f} req/s)" if "open_loads" in d else f"{float(rps):g} req/s"
        loops.append(
            f"{load}: {o['teacher']['p99_ms']:.0f} / "
            f"{o['cascade']['p99_ms']:.0f}, {x['diff_ms']:+.0f} [{x['ci95_ms'][0]:+.0f}, {x['ci95_ms'][1]:+.0f}] "
            f"{x['verdict']}"
        )
    ips = " / ".join(f"{m[k]['closed_images_per_s']:.0f}" for k in ("teacher", "student", "cascade"))
    acc = " / ".join(f"{m[k]['test_accuracy']:.4f}" for k in ("teacher", "student", "cascade"))
    return (
        f"| {name} | {m['cascade']['teacher_fraction']:.3f} | {ips} | "
        f"{', '.join(f'{v:.2f}' for v in d['cascade_over_teacher_repeats'])} | "
        f"{d['cascade_over_ideal']:.2f} ({', '.join(f'{v:.2f}' for v in ideal_ratios(d))}) | "
        f"{m['teacher']['closed_p99_ms']:.0f} / {m['cascade']['closed_p99_ms']:.0f} | {'; '.join(loops)} | {acc} |"
    )


def table(runs=RUNS, header: str = HEADER) -> str:
    rows = []
    for name, file in runs:
        with open(os.path.join(RESULTS, file)) as f:
            rows.append(row(name, json.load(f)))
    return "\n".join([header, *rows])


if __name__ == "__main__":
    print(table(), table(HOP_RUNS, HOP_HEADER), sep="\n\n")
