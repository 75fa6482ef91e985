"""What Titans promises about a run's life (docs/reliability.md): no hang on any exit path, honest
exit codes, nothing non-finite saved, exact resume from any saved step, one job per workdir, no silent
change of config or teacher on resume, atomic and truthful run files, checksummed checkpoints.

Each test reproduces a failure that an adversarial user found (issue 15), then shows it fixed."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import REPO, digits_config, flip_byte, flip_largest_file

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import locks, models, runs, train
from titans.analyze import plots


def _params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(runs.RunDir(workdir).load_model().params))]


def _cli(workdir, data_dir, *overrides, timeout=300):
    args = [
        sys.executable,
        "-m",
        "titans.main",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        *overrides,
    ]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------- 1. failed save: no hang


def _make_unwritable(path) -> callable:
    """Makes a directory refuse new entries, for root too (chattr +i; chmod for other users).
    Returns the function that undoes it; skips the test where neither works."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only for root here (no chattr +i)")
    return lambda: subprocess.run([chattr, "-i", str(path)], check=True)


def test_failed_checkpoint_write_ends_the_process_promptly(data_dir, tmp_path):
    """A checkpoint that cannot be written (checkpoints/ read-only) fails the run with a non-zero exit
    code and the cause, at once; it used to print the error and then block forever at exit on orbax's
    background threads."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    undo = _make_unwritable(workdir / "checkpoints")
    try:
        t0 = time.monotonic()
        proc = _cli(str(workdir), data_dir, "--config.checkpoint.every_steps=50", timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        undo()
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert "Error" in proc.stderr and ("ermission" in proc.stderr or "not permitted" in proc.stderr)
    assert elapsed < 120


# -------------------------------------------------------------- 2. SIGTERM at a checkpoint step


def test_preemption_right_after_a_periodic_save_is_a_clean_stop(data_dir, tmp_path, monkeypatch):
    """SIGTERM observed at a step that was just checkpointed: one save, a clean preempted result."""
    calls = {"n": 0}

    def agreed(self):
        calls["n"] += 1
        return calls["n"] >= 20  # step 20 is a checkpoint step of digits_config

    monkeypatch.setattr(train.PreemptionGuard, "agreed", agreed)
    out = train.train_and_evaluate(digits_config(data_dir), str(tmp_path))
    assert out == {"preempted": True, "step": 20}
    assert runs.RunDir(str(tmp_path)).checkpoint_steps() == [20]


# --------------------------------------------------------------------- 3. only finite states saved


def test_an_overflowing_update_is_never_saved(data_dir, tmp_path):
    """Step 0's loss and gradients are finite but its update overflows the parameters. Only the
    loss and gradient norm used to be checked, so step 1 was saved with inf parameters and the workdir
    could never resume. Now the update itself is checked and nothing is saved."""
    c = digits_config(data_dir, total_steps=10, **{"checkpoint.every_steps": 1, "log_every_steps": 1})
    c.optimizer.learning_rate = 1e38
    c.optimizer.momentum = 0.0
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "constant"
    with pytest.raises(train.NonFiniteLossError, match="at step 0"):
        train.train_and_evaluate(c, str(tmp_path))
    assert runs.RunDir(str(tmp_path)).checkpoint_steps() == []


# ------------------------------------------------------------------- 4. restore_step continues


def test_restore_step_continues_through_later_saved_steps(data_dir, tmp_path):
    """Restarting from an earlier saved step used to crash when the run reached the next step that
    was already saved. Now the later steps are moved aside (kept, not deleted) and the run continues
    to the same parameters as the first time (the data order is a function of the step)."""
    workdir = str(tmp_path)
    c = digits_config(data_dir)  # saves 20 and 40
    train.train_and_evaluate(c, workdir)
    first = _params(workdir)
    c.checkpoint.restore_step = 20
    train.train_and_evaluate(c, workdir)
    for a, b in zip(first, _params(workdir)):
        np.testing.assert_array_equal(a, b)
    moved = os.listdir(os.path.join(workdir, "checkpoints_superseded"))
    assert len(moved) == 1
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_superseded", moved[0]))) == ["40", "40.sha256.json"]


# ------------------------------------------------------------------------------ 5. workdir lock


def test_a_second_job_on_a_locked_workdir_is_refused(data_dir, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from titans import locks; "
            "lock = locks.WorkdirLock(sys.argv[2], 'training').acquire(); print('locked', flush=True); time.sleep(60)",
            REPO,
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(locks.WorkdirLockedError, match=f"pid {holder.pid}"):
            train.train_and_evaluate(digits_config(data_dir), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def test_a_lock_left_by_a_dead_job_is_taken_over(tmp_path, caplog):
    (tmp_path / locks.LOCK_NAME).write_text(json.dumps({"what": "training", "host": "h", "pid": 999999}))
    with locks.WorkdirLock(str(tmp_path), "training"):
        pass
    assert "Took over the lock" in caplog.text and "999999" in caplog.text


# ------------------------------------------------------------- 6. the teacher a student learns from


def _teacher(data_dir, workdir, steps):
    c = digits_config(data_dir, total_steps=steps)
    return train.train_and_evaluate(c, workdir)


def _student(data_dir, teacher_dir, **overrides):
    c = digits_config(data_dir, **overrides)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    return c


def test_student_resume_keeps_its_teacher(data_dir, tmp_path):
    """The teacher's step and variables' SHA-256 are pinned in the student's checkpoint meta. After
    the teacher trained further, a resumed student still distils from the pinned step; once that step
    is gone, the resume is refused instead of silently switching teachers mid-run."""
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    _teacher(data_dir, teacher_dir, 40)
    c = _student(data_dir, teacher_dir, total_steps=20)
    train.train_and_evaluate(c, student_dir)
    meta = ckpt_lib.Checkpointer(student_dir, read_only=True).read_meta(20)
    assert meta["teacher"]["step"] == 40 and len(meta["teacher"]["variables_sha256"]) == 64
    t = digits_config(data_dir, total_steps=60, **{"checkpoint.allow_changes": "total_steps"})
    train.train_and_evaluate(t, teacher_dir)  # the teacher's latest checkpoint is now step 60
    c.total_steps = 40
    c.checkpoint.allow_changes = "total_steps"
    assert train.train_and_evaluate(c, student_dir)["teacher_step"] == 40
    os.rename(os.path.join(teacher_dir, "checkpoints", "40"), str(tmp_path / "teacher_step_40_gone"))
    c.total_steps = 60
    with pytest.raises(ckpt_lib.ResumeMismatchError, match="teacher.*step 40"):
        train.train_and_evaluate(c, student_dir)


def test_unfinished_teacher_is_refused_unless_allowed(data_dir, tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    _teacher(data_dir, teacher_dir, 40)
    os.remove(os.path.join(teacher_dir, "results.json"))  # as if it were still training
    with pytest.raises(runs.UnfinishedTeacherError, match="distill.allow_unfinished_teacher"):
        train.train_and_evaluate(_student(data_dir, teacher_dir, total_steps=10), str(tmp_path / "s1"))
    c = _student(data_dir, teacher_dir, total_steps=10)
    c.distill.allow_unfinished_teacher = True
    assert train.train_and_evaluate(c, str(tmp_path / "s2"))["teacher_step"] == 40


# ------------------------------------------------------------------- 7. changed config on resume


def test_resume_with_a_changed_config_is_refused_unless_allowed(data_dir, tmp_path):
    workdir = str(tmp_path)
    c = digits_config(data_dir, total_steps=20)
    train.train_and_evaluate(c, workdir)
    c.total_steps, c.optimizer.learning_rate, c.seed = 40, 0.5, 3
    with pytest.raises(ckpt_lib.ResumeMismatchError, match="optimizer.learning_rate.*seed.*total_steps"):
        train.train_and_evaluate(c, workdir)
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 20  # not overwritten
    c.optimizer.learning_rate, c.seed = 0.1, 0
    c.checkpoint.allow_changes = "total_steps"
    assert train.train_and_evaluate(c, workdir)["steps"] == 40
    changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
    assert changes[-1]["step"] == 20 and changes[-1]["changes"] == {"total_steps": [20, 40]}


# ----------------------------------------------------------- 8. truthful, atomic run files


def test_rerunning_a_finished_run_leaves_its_results_alone(data_dir, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(digits_config(data_dir), workdir)
    path = os.path.join(workdir, "results.json")
    before = open(path).read()
    again = train.train_and_evaluate(digits_config(data_dir), workdir)
    assert open(path).read() == before
    assert again == json.loads(before)
    json.loads(before, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))  # strict JSON


def test_train_time_and_metrics_across_a_resume(data_dir, tmp_path, monkeypatch):
    """A run stopped at step 20 and resumed: results.json counts both segments' training time, and
    metrics.jsonl has each logged step once (rows written after the restored step are dropped)."""
    workdir = str(tmp_path)
    calls = {"n": 0}

    def agreed(self):
        calls["n"] += 1
        return calls["n"] == 25  # stop at step 25: steps 21-25 run again after the resume from 20

    monkeypatch.setattr(train.PreemptionGuard, "agreed", agreed)
    c = digits_config(data_dir, total_steps=40, **{"log_every_steps": 5})
    first = train.train_and_evaluate(c, workdir)
    assert first["preempted"] and first["step"] == 25
    meta = ckpt_lib.Checkpointer(workdir, read_only=True).read_meta(25)
    segment1 = meta["progress"]["train_time_s"]
    result = train.train_and_evaluate(c, workdir)
    assert result["train_time_s"] > segment1 > 0
    steps = [
        json.loads(line)["step"]
        for line in open(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in json.loads(line)
    ]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]


def test_a_cut_off_metrics_line_is_skipped_and_named(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/lo')
    rows = plots.read_metrics_jsonl(str(tmp_path))
    assert rows == [{"step": 5, "train/loss": 1.0}]
    assert "metrics.jsonl" in caplog.text and "line 2" in caplog.text


def test_run_files_are_written_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous file, never a truncated one."""
    path = str(tmp_path / "results.json")
    runs.write_json(path, {"accuracy": 0.5})

    def die(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(OSError):
        runs.write_json(path, {"accuracy": 0.9, "more": list(range(1000))})
    assert json.load(open(path)) == {"accuracy": 0.5}
    assert [f for f in os.listdir(tmp_path) if f != "results.json"] == []  # no temp file left behind


def test_results_are_strict_json(tmp_path):
    path = str(tmp_path / "r.json")
    runs.write_json(path, {"examples_per_s": float("nan"), "nested": [float("inf"), 1.0]})
    assert json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(c)) == {
        "examples_per_s": None,
        "nested": [None, 1.0],
    }


# ---------------------------------------------------------------------------- 10. checksums


def test_a_flipped_byte_in_a_checkpoint_is_a_named_error(data_dir, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(digits_config(data_dir, total_steps=20), workdir)
    victim, _ = flip_largest_file(os.path.join(workdir, "checkpoints", "20", "model"))
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=os.path.basename(victim)):
        runs.RunDir(workdir).load_model()
    c = digits_config(data_dir, total_steps=40, **{"checkpoint.allow_changes": "total_steps"})
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="checksum"):
        train.train_and_evaluate(c, workdir)


# ------------------------------------------------------------------------ 12. config validation


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("checkpoint.every_steps", 0, "checkpoint.every_steps"),
        ("log_every_steps", 0, "log_every_steps"),
        ("eval_every_steps", -1, "eval_every_steps"),
        ("optimizer.learning_rate", -0.1, "optimizer.learning_rate"),
        ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate"),
        ("model.kwargs.hiddenn", (16,), "model.kwargs.*hiddenn.*hidden"),
    ],
)
def test_bad_values_are_refused_before_compiling(data_dir, field, value, message):
    c = digits_config(data_dir)
    if field.startswith("model.kwargs."):
        c.model.kwargs[field.rsplit(".", 1)[1]] = value
    else:
        section, _, leaf = field.rpartition(".")
        (c[section] if section else c)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_an_empty_split_is_named(data_dir, tmp_path):
    c = digits_config(data_dir, **{"dataset.eval_split": "test[:0]"})
    with pytest.raises(ValueError, match=r"'test\[:0\]'.*empty"):
        train.train_and_evaluate(c, str(tmp_path))


# ------------------------------------------------------------------------------- chaos


def _chaos_segment(workdir, data_dir, common, target, signals):
    """Starts the digits run, waits for step >= `target`, sends `signals` (0.05 s apart); (rc, output)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "titans.main",
            "--config=configs/digits.py",
            f"--workdir={workdir}",
            f"--config.dataset.data_dir={data_dir}",
            *common,
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step " in line and "/160" in line and int(line.split("step ")[1].split("/")[0]) >= target:
            break
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.05)
        proc.send_signal(sig)
    return proc.wait(timeout=120), "".join(lines) + proc.communicate(timeout=120)[0]


def _flip_newest_verified(workdir) -> tuple[str, int]:
    """Flips one byte of the largest file of the newest checksummed step; returns (file, offset)."""
    sums = os.path.join(workdir, "checkpoints_sha256")
    step = max(int(n.split(".")[0]) for n in os.listdir(sums))
    return flip_largest_file(os.path.join(workdir, "checkpoints", str(step)))


@pytest.mark.slow
def test_chaos_kills_and_preemptions_resume_exactly(data_dir, tmp_path):
    """kill -9, SIGTERM and a double SIGTERM at random moments (checkpoint steps included), and a kill -9
    followed by a flipped byte in the newest verified checkpoint; then the run finishes with the
    parameters of a run never interrupted. Every SIGTERM exit is rc 0; the flipped byte is refused by
    name (the run does not start), and once it is repaired the run goes on."""
    common = [
        "--config.total_steps=160",
        "--config.checkpoint.every_steps=10",
        "--config.log_every_steps=5",
        "--config.schedule.name=constant",
    ]
    straight = str(tmp_path / "straight")
    assert _cli(straight, data_dir, *common).returncode == 0
    workdir = str(tmp_path / "chaos")
    rng = random.Random(1234)
    kill, term = [signal.SIGKILL], [signal.SIGTERM]
    for signals, flip in ((kill, False), (term, False), (term + term, False), (kill, True), (term, False)):
        target = rng.choice([10, 20, 30, 40, 50]) + rng.choice([0, 0, 5])  # often exactly a checkpoint step
        rc, out = _chaos_segment(workdir, data_dir, common, target, signals)
        assert rc == (0 if signals[0] == signal.SIGTERM else -signal.SIGKILL), out
        if flip:
            victim, offset = _flip_newest_verified(workdir)
            refused = _cli(workdir, data_dir, *common)
            assert refused.returncode != 0 and "checksum" in refused.stderr, refused.stderr[-2000:]
            flip_byte(victim, offset)  # repaired: the same bytes as saved
    final = _cli(workdir, data_dir, *common)
    assert final.returncode == 0, final.stdout + final.stderr
    for a, b in zip(_params(straight), _params(workdir)):
        np.testing.assert_array_equal(a, b)


def test_a_model_restores_into_its_abstract_build_with_its_prng_key(tmp_path):
    """`RunDir.load_model` builds the model by `nnx.eval_shape` (no initial values, no initialiser
    program) and restores into it: the same variables as restoring into an eagerly built model, the
    dropout stream's typed key included, each on this process's first device."""

    def make(seed):
        return models.create_model(
            "mobilenet_v2", num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(seed), width_mult=0.25, dropout=0.2
        )

    saved = make(3)
    _, params, rest = nnx.split(saved, nnx.Param, ...)
    assert any(ckpt_lib._is_key(x) for x in jax.tree.leaves(rest))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    model = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    ckpt.save(1, model=model, train={"step": np.int32(1)}, loader={}, meta={"fields": {}})
    ckpt.wait()

    eager = runs.restore_variables(make(0), ckpt, 1)
    abstract = runs.restore_variables(nnx.eval_shape(lambda: make(0)), ckpt, 1)
    want = jax.tree.leaves(ckpt_lib.to_savable((model["params"], model["rest"])))
    for got in (eager, abstract):
        leaves = jax.tree.leaves(ckpt_lib.to_savable((nnx.to_pure_dict(got.params), nnx.to_pure_dict(got.model_state))))
        assert len(leaves) == len(want)
        for a, b in zip(leaves, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.dtype == b.dtype and a.sharding.device_set == {jax.local_devices()[0]}
    keys = [x for x in jax.tree.leaves(nnx.to_pure_dict(abstract.model_state)) if ckpt_lib._is_key(x)]
    assert keys and all(jax.random.key_impl(k) == jax.random.key_impl(jax.random.key(0)) for k in keys)
    other = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))
    with pytest.raises(ValueError, match="not JAX's default"):
        ckpt_lib.from_savable({"k": np.zeros(4, np.uint32)}, {"k": other})
