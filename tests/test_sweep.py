"""The sweep runner: expansion of product/zip/seeds, a real tiny local sweep, skip-finished, summary."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from titans import sweep


def test_expand_product_zip_seeds():
    runs = sweep.expand(
        {"product": {"a": [1, 2], "b": ["x", "y", "z"]}, "zip": {"c": [10, 20], "d": [0.1, 0.2]}, "seeds": [0, 1]}
    )
    assert len(runs) == 2 * 3 * 2 * 2
    assert runs[0] == {"a": 1, "b": "x", "c": 10, "d": 0.1, "seed": 0}
    assert all((r["c"], r["d"]) in {(10, 0.1), (20, 0.2)} for r in runs)  # zipped fields vary together
    assert len({tuple(sorted(r.items())) for r in runs}) == len(runs)
    assert sweep.expand({}) == [{}]
    assert sweep.expand({"seeds": [3], "seed_field": "stages.teacher.seed"}) == [{"stages.teacher.seed": 3}]
    assert sweep.run_name({"model.kwargs.hidden": (16, 32), "seed": 1}) == "model.kwargs.hidden=16-32,seed=1"


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"zip": {"a": [1, 2], "b": [1]}}, "equal length"),
        ({"product": {"a": []}}, "non-empty list"),
        ({"product": {"a": [1]}, "zip": {"a": [2]}}, "both product and zip"),
        ({"grid": {"a": [1]}}, "Unknown sweep keys"),
    ],
)
def test_bad_sweeps_are_refused(bad, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.expand(bad)


SWEEP_CONFIG = """
import os, sys
sys.path.insert(0, {repo!r})
from configs.digits import get_config as _digits

def get_config(arg=""):
    c = _digits()
    c.dataset.data_dir = {data_dir!r}
    c.total_steps = 10
    c.log_every_steps = 5
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = False
    return c

def get_sweep(arg=""):
    return {{"product": {{"optimizer.learning_rate": [0.1, 0.3]}}, "seeds": [0, 1]}}
"""


def _sweep_cmd(config, root, *extra):
    return subprocess.run(
        [sys.executable, "-m", "titans.sweep", f"--config={config}", f"--workdir={root}", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
    )


@pytest.mark.slow
def test_local_sweep_skips_finished_and_summarizes(data_dir, tmp_path):
    config = tmp_path / "sweep_cfg.py"
    config.write_text(SWEEP_CONFIG.format(repo=REPO, data_dir=data_dir))
    root = tmp_path / "root"
    # One run finished beforehand (by hand): the sweep must not redo it.
    first = _sweep_cmd(str(config), str(root), "--dry_run")
    assert first.returncode == 0, first.stderr
    commands = first.stdout.strip().splitlines()
    assert len(commands) == 4 and all("--config.optimizer.learning_rate=" in c for c in commands)
    proc = _sweep_cmd(str(config), str(root), "--parallel=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs: 0 already finished, 4 to run" in proc.stdout
    names = sorted(os.listdir(root))
    assert "optimizer.learning_rate=0.3,seed=1" in names
    cfg = json.load(open(root / "optimizer.learning_rate=0.3,seed=1" / "config.json"))
    assert cfg["optimizer"]["learning_rate"] == 0.3 and cfg["seed"] == 1
    summary = (root / "sweep_summary.md").read_text()
    assert "| optimizer.learning_rate=0.1 | 2 |" in summary and " ± " in summary
    data = json.load(open(root / "sweep.json"))
    accs = [
        json.load(open(root / f"optimizer.learning_rate=0.1,seed={s}" / "results.json"))["accuracy"] for s in (0, 1)
    ]
    row = next(r for r in data["summary"] if r["group"] == "optimizer.learning_rate=0.1")
    assert row["accuracy"]["mean"] == pytest.approx(sum(accs) / 2) and row["accuracy"]["n"] == 2
    again = _sweep_cmd(str(config), str(root))
    assert again.returncode == 0 and "4 runs: 4 already finished, 0 to run" in again.stdout
    assert "[finished]" in _sweep_cmd(str(config), str(root), "--dry_run").stdout
    # Other --set values make other runs: never reported as finished because the old ones were.
    other = _sweep_cmd(str(config), str(root), "--set=batch_size=32", "--dry_run")
    assert other.returncode == 0 and "[finished]" not in other.stdout
    assert all("batch_size=32" in line.split("--workdir=")[1].split()[0] for line in other.stdout.splitlines())


def test_sweep_cli_errors_and_tpu_commands(tmp_path):
    cfg = os.path.join(REPO, "configs", "digits.py")
    bad = _sweep_cmd(cfg, str(tmp_path), "--set=optimizer.lr=0.1", "--dry_run")
    assert bad.returncode != 0 and "Did you mean: optimizer.learning_rate" in bad.stderr
    none = _sweep_cmd(os.path.join(REPO, "configs", "quickstart.py"), str(tmp_path), "--dry_run")
    assert none.returncode != 0 and "defines no get_sweep" in none.stderr
    tpu = _sweep_cmd(cfg, "gs://b/sw", "--tpu=sweep", "--zone=us-central2-b")
    assert tpu.returncode == 0, tpu.stderr
    lines = tpu.stdout.strip().splitlines()
    assert len(lines) == 8 and lines[0].startswith(
        "launch/tpu.sh run --name=sweep-0 --zone=us-central2-b --config=" + cfg
    )
    assert "--workdir=gs://b/sw/optimizer.learning_rate=0.05,model.kwargs.hidden=16,batch_size=32,seed=0" in lines[0]
    assert lines[0].endswith(
        "-- --config.optimizer.learning_rate=0.05 '--config.model.kwargs.hidden=(16,)' "
        "--config.batch_size=32 --config.seed=0"
    )
    local = _sweep_cmd(cfg, str(tmp_path), "--tpu=sweep", "--zone=us-central2-b")
    assert local.returncode != 0 and "gs://" in local.stderr
