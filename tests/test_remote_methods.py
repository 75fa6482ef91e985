"""The methods' outputs in a bucket (gs://...), against the local GCS emulator (tests/gcs.py): a pipeline
with a cascade section, its analysis, the teacher cache (written to a bucket, read back by a student
exactly as from a local directory), an active-distillation run that resumes from its rounds in the
bucket, and the B-DISTIL ensemble's arrays. Every file lands in the bucket; none in the working
directory."""

import hashlib
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from gcs import emulator, environment
from helpers import REPO, digits_config

from titans import paths, runs, train
from titans.active import config as active_config
from titans.active import loop
from titans.active import report as active_report
from titans.analyze import analyze_path
from titans.cascade import report as cascade_report
from titans.ensemble import runner as ensemble_runner
from titans.teachers import cache as cache_lib

PIPELINE = """
import ml_collections

from titans.config import load_config_file


def _stage(steps, hidden):
    c = load_config_file({digits!r})
    c.dataset.data_dir = {data_dir!r}
    c.dataset.train_split = "train[:80%]"
    c.total_steps = steps
    c.log_every_steps = 10
    c.checkpoint.every_steps = steps
    c.model.kwargs.hidden = hidden
    return c


def get_config():
    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "student")
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = _stage(40, (64,))
    c.stages.student = _stage(30, (8,))
    c.stages.student.distill.teacher_workdir = "@teacher"
    c.cascade = ml_collections.ConfigDict(
        dict(
            teacher="teacher",
            students=("student",),
            val_split="train[80%:]",
            test_split="test",
            gates=("msp",),
            runner_gates=("msp",),
            num_thresholds=11,
            batch_size=64,
            target_deferral_rates=(0.5,),
        )
    )
    return c
"""


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with emulator(str(tmp_path_factory.mktemp("gcs"))) as (env, bucket):
        yield env, bucket


@pytest.fixture
def in_bucket(gcs, tmp_path, monkeypatch):
    """In-process work against the bucket, from an empty working directory, with local caches under tmp_path;
    yields (bucket, cwd), and checks at the end that the working directory is still empty."""
    env_vars, bucket = gcs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with environment(env_vars):
        yield bucket, cwd
    assert list(cwd.iterdir()) == []


@pytest.fixture(scope="module")
def pipeline(gcs, data_dir, tmp_path_factory):
    """configs/digits.py as a teacher + student pipeline with a cascade section, run by `titans.main` with a
    gs:// workdir from an empty working directory; returns (its URL, the working directory, the process)."""
    env_vars, bucket = gcs
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "pipeline.py"
    config.write_text(PIPELINE.format(digits=os.path.join(REPO, "configs", "digits.py"), data_dir=data_dir))
    cwd = tmp / "cwd"
    cwd.mkdir()
    url = f"gs://{bucket}/pipeline"
    env = {**os.environ, **env_vars, "PYTHONPATH": REPO, "XDG_CACHE_HOME": str(tmp / "xdg")}
    cmd = [sys.executable, "-m", "titans.main", f"--config={config}", f"--workdir={url}"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return url, cwd, done


@pytest.mark.slow
def test_a_pipeline_with_a_cascade_writes_its_outputs_to_the_bucket_only(pipeline, gcs):
    url, cwd, done = pipeline
    assert list(cwd.iterdir()) == [] and not os.path.exists(os.path.join(REPO, "gs:"))
    assert "| student |" in done.stdout
    with environment(gcs[0]):
        files = paths.files_under(url)
        for name in (
            "summary.json",
            "summary.md",
            "cascade.json",
            "cascade_logits.npz",
            "cascade_accuracy_vs_deferral.png",
            "cascade_accuracy_vs_flops.png",
            "cascade_accuracy_vs_time.png",
            "teacher/results.json",
            "student/results.json",
        ):
            assert name in files, (name, files)
        summary = runs.read_json(f"{url}/summary.json")
        assert set(summary) == {"teacher", "student"}
        # The student distilled from its sibling in the bucket, named by its URL (not a local ./gs:/... path).
        assert runs.RunDir(f"{url}/student").config.distill.teacher_workdir == f"{url}/teacher"
        cascade = runs.read_json(f"{url}/cascade.json")
        assert cascade["teacher"]["workdir"] == f"{url}/teacher"
        point = cascade["students"]["student"]["gates"]["msp"]["at_deferral_rate"]
        assert point and all(p["runner_disagreements_with_sweep"] == 0 for p in point.values())
        logits = np.load(io.BytesIO(paths.resolve(f"{url}/cascade_logits.npz").read_bytes()))
        assert logits["test/teacher"].shape == (cascade["test_examples"], 10)
        assert paths.resolve(f"{url}/cascade_accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cascade_report.load([url]) == [cascade]  # the study's report reads the bucket too


@pytest.mark.slow
def test_analysis_of_a_pipeline_in_the_bucket(pipeline, in_bucket):
    url = pipeline[0]
    metrics = analyze_path(url, hardest=8, batch_size=128)
    assert [m["name"] for m in metrics] == ["digits", "digits"] and all(m["workdir"].startswith(url) for m in metrics)
    files = paths.files_under(url)
    for stage in ("teacher", "student"):
        for name in ("metrics.json", "examples.csv", "report.html", "reliability.png", "learning_curves.png"):
            assert f"{stage}/analysis/{name}" in files, (stage, name)
    assert "analysis/report.html" in files
    page = paths.read_text(f"{url}/analysis/report.html")
    assert "cascade" in page and "data:image/png;base64," in page  # the cascade section's plots, read from the bucket
    assert "../teacher/analysis/report.html" in page


def _cache_sha(directory: str) -> dict:
    return {n: paths.sha256(paths.join(directory, n)) for n in paths.files_under(directory) if n.endswith("_record")}


@pytest.mark.slow
def test_a_teacher_cache_in_the_bucket_trains_the_same_student_as_a_local_one(pipeline, in_bucket, data_dir, tmp_path):
    bucket, _ = in_bucket
    teacher = f"{pipeline[0]}/teacher"
    local, remote = str(tmp_path / "cache"), f"gs://{bucket}/cache"
    job = dict(teacher_workdir=teacher, dataset="digits", split="train[:80%]", data_dir=data_dir, shard_size=500)
    manifests = {
        out: cache_lib.write_cache(out=out, batch_size=128, log=lambda s: None, **job) for out in (local, remote)
    }
    # The same shards, and the manifest's checksums are those of the objects in the bucket.
    assert manifests[local]["shard_sha256"] == manifests[remote]["shard_sha256"] == _cache_sha(remote)
    assert len(manifests[remote]["shards"]) == 3 and runs.read_json(f"{remote}/manifest.json")["complete"]
    assert not any(n.endswith(".tmp") for n in paths.files_under(remote))

    students = {}
    for where, cache_dir in (("local", local), ("remote", remote)):
        c = digits_config(data_dir, total_steps=30, **{"dataset.train_split": "train[:80%]"})
        c.model.kwargs.hidden = (16,)
        c.distill.teacher_workdir = teacher
        c.distill.teacher_mode = "cache"
        c.distill.cache.dir = cache_dir
        students[where] = str(tmp_path / f"student_{where}")
        assert train.train_and_evaluate(c, students[where])["teacher_mode"] == "cache"
    a, b = (jax.tree.leaves(runs.RunDir(students[w]).load_model().params) for w in ("local", "remote"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # The reader used verified local copies of the bucket's shards.
    copy_dir = cache_lib.local_copy_dir(remote)
    assert copy_dir.startswith(str(tmp_path / "xdg"))
    recorded = manifests[remote]["shard_sha256"]
    first = sorted(recorded)[0]
    assert {n: paths.sha256(os.path.join(copy_dir, n)) for n in recorded} == recorded
    # A damaged local copy is downloaded again ...
    with open(os.path.join(copy_dir, first), "r+b") as f:
        f.write(b"\0\0\0\0")
    assert cache_lib.TeacherCache(remote).shard_files[0] == os.path.join(copy_dir, first)
    assert paths.sha256(os.path.join(copy_dir, first)) == recorded[first]
    # ... and a damaged shard in the bucket is a named error, with nothing left in the local copy.
    os.remove(os.path.join(copy_dir, first))
    blob = bytearray(paths.resolve(f"{remote}/{first}").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    paths.write_bytes(f"{remote}/{first}", bytes(blob))
    with pytest.raises(cache_lib.CacheError, match=f"Shard {first} .* fails its checksum"):
        cache_lib.TeacherCache(remote)
    assert sorted(os.listdir(copy_dir)) == sorted(recorded)[1:]


class _LinearTeacher:
    """A fixed random linear teacher (images -> logits) that counts the rows it is run on."""

    def __init__(self):
        self.w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        self.rows = 0

    def __call__(self, images):
        self.rows += len(images)
        return np.asarray(images, np.float32).reshape(len(images), -1) @ self.w / 50.0


@pytest.mark.slow
def test_an_active_run_in_the_bucket_resumes_from_its_rounds_there(in_bucket, data_dir):
    bucket, _ = in_bucket
    c = active_config.defaults()
    c.dataset.name, c.dataset.data_dir, c.dataset.split = "digits", data_dir, "train"
    c.active.strategies = "margin"
    c.active.num_labelled, c.active.num_validation = 64, 100
    c.active.rounds, c.active.budget_per_round, c.active.predict_batch_size = 1, 40, 256
    c.teacher.workdir = "unused"
    c.student.model.kwargs.hidden = (16,)
    c.student.batch_size, c.student.eval_batch_size, c.student.total_steps = 32, 64, 10
    url = f"gs://{bucket}/active/seed0"
    first = loop.run_active(c, url, teacher_predict=_LinearTeacher(), log=lambda s: None)
    assert first["strategies"]["margin"]["pool_queries"] == 40
    files = paths.files_under(url)
    for name in ("config.json", "active.json", "active.png", "margin/meta.json"):
        assert name in files, (name, files)
    assert any(f.startswith("margin/rounds/1/") for f in files)
    # A rerun reads every round back from the bucket: the teacher is not run again, the history is the same.
    again = _LinearTeacher()
    second = loop.run_active(c, url, teacher_predict=again, log=lambda s: None)
    assert again.rows == 0 and second["strategies"]["margin"]["teacher_rows_run_this_call"] == 0
    np.testing.assert_allclose(second["strategies"]["margin"]["accuracy"], first["strategies"]["margin"]["accuracy"])
    assert active_report.load(f"gs://{bucket}/active/seed*") == [runs.read_json(f"{url}/active.json")]


def test_ensemble_arrays_and_weights_round_trip_through_the_bucket(in_bucket):
    bucket, _ = in_bucket
    vdir = f"gs://{bucket}/ensemble/bdistil"
    weights_cfg = "example_class"  # (examples, classes) weights
    first = ensemble_runner._round_weights(vdir, 1, (6, 3), weights_cfg)  # round 1 saves its initial weights
    assert paths.files_under(vdir) == ["weights_round1.npy"]
    raw = paths.resolve(f"{vdir}/weights_round1.npy").read_bytes()
    buf = io.BytesIO()
    np.save(buf, first)
    assert raw == buf.getvalue()  # the bytes np.save writes to a local file
    other = np.arange(18, dtype=np.float32).reshape(6, 3) / 153.0
    ensemble_runner.save_npy(f"{vdir}/weights_round2.npy", other)
    np.testing.assert_array_equal(ensemble_runner._round_weights(vdir, 2, (6, 3), weights_cfg), other)
    assert hashlib.sha256(raw).hexdigest() == paths.sha256(f"{vdir}/weights_round1.npy")
