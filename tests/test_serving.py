"""Serving an exported cascade on Ray Serve: the answers equal the exported cascade's, malformed
requests get a 400 and leave the service up, a killed teacher replica costs latency and not answers,
and the HTTP proxy listens on loopback only."""

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import digits_config

from titans import data, export, runs, train
from titans.export import standalone

serve_main = pytest.importorskip("titans.serve.__main__", reason="needs ray[serve] (the `serve` extra)")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stage_dirs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    dirs = []
    for name, hidden, steps in (("student", (8,), 60), ("teacher", (64,), 150)):
        c = digits_config(data_dir, total_steps=steps, **{"dataset.train_split": "train[:80%]"})
        c.model.kwargs.hidden = hidden
        train.train_and_evaluate(c, str(root / name))
        dirs.append(str(root / name))
    return root, dirs


@pytest.fixture(scope="module")
def served(stage_dirs):
    root, dirs = stage_dirs
    export.export_cascade(dirs, "msp", [0.3], "train[80%:]", str(root / "export"), batch_size=64)
    port = _free_port()
    serve_main.start(str(root / "export"), port=port, num_cpus=2)
    yield f"http://127.0.0.1:{port}/", str(root / "export"), port
    serve_main.stop()


def _post(url, body: bytes, timeout=120, content_type="application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(data_dir):
    x, _ = runs.split_arrays(data.get_source("digits", "test", data_dir=data_dir), data.dataset_info("digits"))
    return x[:40]


def test_served_answers_equal_the_exported_cascade(served, images):
    url, export_dir, _ = served
    status, out = _post(url, json.dumps({"images": images.tolist()}).encode())
    assert status == 200, out
    want = standalone.load(export_dir).predict(images)
    np.testing.assert_array_equal(out["classes"], want["classes"])
    np.testing.assert_array_equal(out["answered_by"], want["answered_by"])
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], atol=2e-6)
    assert set(out["answered_by"]) == {0, 1}  # the student answered some, the teacher the rest
    assert out["class_names"][3] == "3"


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "not JSON"),
        (json.dumps({"pixels": []}).encode(), '"images" field'),
        (json.dumps({"images": [[1, 2, 3]]}).encode(), "must have shape"),
        (json.dumps({"images": np.full((1, 8, 8, 1), 300).tolist()}).encode(), "integers in [0, 255]"),
        (json.dumps({"images": np.full((1, 8, 8, 1), 0.5).tolist()}).encode(), "integers in [0, 255]"),
        (json.dumps({"images": np.zeros((300, 8, 8, 1), int).tolist()}).encode(), "1 to 256 images"),
    ],
)
def test_malformed_requests_get_a_400_and_the_service_stays_up(served, images, body, message):
    url, _, _ = served
    status, out = _post(url, body)
    assert status == 400 and message in out["error"]
    status, _ = _post(url, json.dumps({"images": images[:2].tolist()}).encode())
    assert status == 200


def test_binary_npy_requests_get_the_same_answers(served, images):
    url, _, _ = served
    _, as_json = _post(url, json.dumps({"images": images.tolist()}).encode())
    status, as_npy = _post(url, _npy(images), content_type="application/x-npy")
    assert status == 200 and as_npy == as_json


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x93NUMPY garbage", "not a .npy array"),
        (_npy(np.zeros((2, 8, 8, 1), np.float32)), "uint8 pixels"),
        (_npy(np.zeros((2, 8, 8), np.uint8)), "must have shape"),
        (_npy(np.zeros((300, 8, 8, 1), np.uint8)), "1 to 256 images"),
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a .npy array"),  # no unpickling
    ],
)
def test_malformed_npy_requests_get_a_400(served, images, body, message):
    url, _, _ = served
    status, out = _post(url, body, content_type="application/x-npy")
    assert status == 400 and message in out["error"], out


def test_a_killed_teacher_replica_costs_latency_not_answers(served, images):
    import ray

    url, export_dir, _ = served
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Teacher" in a["name"]]
    assert names, "no teacher replica found"
    for a in names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    noise = np.random.default_rng(0).integers(0, 17, size=(8, 8, 8, 1), dtype=np.uint8)  # all deferred
    status, out = _post(url, json.dumps({"images": noise.tolist()}).encode(), timeout=300)
    assert status == 200, out
    want = standalone.load(export_dir).predict(noise)
    assert set(want["answered_by"].tolist()) == {1}  # every row needed the (killed) teacher
    np.testing.assert_array_equal(out["answered_by"], want["answered_by"])
    np.testing.assert_array_equal(out["classes"], want["classes"])


def test_each_replica_admits_enough_requests_to_fill_its_batches():
    """Ray Serve lets a replica hold 5 requests unless told otherwise: a serve.batch of 16 would then never
    grow past 5 and a loaded service would queue in the proxy instead of batching."""
    from titans.serve import CascadeIngress, Teacher, build_app

    app = build_app("unused-export-dir", name="x")  # the deployments as the application binds them
    bound = {"CascadeIngressx": app._bound_deployment, "Teacherx": app._bound_deployment.init_args[1]._bound_deployment}
    for deployment, method in ((CascadeIngress, "_cheap_stages"), (Teacher, "__call__")):
        batch = getattr(deployment.func_or_class, method)._get_max_batch_size()
        assert bound[deployment.name + "x"].max_ongoing_requests >= 2 * batch


def test_http_proxy_listens_on_loopback_only(served):
    import psutil

    _, _, port = served
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening)


def test_a_batch_sends_its_deferred_rows_in_one_teacher_call(served, images):
    """Two requests batched together: one with no deferred row (answered without the teacher), one with
    some; the teacher gets one call holding exactly the deferred rows, and the answers are the cascade's."""
    import asyncio

    from titans.serve import run_batch

    _, export_dir, _ = served
    cascade = standalone.load(export_dir)
    _, scores = cascade.stage_outputs(0, images)
    deferred = scores > cascade.thresholds[0]
    confident_req, mixed_req, mixed2_req = images[~deferred][:4], images[:8], images[8:16]
    assert 0 < deferred[:8].sum() < 8 and deferred[8:16].any()  # the test needs two mixed requests
    calls = []

    async def teacher(rows):  # the exported teacher stage, recording each call's rows
        calls.append(len(rows))
        return cascade.stage_outputs(cascade.num_stages - 1, rows)[0]

    async def batch():
        outs = await run_batch(cascade, "cascade", [confident_req, mixed_req, mixed2_req], teacher)
        return outs, await outs[1][3]

    (confident, mixed, mixed2), teacher_out = asyncio.run(batch())
    assert calls == [int(deferred[:16].sum())]  # one call for the batch, only the deferred rows
    assert mixed2[3] is mixed[3]  # shared
    assert confident[3] is None and len(confident[2]) == 0
    np.testing.assert_array_equal(mixed[2], np.nonzero(deferred[:8])[0])
    want, _ = cascade.stage_outputs(1, mixed_req[deferred[:8]])
    np.testing.assert_allclose(teacher_out[mixed[4]], want, rtol=1e-6)
    np.testing.assert_array_equal(mixed[1][~deferred[:8]], 0)  # the student answered the rest


def test_the_cheap_stages_leave_the_event_loop_free(served, images):
    """The ingress computes its stages in a worker thread: requests and teacher answers keep flowing
    through the replica's event loop meanwhile (a blocking stage would stall every request on it)."""
    import asyncio
    import time

    from titans.serve import run_batch

    _, export_dir, _ = served
    cascade = standalone.load(export_dir)
    real = cascade.stage_outputs

    def slow_stage(i, x):  # the real stage, made to take 0.3 s
        time.sleep(0.3)
        return real(i, x)

    cascade.stage_outputs = slow_stage

    async def teacher(rows):
        return real(cascade.num_stages - 1, rows)[0]

    async def main():
        ticks = []

        async def ticker():
            for _ in range(15):
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.02)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        await run_batch(cascade, "cascade", [images[:8]], teacher)
        await task
        return ticks

    assert np.max(np.diff(asyncio.run(main()))) < 0.2  # the loop never stood still for the 0.3 s stage


def test_the_load_benchmarks_paired_p99_difference():
    """benchmarks/serving.py's verdict on p99(cascade) - p99(teacher): its point estimate is numpy's, and the
    bootstrap interval separates a clear difference from none."""
    from helpers import load_benchmark

    bench = load_benchmark("serving.py")
    b = np.random.default_rng(0).exponential(0.05, 600)  # seconds
    faster, same, slower = (bench.paired_p99_difference(a, b) for a in (0.5 * b, b, 1.5 * b))
    assert faster["verdict"] == "lower" and faster["ci95_ms"][1] < 0
    assert same["verdict"] == "unresolved" and same["diff_ms"] == 0
    assert slower["verdict"] == "higher" and slower["ci95_ms"][0] > 0
    want = 1e3 * (np.percentile(1.5 * b, 99) - np.percentile(b, 99))
    assert abs(slower["diff_ms"] - want) < 1e-9
    noisy = bench.paired_p99_difference(b, np.random.default_rng(1).exponential(0.05, 600))
    assert noisy["ci95_ms"][0] < noisy["diff_ms"] < noisy["ci95_ms"][1]


def test_the_load_benchmarks_operating_point_and_offered_loads(stage_dirs):
    """benchmarks/serving.py: the accuracy-matching rate is the smallest on the grid whose cascade reaches the
    teacher's validation accuracy (brute force over the same predictions), `--rate` replaces it, and an
    offered load is a fraction of the teacher's capacity in requests/s."""
    from helpers import load_benchmark

    bench = load_benchmark("serving.py")
    _, dirs = stage_dirs
    rate, val = bench.operating_rate(dirs, "train[80%:]")
    assert val["rate_chosen_by"] == "teacher's validation accuracy"
    assert val["cascade_val_accuracy"] >= val["teacher_val_accuracy"] > val["student_val_accuracy"]
    if rate >= 0.05:  # one step down the grid falls short
        lower, lower_val = bench.operating_rate(dirs, "train[80%:]", round(rate - 0.05, 2))
        assert lower_val["cascade_val_accuracy"] < val["teacher_val_accuracy"]
    fixed, fixed_val = bench.operating_rate(dirs, "train[80%:]", 0.0)
    assert fixed == 0.0 and fixed_val["rate_chosen_by"] == "fixed (--rate)"
    assert fixed_val["cascade_val_accuracy"] == fixed_val["student_val_accuracy"]  # nothing deferred
    everything, everything_val = bench.operating_rate(dirs, "train[80%:]", 1.0)
    assert everything == 1.0 and everything_val["cascade_val_accuracy"] == val["teacher_val_accuracy"]
    assert bench.rates_for_loads([0.5, 0.9], 400.0, 8) == [25.0, 45.0]
    # a student at 1,000 images/s and a teacher at 250 with a quarter deferred: ideal 1 / (1 + 0.25 * 4) ms
    assert abs(bench.over_ideal(400.0, 1000.0, 250.0, 0.25) - 0.8) < 1e-12


def test_the_load_benchmarks_stage_compute_times(served, images):
    """benchmarks/serving.py times each exported stage in-process, by row count, for every stage."""
    from helpers import load_benchmark

    _, export_dir, _ = served
    times = load_benchmark("serving.py").stage_compute_ms(export_dir, images, sizes=(1, 8), calls=3)
    assert set(times) == {"stage0", "teacher"} and all(set(t) == {"1", "8"} for t in times.values())
    assert all(0 < ms < 5e3 for t in times.values() for ms in t.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--open_rate", "5", "--open_load", "0.5"], "not both"),
        (["--open_load", "0.5,x"], "comma-separated numbers"),
        (["--open_load", "0,0.5"], "must be positive"),
        (["--rate", "1.5"], "--rate must be in [0, 1]"),
    ],
)
def test_the_load_benchmark_refuses_bad_flags(argv, message, capsys):
    from helpers import load_benchmark

    bench = load_benchmark("serving.py")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--stages=a,b", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert bench.parse_args(["--stages=a,b"])[1] == [10.0]  # the default open-loop rate
    assert bench.parse_args(["--stages=a,b", "--open_load", "0.3,0.9"])[1] == [0.3, 0.9]
