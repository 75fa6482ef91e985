"""Workdirs in a bucket (gs://...), against a local GCS emulator (tests/gcs.py): a run trains, is killed
with SIGKILL, resumes exactly, and every file it writes is in the bucket, none on the local disk. The
checksum and finished-run checks run on the bucket's objects."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from gcs import emulator, environment
from helpers import REPO

from titans import checkpoint as ckpt_lib
from titans import paths, runs, sweep

COMMON = [
    "--config.total_steps=60",
    "--config.checkpoint.every_steps=10",
    "--config.log_every_steps=5",
    "--config.schedule.name=constant",
]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with emulator(str(tmp_path_factory.mktemp("gcs"))) as (env, bucket):
        yield env, bucket


def _train_cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "titans.main",
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        *COMMON,
        *extra,
    ]


def _env(gcs_env):
    return {**os.environ, **gcs_env, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}


def _params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(runs.RunDir(workdir).load_model().params))]


def _run_until(cmd, env, cwd, step):
    """Starts `cmd`, reads its progress lines until step >= `step`, then kills it with SIGKILL."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "step " in line and "/60 " in line and int(line.split("step ")[1].split("/")[0]) >= step:
            break
    proc.kill()
    proc.communicate(timeout=60)
    return "".join(out)


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_exactly_and_writes_only_to_the_bucket(gcs, data_dir, tmp_path):
    env_vars, bucket = gcs
    env = _env(env_vars)
    straight = str(tmp_path / "straight")
    done = subprocess.run(_train_cmd(straight, data_dir), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    cwd = tmp_path / "cwd"  # the remote run's working directory: it must stay empty
    cwd.mkdir()
    url = f"gs://{bucket}/runs/digits"
    out = _run_until(_train_cmd(url, data_dir), env, cwd, 35)
    assert "step 35/60" in out or "step 40/60" in out, out[-3000:]
    resumed = subprocess.run(_train_cmd(url, data_dir), cwd=cwd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step" in resumed.stdout

    assert list(cwd.iterdir()) == []
    assert not os.path.exists(os.path.join(REPO, "gs:")) and not os.path.exists(os.path.join(str(cwd), "gs:"))
    with environment(env_vars):
        files = paths.files_under(url)
        for name in ("config.json", "results.json", "metrics.jsonl", "checkpoints_sha256/60.json"):
            assert name in files, files
        assert any(f.startswith("checkpoints/60/model/") for f in files)
        assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
        for a, b in zip(_params(straight), _params(url)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_checksums_and_finished_runs_are_checked_in_the_bucket(gcs, data_dir, tmp_path):
    env_vars, bucket = gcs
    env = _env(env_vars)
    url = f"gs://{bucket}/runs/checked"
    first = subprocess.run(_train_cmd(url, data_dir), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]

    other = subprocess.run(
        _train_cmd(url, data_dir, "--config.optimizer.learning_rate=0.5"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0
    assert "finished run of another config" in other.stderr and "optimizer.learning_rate" in other.stderr

    with environment(env_vars):
        step_dir = f"{url}/checkpoints/60/model"
        victim = max(paths.files_under(step_dir), key=lambda f: len(paths.resolve(f"{step_dir}/{f}").read_bytes()))
        blob = bytearray(paths.resolve(f"{step_dir}/{victim}").read_bytes())
        blob[len(blob) // 2] ^= 0x01
        paths.resolve(f"{step_dir}/{victim}").write_bytes(bytes(blob))
        with pytest.raises(ckpt_lib.CorruptCheckpointError, match=os.path.basename(victim)):
            runs.RunDir(url).load_model()


def test_a_tpu_sweep_keeps_its_gs_workdirs():
    """`titans-sweep --tpu` prints jobs whose workdirs are the bucket's, not a local `./gs:/...`."""
    planned = sweep.plan(os.path.join(REPO, "configs", "digits.py"), "gs://b/sweep", {})
    assert planned and all(r["workdir"].startswith("gs://b/sweep/") for r in planned)
    jobs = sweep.tpu_commands(planned, "tpu", "zone", "configs/digits.py", {})
    assert all("--workdir=gs://b/sweep/" in job for job in jobs)
    assert paths.text("gs://b/run/") == "gs://b/run" and runs.RunDir("gs://b/run").file("x") == "gs://b/run/x"
