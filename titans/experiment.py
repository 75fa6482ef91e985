"""Runs an experiment config: one training run, or a pipeline of stages (teacher, then students, ...).

A pipeline with a `cascade` section is followed by the cascade evaluation (titans/cascade/evaluate.py);
one with an `ensemble` section by the B-DISTIL ensemble run (titans/ensemble/runner.py).

A pipeline config has `stages` (a ConfigDict of full run configs) and `stage_order`. Each stage runs
in WORKDIR/<stage name>; a stage whose `distill.teacher_workdir` is "@name" distils from the sibling
stage `name`, and one whose `init_from` is "@name" starts from that stage's parameters. Finished stages are
not rerun (their results.json is read back), and an interrupted one resumes from its checkpoint, so
rerunning a pipeline command continues where it stopped.
"""

from __future__ import annotations

import ml_collections

from titans import config as config_lib
from titans import logs, paths, runs
from titans.cascade import config as cascade_config
from titans.cascade import evaluate as cascade_evaluate
from titans.ensemble import config as ensemble_config
from titans.ensemble import runner as ensemble_runner
from titans.train import ensure_trained, train_and_evaluate


def run_experiment(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs a config: one training run, or a pipeline of stages and its cascade/ensemble sections."""
    config = config_lib.validate(config)
    if "ensemble" in config:
        ensemble_config.validate(config)  # before any stage trains, so a bad field fails fast
    if "cascade" in config:
        cascade_config.validate(config)
    if "stages" not in config:
        return train_and_evaluate(config, workdir)
    return run_pipeline(config, workdir)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = paths.text(workdir)  # a local path made absolute; a URL (gs://...) kept as it is
    paths.makedirs(workdir)
    results = {}
    for name in config.stage_order:
        stage = ml_collections.ConfigDict(config.stages[name].to_dict())
        stage_dir = paths.join(workdir, name)
        if stage.distill.teacher_workdir.startswith("@"):
            stage.distill.teacher_workdir = _sibling(config, name, stage.distill.teacher_workdir, results, workdir)
        if stage.get("init_from", "").startswith("@"):
            stage.init_from = _sibling(config, name, stage.init_from, results, workdir)
        results[name] = ensure_trained(stage, stage_dir)
        if results[name].get("preempted"):
            return {"preempted": True, "stage": name, "stages": results}
    table = summary_table(results)
    if logs.is_writer():
        runs.write_json(paths.join(workdir, "summary.json"), results)
        runs.write_text(paths.join(workdir, "summary.md"), table + "\n")
    out = {"preempted": False, "stages": results}
    if "cascade" in config:
        out["cascade"] = cascade_evaluate.evaluate_cascades(config, workdir)
    if "ensemble" in config:
        out["ensemble"] = ensemble_runner.run_ensemble(config, workdir)
    return out


def _sibling(config, name: str, ref: str, done: dict, workdir: str) -> str:
    """The workdir of the stage `ref` ("@stage") names, which must have run before stage `name`."""
    if ref[1:] not in done:
        raise config_lib.ConfigError(
            f"stage '{name}' reads '{ref}', which must run before it (stage_order: {list(config.stage_order)})."
        )
    return paths.join(workdir, ref[1:])


def final_summary(out: dict, name: str) -> str:
    """The table a run prints at its end (`out`: what run_experiment returned): a pipeline's stages (none
    when an ensemble or cascade config reuses existing runs: '', its own outputs are its report), or the
    one run's."""
    stages = out.get("stages", {name: out})
    return summary_table(stages) if stages else ""


def summary_table(results: dict) -> str:
    """A Markdown table: accuracy, FLOPs and parameters per example, agreement with the teacher."""
    rows = [
        "| stage | model | accuracy | ECE | MFLOPs/example | params | agreement with teacher | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        agree = f"{r['teacher_agreement']:.4f}" if "teacher_agreement" in r else "-"
        if "mlm_accuracy" in r:  # a masked-LM stage: the masked tokens' accuracy, no classes to calibrate
            accuracy, ece = f"{r['mlm_accuracy']:.4f} (masked tokens)", "-"
        else:
            accuracy, ece = f"{r['accuracy']:.4f}", f"{r['ece']:.4f}"
        rows.append(
            f"| {name} | {r['model']} | {accuracy} | {ece} | "
            f"{r['flops_per_example'] / 1e6:.3f} | {r['param_count']:,} | {agree} | "
            f"{r['train_time_s']:.0f}s |"
        )
    return "\n".join(rows)
