"""python -m titans.analyze: see titans/analyze/__init__.py for the three uses."""

from __future__ import annotations

import json
import sys

from titans import checkpoint as ckpt_lib
from titans import cli as cli_lib
from titans import data as data_lib
from titans import logs, paths
from titans.analyze import AnalysisError, analyze_path, compare_runs, diff_checkpoints, inspect_checkpoint


def main(argv=None):
    p = cli_lib.parser(
        "titans-analyze",
        "Analyse finished Titans runs: evaluation, plots, HTML report; compare runs; inspect checkpoints.",
    )
    p.add_argument("workdirs", nargs="+", help="run or pipeline directories")
    p.add_argument("--split", default=None, help="split to evaluate on (default: each run's eval split)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the latest)")
    p.add_argument("--hardest", type=int, default=32, help="examples in the hardest-examples grid")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--compare", action="store_true", help="one table over the runs instead of per-run analyses")
    p.add_argument("--out", default="", help="output directory of --compare / --inspect")
    p.add_argument("--inspect", action="store_true", help="checkpoint inspection only (no data needed)")
    p.add_argument("--diff", default="", help="with --inspect: STEP_A,STEP_B of the (first) run")
    p.add_argument("--diff_with", default="", help="with --inspect: another run of the same model to diff against")
    a = p.parse_args(argv)

    logs.setup_cli_logging()
    try:
        if a.compare:
            print(compare_runs(a.workdirs, a.out or "analysis_compare")["markdown"])
        elif a.inspect:
            out = {}
            for w in a.workdirs:
                info = inspect_checkpoint(w, a.step)
                if a.diff or a.diff_with:
                    steps = [int(s) for s in a.diff.split(",")] if a.diff else [a.step, -1]
                    if len(steps) != 2:
                        raise AnalysisError("--diff needs STEP_A,STEP_B")
                    info["diff"] = diff_checkpoints(w, steps[0], steps[1], a.diff_with or None)
                out[w] = info
                _print_inspection(info)
            if a.out:
                paths.makedirs(a.out)
                paths.write_text(paths.join(a.out, "inspect.json"), json.dumps(out, indent=1))
        else:
            for w in a.workdirs:
                analyze_path(w, split=a.split, step=a.step, hardest=a.hardest, batch_size=a.batch_size)
    except (AnalysisError, ckpt_lib.CheckpointError, data_lib.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


def _print_inspection(info):
    print(
        f"{info['workdir']}: {info['model']} {info['model_kwargs']} on {info['dataset']}; saved steps "
        f"{info['steps']}; step {info['step']}: {info['param_count']:,} params, "
        f"{info['flops_per_example'] / 1e6:.3f} MFLOPs/example"
    )
    print("| layer | shape | params | L2 norm | RMS |\n|---|---|---:|---:|---:|")
    for r in info["layers"]:
        print(f"| {r['layer']} | {tuple(r['shape'])} | {r['params']:,} | {r['l2_norm']:.4f} | {r['rms']:.4f} |")
    if "diff" in info:
        d = info["diff"]
        print(
            f"difference step {d['a']['step']} ({d['a']['workdir']}) vs step {d['b']['step']} ({d['b']['workdir']}):"
            f" total L2 {d['total_diff_l2']:.4f}"
        )
        print("| layer | L2 of difference | relative |\n|---|---:|---:|")
        for r in d["layers"]:
            print(f"| {r['layer']} | {r['diff_l2']:.4f} | {r['relative']:.4f} |")


def cli():
    main()


if __name__ == "__main__":
    cli()
