"""Ablation sweeps: every combination of a config's sweep, each run in its own workdir, then a summary.

    python -m titans.sweep --config=configs/fmnist_student.py:workdirs/teacher --workdir=workdirs/kd_sweep --parallel=2
    python -m titans.sweep --config=configs/digits.py --workdir=/tmp/sw --set=total_steps=50 --dry_run
    python -m titans.sweep --config=configs/digits.py --workdir=gs://B/sw --tpu=NAME --zone=ZONE   # print TPU jobs

The config file defines the sweep next to `get_config`:

    def get_sweep(arg):
        return {"product": {"distill.temperature": [1, 2, 4], "distill.alpha": [0.5, 0.9]},
                "zip": {"model.kwargs.channels": [(4, 8), (8, 16)], "model.kwargs.dense": [16, 32]},
                "seeds": [0, 1, 2]}

`product` fields are crossed, `zip` fields vary together (equal-length lists), and each combination runs
once per seed (the `seed` field, or `seed_field`). Each run is `python -m titans.main` in
WORKDIR/<run name> with `--config.FIELD=VALUE` overrides, so a run can be redone by hand with the
command printed in WORKDIR/sweep.json. A finished run is skipped only when it was made by this sweep's
same config file content, ARG and overrides (recorded in its sweep_run.json); otherwise it is run again,
and the trainer then either reads it back (the resolved config is the same) or refuses it, listing the
fields that differ. So rerunning the sweep continues it; `--parallel=N` runs N at a time. At the end WORKDIR/sweep_summary.md holds a
table: per combination, mean ± sd over seeds of the final metrics.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from shlex import join, quote

import numpy as np

from titans import cli as cli_lib
from titans import config as config_lib
from titans import locks, paths
from titans import runs as titans_runs


def parser() -> cli_lib.ArgumentParser:
    p = cli_lib.parser("titans-sweep", __doc__)
    p.add_argument("--config", required=True, help="config file with get_sweep(arg), e.g. configs/digits.py[:ARG]")
    p.add_argument("--workdir", required=True, help="root directory: one sub-directory per run")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (local mode)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override applied to every run (repeatable)"
    )
    p.add_argument("--dry_run", action="store_true", help="print the runs' commands and exit")
    p.add_argument(
        "--tpu", default="", help="print one launch/tpu.sh job per run instead of running locally; TPU VMs <tpu>-<i>"
    )
    p.add_argument("--zone", default="", help="zone of the TPU VMs (with --tpu)")
    return p


METRICS = ("accuracy", "loss", "ece", "teacher_agreement")


class SweepError(ValueError):
    """A malformed sweep definition."""


def expand(sweep: dict) -> list[dict]:
    """The runs of a sweep: a list of {field: value} override dicts (seed included), in a stable order."""
    unknown = set(sweep) - {"product", "zip", "seeds", "seed_field"}
    if unknown:
        raise SweepError(f"Unknown sweep keys {sorted(unknown)}; expected product, zip, seeds, seed_field.")
    product = dict(sweep.get("product", {}))
    zipped = dict(sweep.get("zip", {}))
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zip fields need lists of equal length, got {lengths}")
    both = set(product) & set(zipped)
    if both:
        raise SweepError(f"fields {sorted(both)} are in both product and zip")
    for k, v in {**product, **zipped}.items():
        if not isinstance(v, (list, tuple)) or not v:
            raise SweepError(f"sweep field {k!r} needs a non-empty list of values, got {v!r}")
    zip_rows = [dict(zip(zipped, vals)) for vals in zip(*zipped.values())] if zipped else [{}]
    prod_rows = [dict(zip(product, vals)) for vals in itertools.product(*product.values())] if product else [{}]
    seeds = list(sweep.get("seeds", [None]))
    seed_field = sweep.get("seed_field", "seed")
    runs = []
    for p in prod_rows:
        for z in zip_rows:
            for s in seeds:
                run = {**p, **z}
                if s is not None:
                    run[seed_field] = s
                runs.append(run)
    return runs


def run_name(overrides: dict, seed_field: str = "seed") -> str:
    """A directory name from the overrides, e.g. ``distill.temperature=2,seed=0``."""
    parts = [f"{k}={_fmt(v)}" for k, v in overrides.items() if k != seed_field]
    if seed_field in overrides:
        parts.append(f"{seed_field}={overrides[seed_field]}")
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(map(str, value))
    return str(value)


def _override_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        value = (
            "(" + ",".join(map(repr, v)) + ("," if len(v) == 1 else "") + ")"
            if isinstance(v, (list, tuple))
            else str(v)
        )
        out.append(f"--config.{k}={value}")
    return out


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--set needs FIELD=VALUE, got {item!r}")
        out[key] = value
    return out


def load_sweep(config_spec: str) -> tuple[dict, object]:
    """(sweep dict, the base config) of a config file that defines get_sweep(arg)."""
    path, _, arg = config_spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location("titans_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(arg); add one (see titans/sweep.py) to sweep it.")
    sweep = module.get_sweep(arg) if arg else module.get_sweep()
    return sweep, module.get_config(arg) if arg else module.get_config()


def plan(config_spec: str, root: str, sets: dict) -> list[dict]:
    """Every run: name, workdir, overrides, and the exact command."""
    sweep, base = load_sweep(config_spec)
    seed_field = sweep.get("seed_field", "seed")
    path, _, arg = config_spec.partition(":")
    with open(path, "rb") as f:
        config_sha = hashlib.sha256(f.read()).hexdigest()
    runs = []
    for overrides in expand(sweep):
        for field in list(overrides) + list(sets):
            config_lib.check_override(base, field)  # a typo names the field and its close matches
        # --set values are part of a run's identity: a rerun with other --set values is another run,
        # never "already finished" because a run with the old values finished.
        name = run_name({**overrides, **sets}, seed_field)
        workdir = paths.join(root, name)
        cmd = [
            sys.executable,
            "-m",
            "titans.main",
            f"--config={config_spec}",
            f"--workdir={workdir}",
            *_override_args(overrides),
            *(f"--config.{k}={v}" for k, v in sets.items()),
        ]
        runs.append(
            {
                "name": name,
                "workdir": workdir,
                "overrides": overrides,
                "command": cmd,
                "group": run_name({k: v for k, v in {**overrides, **sets}.items() if k != seed_field}, seed_field),
                # What made the run: a finished run is skipped only when all of this is unchanged.
                "identity": json.loads(
                    json.dumps(
                        {"config_sha256": config_sha, "arg": arg, "overrides": overrides, "sets": sets}, default=str
                    )
                ),
            }
        )
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("two runs of the sweep got the same name; make the swept values distinct")
    return runs


def _finished(run) -> bool:
    """The run finished, and was made by the same config file content, ARG and overrides."""
    record = titans_runs.read_json(paths.join(run["workdir"], "sweep_run.json"))
    return paths.exists(paths.join(run["workdir"], "results.json")) and record == run["identity"]


def _run_one(run) -> int:
    """Runs one run's command, its output appended to WORKDIR/<run>/sweep.log (uploaded afterwards when the
    workdir is in a bucket); on success records what made it (sweep_run.json)."""
    paths.makedirs(run["workdir"])
    log_path = paths.join(run["workdir"], "sweep.log")
    if paths.is_remote(log_path):
        with tempfile.TemporaryFile("w+") as log:
            rc = subprocess.call(run["command"], stdout=log, stderr=subprocess.STDOUT)
            log.seek(0)
            paths.append_text(log_path, log.read())
    else:
        with open(log_path, "a") as log:
            rc = subprocess.call(run["command"], stdout=log, stderr=subprocess.STDOUT)
    if rc == 0:
        titans_runs.write_json(paths.join(run["workdir"], "sweep_run.json"), run["identity"])
    return rc


def run_local(runs: list[dict], parallel: int) -> dict:
    """Runs the unfinished runs, `parallel` at a time; returns {name: 'finished'|'skipped'|'failed (rc)'}."""
    status = {r["name"]: "skipped" for r in runs if _finished(r)}
    todo = [r for r in runs if r["name"] not in status]
    print(
        f"[sweep] {len(runs)} runs: {len(status)} already finished, {len(todo)} to run, {parallel} at a time",
        flush=True,
    )
    t0 = time.time()

    def one(run):
        return run["name"], _run_one(run)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for done, (name, rc) in enumerate(pool.map(one, todo), 1):
            status[name] = "finished" if rc == 0 else f"failed (exit {rc}; see {name}/sweep.log)"
            elapsed = time.time() - t0
            eta = elapsed / done * (len(todo) - done)
            print(
                f"[sweep] {done}/{len(todo)} {name}: {status[name]} | {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                flush=True,
            )
    return status


def summarize(runs: list[dict], status: dict | None = None) -> tuple[str, list[dict]]:
    """Markdown table and rows: per group (the overrides without the seed), mean ± sd over seeds. With
    `status` (from `run_local`), a run that failed this time is left out even if an older results.json
    is there, so the table never reports another config's results."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        result = titans_runs.read_json(paths.join(run["workdir"], "results.json"))
        if result is not None and (status is None or not status.get(run["name"], "").startswith("failed")):
            groups.setdefault(run["group"], []).append(result)
        else:
            groups.setdefault(run["group"], [])
    metrics = [m for m in METRICS if any(m in r for rs in groups.values() for r in rs)]
    lines = ["| run | seeds done | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    rows = []
    for group, results in groups.items():
        row = {"group": group, "seeds": len(results)}
        cells = []
        for m in metrics:
            values = np.array([r[m] for r in results if m in r], float)
            if len(values):
                sd = values.std(ddof=1) if len(values) > 1 else 0.0
                row[m] = {"mean": float(values.mean()), "sd": float(sd), "n": int(len(values))}
                cells.append(f"{values.mean():.4f} ± {sd:.4f}")
            else:
                cells.append("-")
        rows.append(row)
        lines.append(f"| {group} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def tpu_commands(runs: list[dict], tpu: str, zone: str, config_spec: str, sets: dict) -> list[str]:
    """One `launch/tpu.sh run` per run, on TPU VMs <tpu>-0, <tpu>-1, ... (create them first)."""
    out = []
    for i, run in enumerate(runs):
        args = [
            "launch/tpu.sh",
            "run",
            f"--name={tpu}-{i}",
            f"--zone={zone}",
            f"--config={config_spec}",
            f"--workdir={run['workdir']}",
            f"--run_name={i}",
            "--",
            *_override_args(run["overrides"]),
            *(f"--config.{k}={v}" for k, v in sets.items()),
        ]
        out.append(" ".join(quote(a) for a in args))
    return out


def main(args) -> None:
    try:
        sets = _parse_sets(args.set)
        runs = plan(args.config, args.workdir, sets)
    except (SweepError, config_lib.ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.tpu:
        if not args.zone:
            raise SystemExit("error: --tpu needs --zone")
        if not args.workdir.startswith("gs://"):
            raise SystemExit("error: with --tpu, --workdir must be a gs:// path")
        print("\n".join(tpu_commands(runs, args.tpu, args.zone, args.config, sets)))
        return
    if args.dry_run:
        for run in runs:
            print(("[finished] " if _finished(run) else "") + join(run["command"]))
        return
    paths.makedirs(args.workdir)
    try:
        with locks.WorkdirLock(args.workdir, "sweep"):
            status = run_local(runs, args.parallel)
            table, rows = summarize(runs, status)
            titans_runs.write_text(paths.join(args.workdir, "sweep_summary.md"), table + "\n")
            records = json.loads(json.dumps([{**r, "status": status[r["name"]]} for r in runs], default=str))
            titans_runs.write_json(paths.join(args.workdir, "sweep.json"), {"runs": records, "summary": rows})
    except locks.WorkdirLockedError as e:
        raise SystemExit(f"error: {e}") from None
    print("\n" + table)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")


def cli(argv: list[str] | None = None) -> None:
    main(parser().parse_args(argv))


if __name__ == "__main__":
    cli(sys.argv[1:])
