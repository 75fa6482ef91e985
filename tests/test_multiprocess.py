"""Real multi-process runs: 2 processes on 127.0.0.1 with 4 CPU devices each (gloo collectives).

The KD trainer on 2 processes x 4 devices ends with the same parameters as 1 process x 8 devices and
the same global batch; a 2-process run resumed from its step-3 checkpoint ends where the uninterrupted
one did; processes started with different configs stop with an error instead of hanging.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, digits_config

from titans import runs, train

WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes, devices_each, data_dir, workdir, teacher_dir, steps=6, lrs=None, timeout=300):
    """Starts the processes of one run; returns [(returncode, stdout, stderr)] in process order."""
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            TFDS_DATA_DIR=data_dir,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
        )
        if num_processes > 1:
            env.update(
                TITANS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                TITANS_NUM_PROCESSES=str(num_processes),
                TITANS_PROCESS_ID=str(pid),
            )
        args = [sys.executable, WORKER, data_dir, workdir, teacher_dir, str(steps)]
        if lrs is not None:
            args.append(str(lrs[pid]))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a multi-process run hung") from None
        out.append((p.returncode, stdout, stderr))
    return out


def _result(stdout):
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def _params(workdir):
    model, _, _, step = runs.load_model(workdir)
    return step, [np.asarray(x) for x in jax.tree.leaves(model.params)]


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mp_teacher"))
    train.train_and_evaluate(digits_config(data_dir, total_steps=40), workdir)
    return workdir


@pytest.fixture(scope="module")
def two_process_run(data_dir, teacher_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mp_2x4"))
    runs = _launch(2, 4, data_dir, workdir, teacher_dir)
    for rc, _, stderr in runs:
        assert rc == 0, stderr[-3000:]
    return workdir, [_result(stdout) for _, stdout, _ in runs]


def test_two_processes_equal_one_process(two_process_run, data_dir, teacher_dir, tmp_path):
    workdir, results = two_process_run
    assert [(r["process_index"], r["process_count"], r["devices"]) for r in results] == [(0, 2, 8), (1, 2, 8)]
    ((rc, stdout, stderr),) = _launch(1, 8, data_dir, str(tmp_path / "single"), teacher_dir)
    assert rc == 0, stderr[-3000:]
    single = _result(stdout)
    assert (single["process_count"], single["devices"]) == (1, 8)
    step_a, a = _params(workdir)
    step_b, b = _params(str(tmp_path / "single"))
    assert step_a == step_b == 6
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert results[0]["accuracy"] == results[1]["accuracy"] == pytest.approx(single["accuracy"], abs=1e-9)
    # Only process 0 writes: every logged step appears once.
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in line]
    assert steps == [2, 4, 6]


def test_two_process_run_resumes_from_its_checkpoint(two_process_run, data_dir, teacher_dir, tmp_path):
    workdir, _ = two_process_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # A crash after the step-3 checkpoint: the step-6 checkpoint and the results never got written.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "results.json"))
    runs = _launch(2, 4, data_dir, resumed, teacher_dir)
    for rc, _, stderr in runs:
        assert rc == 0, stderr[-3000:]
    assert "resum" in runs[0][2].lower() + runs[0][1].lower()
    _, a = _params(workdir)
    step, b = _params(resumed)
    assert step == 6
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_processes_with_different_configs_stop_with_an_error(data_dir, teacher_dir, tmp_path):
    runs = _launch(2, 4, data_dir, str(tmp_path / "bad"), teacher_dir, lrs=[0.1, 0.2], timeout=180)
    for rc, _, stderr in runs:
        assert rc != 0
        assert "ProcessMismatchError" in stderr and "differ in config" in stderr, stderr[-2000:]
