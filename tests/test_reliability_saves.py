"""Issue 31's promises about saves, finished runs, locks and collected results (docs/reliability.md):
each test reproduced the failure an adversarial user found, and passes now.

- a step counts as saved only once its checksums are recorded, right after orbax commits it; a step
  without them is refused, and an automatic resume falls back to the newest verified step;
- a second SIGTERM does not lose the preemption checkpoint; tmp directories of interrupted saves go;
- a finished run is not reported for another config; a sweep does not skip a run of another config;
- deleting the lock file does not let a second job in; collect refuses links and bad paths;
- a misspelt model.kwargs override and a NaN temperature are refused with clear errors.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, digits_config, flip_largest_file

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import locks, runs, sweep, train
from titans.results import __main__ as results_cli
from titans.results import studies


def _params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(runs.RunDir(workdir).load_model().params))]


# ------------------------------------------------------------------- checksums part of the save


def test_checksums_are_recorded_when_orbax_commits_not_at_the_next_save(tmp_path):
    """An async save is hashed as soon as it is committed, by a thread of its own; before, the hash was
    taken only at the next save or at close, so a crash in between left the newest step unverified."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
    tree = {"w": jnp.arange(1000.0)}
    ckpt.save(7, model=tree, train={"step": jnp.int32(7)}, loader={"pos": 0}, meta={"fields": {}})
    deadline = time.monotonic() + 30
    while not os.path.exists(tmp_path / "checkpoints_sha256" / "7.json") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(tmp_path / "checkpoints_sha256" / "7.json")  # wait() was never called
    assert ckpt.verified_steps() == [7]
    ckpt.close()


def test_an_unverified_newest_step_is_not_resumed_from(data_dir, tmp_path, caplog):
    """After a crash between orbax's commit and the hashing, the newest step has no checksums; a byte
    flipped there used to be resumed from with only a warning. Now the run resumes from the newest
    verified step (the unverified one is moved aside, kept) and ends where an uninterrupted run ends."""
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(digits_config(data_dir), straight)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(digits_config(data_dir), workdir)  # saves 20 and 40
    os.remove(os.path.join(workdir, "results.json"))  # as if killed after the save of step 40
    os.remove(os.path.join(workdir, "checkpoints_sha256", "40.json"))  # ... before it was hashed
    flip_largest_file(os.path.join(workdir, "checkpoints", "40", "model"))

    with pytest.raises(ckpt_lib.UnverifiedCheckpointError, match="no recorded checksums"):
        runs.RunDir(workdir).load_model(step=40)
    train.train_and_evaluate(digits_config(data_dir), workdir)
    assert "newest verified" in caplog.text
    for a, b in zip(_params(straight), _params(workdir)):
        np.testing.assert_array_equal(a, b)
    moved = os.listdir(os.path.join(workdir, "checkpoints_superseded"))
    assert os.listdir(os.path.join(workdir, "checkpoints_superseded", moved[0])) == ["40"]


def test_an_unverified_step_is_read_only_when_allowed(data_dir, tmp_path, caplog):
    workdir = str(tmp_path)
    train.train_and_evaluate(digits_config(data_dir), workdir)
    os.remove(os.path.join(workdir, "checkpoints_sha256", "40.json"))
    c = digits_config(data_dir, **{"checkpoint.restore_step": 40, "total_steps": 60})
    c.checkpoint.allow_changes = "total_steps"
    with pytest.raises(ckpt_lib.UnverifiedCheckpointError):
        train.train_and_evaluate(c, workdir)
    c.checkpoint.allow_unverified = True
    assert train.train_and_evaluate(c, workdir)["steps"] == 60
    assert "reading it unverified as asked" in caplog.text


def test_tmp_directories_of_interrupted_saves_are_removed(data_dir, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(digits_config(data_dir), workdir)
    left = tmp_path / "checkpoints" / "60.orbax-checkpoint-tmp-1796668790123456"
    (left / "model").mkdir(parents=True)
    (left / "model" / "half_written").write_bytes(b"x" * 100)
    ckpt_lib.Checkpointer(workdir).close()
    assert not left.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]


# --------------------------------------------------------------------------- a second SIGTERM

_DOUBLE_SIGTERM = """
import os, signal, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from helpers import digits_config
from titans import checkpoint, train
calls = {"n": 0, "again": False}
agreed = train.PreemptionGuard.agreed
def first(self):
    calls["n"] += 1
    if calls["n"] == 25:
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's SIGTERM
    return agreed(self)
save, wait = checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait
def saving(self, step, **items):
    save(self, step, **items)
    calls["saved"] = step
def second(self):
    if calls.get("saved") == 25 and not calls["again"]:
        calls["again"] = True
        os.kill(os.getpid(), signal.SIGTERM)  # ... and again, while the preemption save is waited on
    return wait(self)
train.PreemptionGuard.agreed = first
checkpoint.Checkpointer.save = saving
checkpoint.Checkpointer.wait = second
c = digits_config(sys.argv[2], **{"checkpoint.async_save": True})
print(train.train_and_evaluate(c, sys.argv[3]), flush=True)
"""


def test_a_second_sigterm_does_not_lose_the_preemption_checkpoint(data_dir, tmp_path):
    """The guard used to restore the default SIGTERM handler before waiting for the save, so a second
    SIGTERM killed the process mid-save (rc -15, no checkpoint of the last step, a tmp dir left)."""
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.run(
        [sys.executable, "-c", _DOUBLE_SIGTERM, REPO, data_dir, workdir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'preempted': True, 'step': 25" in p.stdout
    assert "SIGTERM received again" in p.stderr
    assert ckpt_lib.Checkpointer(workdir, read_only=True).verified_steps() == [20, 25]
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


# ------------------------------------------------------------------------ finished runs, sweeps


def test_a_finished_run_is_not_reported_for_another_config(data_dir, tmp_path):
    """Rerunning a finished run with another learning rate and seed used to print "already finished"
    and return the old results under the new config."""
    workdir = str(tmp_path)
    first = train.train_and_evaluate(digits_config(data_dir), workdir)
    other = digits_config(data_dir, **{"optimizer.learning_rate": 0.5, "seed": 3})
    with pytest.raises(ckpt_lib.ResumeMismatchError, match=r"optimizer\.learning_rate.*seed|seed.*learning_rate"):
        train.train_and_evaluate(other, workdir)
    with pytest.raises(ckpt_lib.ResumeMismatchError, match="finished run of another config"):
        train.ensure_trained(other, workdir)  # how pipelines, ensembles and active runs read a stage back
    assert train.train_and_evaluate(digits_config(data_dir), workdir) == first


_SWEEP_CONFIG = """
from titans import config as config_lib
def get_config(arg="0.1"):
    c = config_lib.base_config()
    c.optimizer.learning_rate = float(arg)
    return c
def get_sweep(arg="0.1"):
    return {"seeds": [0, 1]}
"""


def test_a_sweep_skips_only_runs_of_the_same_config_file_and_arg(tmp_path):
    """A sweep rerun after its config file or ARG changed used to report "0 to run" and a stale summary."""
    cfg = tmp_path / "sweep_cfg.py"
    cfg.write_text(_SWEEP_CONFIG)
    root = str(tmp_path / "sweep")
    planned = sweep.plan(f"{cfg}:0.1", root, {})
    for run in planned:  # as a finished sweep leaves them
        os.makedirs(run["workdir"])
        runs.write_json(os.path.join(run["workdir"], "results.json"), {"accuracy": 0.5})
        runs.write_json(os.path.join(run["workdir"], "sweep_run.json"), run["identity"])
    assert all(sweep._finished(r) for r in sweep.plan(f"{cfg}:0.1", root, {}))
    assert not any(sweep._finished(r) for r in sweep.plan(f"{cfg}:0.2", root, {}))
    cfg.write_text(_SWEEP_CONFIG.replace("float(arg)", "float(arg) * 2"))
    assert not any(sweep._finished(r) for r in sweep.plan(f"{cfg}:0.1", root, {}))
    table, rows = sweep.summarize(planned, {r["name"]: "failed (exit 1)" for r in planned})
    assert rows[0]["seeds"] == 0  # a run that failed this time is not reported from its old results


# ------------------------------------------------------------------------------------- the lock


def test_deleting_the_lock_file_does_not_let_a_second_job_in(tmp_path, caplog):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from titans import locks; "
            "lock = locks.WorkdirLock(sys.argv[2], 'training').acquire(); print('locked', flush=True); "
            "sys.stdin.readline(); lock.check(); print('checked', flush=True); time.sleep(60)",
            REPO,
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.remove(tmp_path / locks.LOCK_NAME)
        with pytest.raises(locks.WorkdirLockedError):
            locks.WorkdirLock(str(tmp_path), "training").acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "checked"
        assert json.loads((tmp_path / locks.LOCK_NAME).read_text())["pid"] == holder.pid  # written again
    finally:
        holder.kill()
        holder.wait()
    with locks.WorkdirLock(str(tmp_path), "training"):  # free once the holder is gone
        pass


# --------------------------------------------------------------------------------- collect


def _finished_run(path):
    os.makedirs(path)
    for name in studies.STUDIES["active_fmnist"].files:
        with open(os.path.join(path, name), "w") as f:
            json.dump({"x": 1.0}, f)


def test_collect_refuses_links_and_bad_destinations(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "results" / "active_fmnist").mkdir(parents=True)
    study = studies.STUDIES["active_fmnist"]
    run = str(tmp_path / "run")
    _finished_run(run)
    assert studies.collect(study, run, "seed0", root=str(root))

    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": 1}')
    linked = str(tmp_path / "linked")
    _finished_run(linked)
    os.remove(os.path.join(linked, study.files[0]))
    os.symlink(outside, os.path.join(linked, study.files[0]))
    with pytest.raises(studies.CollectError, match="symbolic link"):
        studies.collect(study, linked, "seed1", root=str(root))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "results" / "active_fmnist" / "seed2")
    with pytest.raises(studies.CollectError, match="symbolic link"):
        studies.collect(study, run, "seed2", root=str(root))
    assert list(elsewhere.iterdir()) == []

    for bad in ("..", "../seed0", "/tmp/seed0", "a/../seed0", "notaseed"):
        with pytest.raises(studies.CollectError, match="dest must be"):
            studies.collect(study, run, bad, root=str(root))
    assert results_cli.cli(["collect", "active_fmnist", run, ".."]) == 2
    assert "dest must be" in capsys.readouterr().err


# ------------------------------------------------------------------------------- validation


def test_a_misspelt_model_kwargs_override_names_the_arguments(data_dir):
    c = digits_config(data_dir)
    with pytest.raises(config_lib.ConfigError, match="model.kwargs.hiddn is not an argument.*Did you mean: hidden"):
        config_lib.check_override(c, "model.kwargs.hiddn")
    config_lib.check_override(c, "model.kwargs.hidden")  # a field the config sets
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "titans.main",
            "--config=configs/digits.py",
            "--workdir=/tmp/never",
            "--config.model.kwargs.hiddn=(8,)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Did you mean: hidden" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_a_non_finite_temperature_is_refused(data_dir, value):
    c = digits_config(data_dir)
    c.distill.temperature = value
    with pytest.raises(config_lib.ConfigError, match="distill.temperature"):
        config_lib.validate(c)
