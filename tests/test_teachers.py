"""Soft-label sources (titans.teachers): the offline cache and the Ray teacher service against the
online teacher, top-k, refusals of foreign caches, a killed cache writer, and a teacher service that
loses a worker and gains one mid-epoch without losing or repeating an example."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import REPO, digits_config

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data, models, runs, teachers, train
from titans.teachers import cache as cache_lib
from titans.teachers import service

ATOL = 1e-5  # the same float32 forward at another batch size: rounding only


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.train_and_evaluate(digits_config(data_dir, total_steps=60), workdir)  # checkpoints at 20, 40, 60
    return workdir


@pytest.fixture(scope="module")
def online(teacher_dir):
    """The online teacher's forward, exactly as the train step computes it (float32 on CPU)."""
    info = data.dataset_info("digits")
    teacher, _ = runs.load_teacher(teacher_dir, info, dtype=jnp.float32)
    apply = jax.jit(lambda t, x: t.apply(data.normalize(x, info, jnp.float32)).astype(jnp.float32))
    return lambda images: np.asarray(apply(teacher, np.asarray(images)))


@pytest.fixture(scope="module")
def full_cache(teacher_dir, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache_full"))
    cache_lib.write_cache(
        teacher_workdir=teacher_dir,
        dataset="digits",
        split="train",
        out=out,
        data_dir=data_dir,
        shard_size=500,
        batch_size=128,
        log=lambda s: None,
    )
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    owns = service.connect(num_cpus=4)
    yield ray
    if owns:
        service.shutdown_local()


def _loader(data_dir, **kw):
    src = data.get_source("digits", "train", data_dir=data_dir)
    return data.TrainLoader(src, data.dataset_info("digits"), global_batch_size=64, seed=3, **kw)


# ------------------------------------------------------------------------------------- cache


def test_cache_soft_labels_equal_online_teacher(full_cache, online, data_dir):
    cache = cache_lib.TeacherCache(full_cache)
    m = cache.manifest
    assert m["complete"] and m["num_examples"] == 1437 and m["num_shards"] == 3 and m["topk"] == 0
    assert m["dataset"] == "digits" and m["split"] == "train" and m["dtype"] == "float32"
    source = teachers.SoftLabelSource(teachers.CacheLabeler(cache, 10), in_flight=3)
    with source:
        loader = source.wrap(_loader(data_dir, with_index=True))
        for _ in range(5):
            batch = next(loader)
            np.testing.assert_allclose(batch["teacher_logits"], online(batch["image"]), atol=ATOL, rtol=0)
            np.testing.assert_array_equal(batch["teacher_logits"], cache.logits(batch["index"]))


def test_soft_label_loader_state_counts_handed_out_batches(full_cache, data_dir):
    cache = cache_lib.TeacherCache(full_cache)
    with teachers.SoftLabelSource(teachers.CacheLabeler(cache, 10), in_flight=4) as source:
        a = source.wrap(_loader(data_dir, with_index=True))
        first = [next(a) for _ in range(3)]
        state = a.get_state()
        assert state["step"] == 3 and a.loader.step > 3  # four more were taken ahead for labelling
        expected = next(a)
        b = source.wrap(_loader(data_dir, with_index=True))
        b.set_state(json.loads(json.dumps(state)))
        got = next(b)
        np.testing.assert_array_equal(got["index"], expected["index"])
        np.testing.assert_array_equal(got["teacher_logits"], expected["teacher_logits"])
        assert not set(got["index"].tolist()) & set(np.concatenate([f["index"] for f in first]).tolist())


class _SlowLabeler:
    """A labeler whose results take a while: records what was waited for and what was cancelled."""

    def __init__(self):
        self.waited, self.cancelled = [], []

    def submit(self, batch):
        return len(self.waited) + len(self.cancelled) + 1000 * len(batch["label"])

    def result(self, ticket):
        time.sleep(0.01)
        self.waited.append(ticket)
        return np.zeros((64, 10), np.float32)

    def cancel(self, ticket):
        self.cancelled.append(ticket)


def test_soft_label_loader_drain_waits_for_every_batch_in_flight(data_dir):
    """drain() collects (not cancels) every batch labelled ahead, so no labelling work is left running."""
    labeler = _SlowLabeler()
    loader = teachers.SoftLabelLoader(_loader(data_dir), labeler, in_flight=4)
    next(loader)
    assert len(loader._queue) == 3 and len(labeler.waited) == 1
    assert loader.drain() == 3
    assert len(loader._queue) == 0 and len(labeler.waited) == 4 and labeler.cancelled == []
    assert loader.drain() == 0


def test_topk_round_trip(teacher_dir, online, data_dir, tmp_path):
    out = str(tmp_path / "top3")
    cache_lib.write_cache(
        teacher_workdir=teacher_dir,
        dataset="digits",
        split="test",
        out=out,
        data_dir=data_dir,
        topk=3,
        shard_size=100,
        batch_size=64,
        log=lambda s: None,
    )
    cache = cache_lib.TeacherCache(out)
    src = data.get_source("digits", "test", data_dir=data_dir)
    images = np.stack([e["image"] for e in src.__getitems__(range(len(src)))])
    full = online(images)
    order = np.argsort(-full, axis=-1)[:, :3]
    values, indices = cache.topk_entries(np.arange(len(src)))
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(values, np.take_along_axis(full, order, -1), atol=ATOL, rtol=0)
    # Dense reconstruction: the teacher's distribution renormalised over its top 3, exactly 0 elsewhere.
    dense = cache.logits(np.arange(len(src)))
    for temperature in (1.0, 4.0):
        p = np.asarray(jax.nn.softmax(dense / temperature))
        ref = np.asarray(jax.nn.softmax(full / temperature))
        mask = np.zeros_like(ref, bool)
        np.put_along_axis(mask, order, True, -1)
        ref = np.where(mask, ref, 0.0)
        np.testing.assert_allclose(p, ref / ref.sum(-1, keepdims=True), atol=1e-5)
        assert np.all(p[~mask] == 0.0)
    # bfloat16 storage of the same top-k.
    out16 = str(tmp_path / "top3_bf16")
    cache_lib.write_cache(
        teacher_workdir=teacher_dir,
        dataset="digits",
        split="test",
        out=out16,
        data_dir=data_dir,
        topk=3,
        dtype="bfloat16",
        shard_size=1000,
        log=lambda s: None,
    )
    v16, i16 = cache_lib.TeacherCache(out16).topk_entries(np.arange(len(src)))
    np.testing.assert_array_equal(i16, order)
    np.testing.assert_allclose(v16, values, rtol=1e-2, atol=1e-2)


def test_stale_or_foreign_cache_refused(full_cache, teacher_dir, data_dir, tmp_path):
    cache = cache_lib.TeacherCache(full_cache)
    info = data.dataset_info("digits")
    ident = cache_lib.teacher_identity(teacher_dir, -1, info)
    cache.check(teacher=ident, dataset="digits", split="train", num_examples=1437, topk=0, dtype="float32")
    with pytest.raises(cache_lib.StaleCacheError, match="split: cache has 'train', this run has 'train\\[:90%\\]'"):
        cache.check(teacher=ident, dataset="digits", split="train[:90%]", num_examples=1437)
    with pytest.raises(cache_lib.StaleCacheError, match="(?s)dataset: .*num_examples: "):
        cache.check(teacher=ident, dataset="fashion_mnist", split="train", num_examples=54000)
    with pytest.raises(cache_lib.StaleCacheError, match="topk: cache has 0, this run has 5"):
        cache.check(teacher=ident, dataset="digits", split="train", num_examples=1437, topk=5)
    # The trainer refuses a cache of another teacher: the same run at an earlier checkpoint.
    c = digits_config(data_dir, total_steps=5)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    c.distill.teacher_step = 20
    c.distill.teacher_mode = "cache"
    c.distill.cache.dir = full_cache
    with pytest.raises(cache_lib.StaleCacheError, match=r"(?s)teacher: cache from .* step 60 .* step 20"):
        train.train_and_evaluate(c, str(tmp_path / "student"))
    # ... and one of another split, and a directory without a cache.
    c.distill.teacher_step = -1
    c.dataset.train_split = "train[:50%]"
    with pytest.raises(cache_lib.StaleCacheError, match="(?s)split: cache has 'train'.*num_examples"):
        train.train_and_evaluate(c, str(tmp_path / "student2"))
    c.distill.cache.dir = str(tmp_path / "nothing")
    with pytest.raises(cache_lib.CacheError, match="No teacher cache .*python -m titans.teachers.cache"):
        train.train_and_evaluate(c, str(tmp_path / "student3"))
    # The writer will not mix two jobs in one directory.
    with pytest.raises(cache_lib.StaleCacheError, match="(?s)already holds a cache of another job.*split"):
        cache_lib.write_cache(
            teacher_workdir=teacher_dir,
            dataset="digits",
            split="test",
            out=full_cache,
            data_dir=data_dir,
            shard_size=500,
            log=lambda s: None,
        )


def test_cache_refused_for_augmented_training(teacher_dir, data_dir):
    c = digits_config(data_dir)
    c.distill.teacher_workdir = teacher_dir
    c.distill.teacher_mode = "cache"
    c.distill.cache.dir = "/nonexistent"
    info = dataclasses.replace(data.dataset_info("digits"), augment="crop_flip")
    with pytest.raises(config_lib.ConfigError, match="(?s)cannot label augmented views.*dataset.augment=False"):
        teachers.open_soft_labels(c, info, data.get_source("digits", "train", data_dir=data_dir))


def test_config_fields_checked():
    c = config_lib.base_config()
    c.total_steps = 1
    c.distill.teacher_mode = "cached"
    with pytest.raises(config_lib.ConfigError, match="teacher_mode='cached' is not one of"):
        config_lib.validate(c)
    c.distill.teacher_mode = "service"
    with pytest.raises(config_lib.ConfigError, match="needs a teacher"):
        config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="Did you mean: distill.service.max_workers"):
        config_lib.validate(
            {
                **c.to_dict(),
                "distill": {**c.distill.to_dict(), "service": {**c.distill.service.to_dict(), "max_worker": 3}},
            }
        )
    with pytest.raises(config_lib.ConfigError, match="distill.cache.topk"):
        config_lib.check_override(c, "distill.cache.top_k")


@pytest.mark.slow
def test_cache_writer_resumes_after_kill(teacher_dir, online, data_dir, tmp_path):
    out = str(tmp_path / "cache")
    cmd = [
        sys.executable,
        "-m",
        "titans.teachers.cache",
        f"--teacher_workdir={teacher_dir}",
        "--dataset=digits",
        "--split=train",
        f"--data_dir={data_dir}",
        f"--out={out}",
        "--shard_size=200",
        "--batch_size=100",
        "--delay_per_shard_s=2",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shards = lambda: sorted(f for f in os.listdir(out) if f.endswith(".array_record")) if os.path.isdir(out) else []
    deadline = time.time() + 120
    while len(shards()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash: no handler, no clean-up
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL, output
    kept = shards()
    assert 2 <= len(kept) < 8, (kept, output)
    stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in kept}
    with pytest.raises(cache_lib.CacheError, match="(?s)incomplete .*Rerun its command"):
        cache_lib.TeacherCache(out)
    resumed = subprocess.run(cmd[:-1], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"kept {len(kept)} finished shard(s)" in resumed.stdout
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in kept} == stamps  # not rewritten
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    cache = cache_lib.TeacherCache(out)
    src = data.get_source("digits", "train", data_dir=data_dir)
    images = np.stack([e["image"] for e in src.__getitems__(range(len(src)))])
    np.testing.assert_allclose(cache.logits(np.arange(len(src))), online(images), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ trainer modes


def _final_params(workdir):
    ck = ckpt_lib.Checkpointer(workdir, read_only=True)
    with open(os.path.join(workdir, "config.json")) as f:
        import ml_collections

        cfg = ml_collections.ConfigDict(json.load(f))
    _, params, rest = nnx.split(
        models.build_model(cfg.model, data.dataset_info(cfg.dataset.name), seed=0, dtype=jnp.float32), nnx.Param, ...
    )
    return ck.restore_model(ck.latest_step(), {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)})


def _student(data_dir, teacher_dir, mode, **kw):
    c = digits_config(data_dir, total_steps=30, **kw)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    c.distill.teacher_mode = mode
    return c


@pytest.fixture(scope="module")
def online_student(data_dir, teacher_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("online_student"))
    result = train.train_and_evaluate(_student(data_dir, teacher_dir, "online"), workdir)
    return workdir, result


def _assert_same_student(a, b):
    for x, y in zip(jax.tree.leaves(_final_params(a)), jax.tree.leaves(_final_params(b))):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


def test_student_trained_from_cache_equals_online(online_student, full_cache, data_dir, teacher_dir, tmp_path):
    c = _student(data_dir, teacher_dir, "cache")
    c.distill.cache.dir = full_cache
    result = train.train_and_evaluate(c, str(tmp_path))
    assert result["teacher_mode"] == "cache" and online_student[1]["teacher_mode"] == "online"
    assert result["accuracy"] == pytest.approx(online_student[1]["accuracy"], abs=1e-3)
    _assert_same_student(str(tmp_path), online_student[0])


# ----------------------------------------------------------------------------------- service


def test_service_student_equals_online(ray_cluster, online_student, data_dir, teacher_dir, tmp_path):
    c = _student(data_dir, teacher_dir, "service")
    c.distill.service.min_workers = 1
    c.distill.service.max_workers = 2
    c.distill.service.max_in_flight = 4
    result = train.train_and_evaluate(c, str(tmp_path))
    assert result["teacher_mode"] == "service"
    _assert_same_student(str(tmp_path), online_student[0])


def test_service_worker_killed_and_added_mid_epoch(ray_cluster, teacher_dir, online, data_dir):
    info = data.dataset_info("digits")
    teacher, t_cfg, _ = cache_lib.load_teacher_with_identity(teacher_dir, -1, info)
    variables = {
        "params": jax.device_get(nnx.to_pure_dict(teacher.params)),
        "rest": jax.device_get(ckpt_lib.to_savable(nnx.to_pure_dict(teacher.model_state))),
    }
    pool = service.TeacherPool(
        model_config=t_cfg.to_dict(),
        dataset="digits",
        variables=variables,
        batch_shape=(64, 8, 8, 1),
        dtype="float32",
        min_workers=1,
        max_workers=3,
        target=2,
        delay_s=0.15,
        scale_interval_s=0.5,
        batch_timeout_s=60,
        start_timeout_s=180,
    )
    try:
        pool.wait_for_workers(2, timeout=180)
        loader = teachers.SoftLabelLoader(_loader(data_dir, with_index=True), service.PoolLabeler(pool), in_flight=6)
        steps = loader.steps_per_epoch
        seen, killed_pid, added = [], None, None
        for i in range(steps):
            if i == 4:  # a real process kill of a worker that is labelling a batch
                busy = [w for w in pool.workers() if w["state"] == "alive" and w["busy"]]
                victim = (busy or [w for w in pool.workers() if w["state"] == "alive"])[0]
                killed_pid = victim["pid"]
                os.kill(killed_pid, signal.SIGKILL)
            if i == 8:  # a worker added by hand (as when a node joins) is used for the rest of the epoch
                before = {w["name"] for w in pool.workers()}
                assert pool.resize(3) == 3
                pool.wait_for_workers(3, timeout=180)
                added = ({w["name"] for w in pool.workers()} - before).pop()
            batch = next(loader)
            np.testing.assert_allclose(batch["teacher_logits"], online(batch["image"]), atol=ATOL, rtol=0)
            seen.append(batch["index"])
        seen = np.concatenate(seen)
        assert len(seen) == steps * 64 and len(np.unique(seen)) == len(seen)  # every example once
        expected = np.concatenate([loader.loader.global_indices(s) for s in range(steps)])
        np.testing.assert_array_equal(seen, expected)  # and in the loader's order
        assert pool.stats["workers_lost"] >= 1 and pool.stats["redone"] >= 1, (pool.stats, pool.events)
        assert killed_pid not in {w["pid"] for w in pool.workers()}
        assert pool.delivered_by[added] >= 1, (pool.delivered_by, pool.events)
        loader.close()
    finally:
        pool.close()


# ------------------------------------------------------------------------------ local Ray exposure


def test_local_ray_is_loopback_only_private_and_leaves_nothing(ray_cluster):
    """Every socket the local cluster listens on is on 127.0.0.1 (none on 0.0.0.0, :: or an external
    interface), its session directory and the auth token are owner-only, and shutting it down leaves
    no Ray process and no temporary directory behind."""
    import psutil

    temp_dir = service._LOCAL["temp_dir"]
    assert temp_dir and os.path.isdir(temp_dir)
    ours = {p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])}
    ours.add(os.getpid())
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in ours]
    assert listening, "found no listening socket of the local cluster (the check would prove nothing)"
    exposed = [
        (c.laddr.ip, c.laddr.port) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    ]
    assert exposed == []
    assert os.stat(temp_dir).st_mode & 0o077 == 0
    if os.path.exists(service._TOKEN):
        assert os.stat(service._TOKEN).st_mode & 0o077 == 0


def test_shutdown_local_reaps_agents_and_removes_the_temp_dir():
    """A separate, short-lived local cluster: after shutdown_local nothing of it is left."""
    import psutil

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from titans.teachers import service; "
        "service.connect(num_cpus=1); print(service._LOCAL['temp_dir'], flush=True); service.shutdown_local()"
    )
    out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    temp_dir = out.stdout.strip().splitlines()[-1]
    assert temp_dir.startswith("/tmp/titans-ray-") and not os.path.exists(temp_dir)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    assert left == []


# ----------------------------------------------------------------------------- cache checksums


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damaged_cache_shards_are_named_errors(full_cache, tmp_path, damage):
    """One flipped byte, a truncated shard, or two shards swapped: each a CacheError naming the shard
    (it used to train with rc=0 on wrong soft labels, or fail with a RuntimeError and no message)."""
    copy = str(tmp_path / "cache")
    shutil.copytree(full_cache, copy)
    names = sorted(n for n in os.listdir(copy) if n.endswith(".array_record"))
    victim = os.path.join(copy, names[0])
    if damage == "flip":
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
    elif damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 7)
    else:
        other = os.path.join(copy, names[1])
        os.rename(victim, victim + ".x")
        os.rename(other, victim)
        os.rename(victim + ".x", other)
    with pytest.raises(cache_lib.CacheError, match="fails its checksum"):
        cache_lib.TeacherCache(copy)
