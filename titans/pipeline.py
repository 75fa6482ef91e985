"""Runs a config: one training run, or a pipeline of stages (teacher, then students, ...).

A pipeline with a `cascade` section is followed by the cascade evaluation (titans/cascade/evaluate.py);
one with an `ensemble` section by the B-DISTIL ensemble run (titans/ensemble/runner.py).

A pipeline config has `stages` (a ConfigDict of full run configs) and `stage_order`. Each stage runs
in WORKDIR/<stage name>; a stage whose `distill.teacher_workdir` is "@name" distils from the sibling
stage `name`. Finished stages are not rerun (their results.json is read back), and an interrupted one
resumes from its checkpoint, so rerunning a pipeline command continues where it stopped.
"""

from __future__ import annotations

import json
import os

import ml_collections

from titans import config as config_lib
from titans import train


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config = config_lib.validate(config)
    if "ensemble" in config:
        from titans.ensemble import config as ensemble_config  # noqa: PLC0415
        ensemble_config.validate(config)  # before any stage trains, so a bad field fails fast
    if "stages" not in config:
        return train.train_and_evaluate(config, workdir)
    return run_pipeline(config, workdir)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for name in config.stage_order:
        stage = ml_collections.ConfigDict(config.stages[name].to_dict())
        stage_dir = os.path.join(workdir, name)
        ref = stage.distill.teacher_workdir
        if ref.startswith("@"):
            if ref[1:] not in results:
                raise config_lib.ConfigError(f"stage '{name}' distils from '{ref}', which must run before it "
                                             f"(stage_order: {list(config.stage_order)}).")
            stage.distill.teacher_workdir = os.path.join(workdir, ref[1:])
        done = os.path.join(stage_dir, "results.json")
        if os.path.exists(done):
            with open(done) as f:
                results[name] = json.load(f)
            print(f"[{name}] already finished: {done}", flush=True)
            continue
        results[name] = train.train_and_evaluate(stage, stage_dir)
        if results[name].get("preempted"):
            return {"preempted": True, "stage": name, "stages": results}
    table = summary_table(results)
    if results:
        print("\n" + table, flush=True)
    if train.logs.is_writer():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(table + "\n")
    out = {"preempted": False, "stages": results}
    if "cascade" in config:
        from titans.cascade import evaluate  # noqa: PLC0415 (only pipelines with a cascade section need it)
        out["cascade"] = evaluate.run(config, workdir)
    if "ensemble" in config:
        from titans.ensemble import runner  # noqa: PLC0415 (only pipelines with an ensemble section need it)
        out["ensemble"] = runner.run(config, workdir)
    return out


def summary_table(results: dict) -> str:
    """A Markdown table: accuracy, FLOPs and parameters per example, agreement with the teacher."""
    rows = ["| stage | model | accuracy | ECE | MFLOPs/example | params | agreement with teacher | train time |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        agree = f"{r['teacher_agreement']:.4f}" if "teacher_agreement" in r else "-"
        rows.append(f"| {name} | {r['model']} | {r['accuracy']:.4f} | {r['ece']:.4f} | "
                    f"{r['flops_per_example'] / 1e6:.3f} | {r['param_count']:,} | {agree} | "
                    f"{r['train_time_s']:.0f}s |")
    return "\n".join(rows)
