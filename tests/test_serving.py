"""Serving an exported cascade on Ray Serve: the answers equal the exported cascade's, malformed
requests get a 400 (an oversized body a 413) and leave the service up, a killed teacher replica costs
latency (a 503 to retry) and not answers, an unavailable teacher a 503 with Retry-After within the
timeout, and every process of the session listens on loopback only."""

import io
import ipaddress
import json
import os
import re
import select
import shutil
import socket
import time
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
    serve_main.start(str(root / "export"), port=port, num_cpus=4, max_body_bytes=1 << 20)  # 4: room for 2 apps
    yield f"http://127.0.0.1:{port}/", str(root / "export"), port
    serve_main.stop()


def _post(url, body: bytes, timeout=120, content_type="application/json", headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return (r.status, json.loads(r.read())) + ((r.headers,) if headers else ())
    except urllib.error.HTTPError as e:
        return (e.code, json.loads(e.read())) + ((e.headers,) if headers else ())


def _post_retrying(url, body: bytes, tries=20):
    """A client that honours 503 + Retry-After."""
    for _ in range(tries):
        status, out, headers = _post(url, body, headers=True)
        if status != 503:
            return status, out
        time.sleep(float(headers["Retry-After"]))
    return status, out


def _npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
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
        (b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested 50001 levels deep"),
        (b'{"images": [[[[1' + b"0" * 400 + b"]]]]}", "401 digits"),
        (b'{"images": [[[[NaN]]]]}', "got NaN"),
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
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "uint8 pixels"),  # never unpickled
        (_npy_header((10**12, 8, 8, 1)) + bytes(64), "1 to 256 images; got 1000000000000"),
    ],
)
def test_malformed_npy_requests_get_a_400(served, images, body, message):
    url, _, _ = served
    status, out = _post(url, body, content_type="application/x-npy")
    assert status == 400 and message in out["error"], out


def test_a_killed_teacher_replica_costs_latency_not_answers(served, images):
    """Every teacher replica killed: a request whose rows all need the teacher gets the right answer, at
    once or after 503s (Retry-After) while Serve replaces the replica."""
    import ray

    url, export_dir, _ = served
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Teacher" in a["name"]]
    assert names, "no teacher replica found"
    for a in names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    noise = np.random.default_rng(0).integers(0, 17, size=(8, 8, 8, 1), dtype=np.uint8)  # all deferred
    status, out = _post_retrying(url, json.dumps({"images": noise.tolist()}).encode())
    assert status == 200, out
    want = standalone.load(export_dir).predict(noise)
    assert set(want["answered_by"].tolist()) == {1}  # every row needed the (killed) teacher
    np.testing.assert_array_equal(out["answered_by"], want["answered_by"])
    np.testing.assert_array_equal(out["classes"], want["classes"])


def test_an_unavailable_teacher_gets_a_503_with_retry_after_within_the_timeout(served, stage_dirs, images):
    """A second application on a copy of the export; its teacher stage file removed and its teacher replica
    killed, so no teacher can start again. A request that needs the teacher gets a 503 with Retry-After
    after the teacher timeout (3 s here), not an endless wait; one that does not is still answered."""
    import ray
    from ray import serve

    from titans.serve import build_app

    root, _ = stage_dirs
    _, export_dir, port = served
    copy = root / "export_b"
    shutil.copytree(export_dir, copy)
    serve.run(build_app(str(copy), teacher_timeout_s=3, name="B"), name="b", route_prefix="/b")
    try:
        os.remove(copy / json.loads((copy / "manifest.json").read_text())["stages"][-1]["file"])
        for a in ray.util.list_named_actors(all_namespaces=True):
            if "#TeacherB#" in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
        noise = np.random.default_rng(0).integers(0, 17, size=(8, 8, 8, 1), dtype=np.uint8)  # all deferred
        t0 = time.perf_counter()
        status, out, headers = _post(f"http://127.0.0.1:{port}/b", _npy(noise), 60, "application/x-npy", True)
        waited = time.perf_counter() - t0
        assert status == 503 and "the teacher did not answer within 3 s" in out["error"], out
        assert int(headers["Retry-After"]) > 0
        assert 3 <= waited < 30
        confident = images[standalone.load(export_dir).predict(images)["answered_by"] == 0][:1]
        assert len(confident)  # an image the student answers alone
        status, out = _post(f"http://127.0.0.1:{port}/b", _npy(confident), 60, "application/x-npy")
        assert status == 200 and out["answered_by"] == [0]
    finally:
        serve.delete("b")


def _raw_post(port: int, head: bytes, chunks) -> bytes:
    """Sends `head`, then the chunks until the server answers; its answer (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except OSError:
                break
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            more = s.recv(65536)
            if not more:
                break
            reply += more
        return reply


def _length(reply: bytes) -> int:
    found = re.search(rb"content-length: *(\d+)", reply, re.IGNORECASE)
    return int(found.group(1)) if found else 0


def test_an_oversized_body_gets_a_413_without_being_read(served):
    """A declared Content-Length over the limit (1 MiB here) is refused after a few bytes of it; a chunked
    body without a length is refused once it passes the limit."""
    _, _, port = served
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    reply = _raw_post(port, head + b"Content-Length: 1000000000000\r\n\r\n", [b'{"images": ['])
    assert reply.startswith(b"HTTP/1.1 413") and b"1000000000000 bytes; this service takes at most 1048576" in reply
    chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
    reply = _raw_post(port, head + b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 64 + [b"0\r\n\r\n"])
    assert reply.startswith(b"HTTP/1.1 413") and b"passed 1048576 bytes" in reply


def test_each_replica_admits_enough_requests_to_fill_its_batches():
    """Ray Serve lets a replica hold 5 requests unless told otherwise: a serve.batch of 16 would then never
    grow past 5 and a loaded service would queue in the proxy instead of batching."""
    from titans.serve import CascadeIngress, Teacher, build_app

    app = build_app("unused-export-dir", name="x")  # the deployments as the application binds them
    bound = {"CascadeIngressx": app._bound_deployment, "Teacherx": app._bound_deployment.init_args[1]._bound_deployment}
    for deployment, method in ((CascadeIngress, "_cheap_stages"), (Teacher, "__call__")):
        batch = getattr(deployment.func_or_class, method)._get_max_batch_size()
        assert bound[deployment.name + "x"].max_ongoing_requests >= 2 * batch


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def test_every_process_of_the_session_listens_on_loopback_only(served):
    """Every listening socket of the driver and of every process of its Ray session (GCS, raylet, agents,
    Serve's controller and proxy, each replica) is on loopback. Ray Serve binds a replica's gRPC server
    to every interface unless the deployment rebinds it (titans.serve.replica_grpc_on_loopback)."""
    import psutil

    from titans.teachers import service

    _, _, port = served
    procs = {p.pid: " ".join(p.cmdline()) for p in service._session_processes(service._LOCAL["temp_dir"])}
    procs[os.getpid()] = "driver"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in procs]
    replicas = {pid for pid, cmd in procs.items() if "ServeReplica" in cmd}
    assert replicas and replicas <= {c.pid for c in listening}  # each replica's own server was seen
    assert port in {c.laddr.port for c in listening}  # the HTTP proxy
    exposed = [(procs[c.pid][:40], c.laddr) for c in listening if not _is_loopback(c.laddr.ip)]
    assert exposed == []


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
