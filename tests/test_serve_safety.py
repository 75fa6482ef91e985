"""titans-serve fails safe: request bodies are bounded before they are read whole and images before they
are parsed, every malformed input is a 400 (never a 500), a non-loopback --host needs --public, and a
start that fails or is interrupted exits non-zero with the reason and leaves no Ray process or temp dir.
(The served checks -- 413s, 503s, listening sockets -- are in tests/test_serving.py, on its cluster.)"""

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from helpers import REPO

serving = pytest.importorskip("titans.serve", reason="needs ray[serve] (the `serve` extra)")
serve_main = pytest.importorskip("titans.serve.__main__")
from starlette.requests import Request

SHAPE = (8, 8, 1)


def _request(chunks, headers=()):
    """A real Starlette request whose body arrives as `chunks`; `pulled` counts the chunks read."""
    pulled = []

    async def receive():
        i = len(pulled)
        pulled.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    scope = {"type": "http", "method": "POST", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    return Request(scope, receive), pulled


def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read():
    req, pulled = _request([b"x" * 10] * 3, [("content-length", str(10**12))])
    with pytest.raises(serving.TooLarge, match="1000000000000 bytes; this service takes at most 100"):
        asyncio.run(serving.read_body(req, 100))
    assert pulled == []


def test_a_streamed_body_is_read_up_to_the_limit_and_no_further():
    req, pulled = _request([b"x" * 40] * 1000)  # no Content-Length (chunked): 40 kB offered
    with pytest.raises(serving.TooLarge, match="passed 100 bytes"):
        asyncio.run(serving.read_body(req, 100))
    assert len(pulled) == 3  # 120 bytes: the chunk that crossed the limit is the last one read
    req, _ = _request([b"ab", b"cd"], [("content-length", "4")])
    assert asyncio.run(serving.read_body(req, 4)) == b"abcd"
    req, _ = _request([b"ab"], [("content-length", "-1")])
    with pytest.raises(serving.BadRequest, match="not a byte count"):
        asyncio.run(serving.read_body(req, 4))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _npy_header_claiming(rows: int) -> bytes:
    """A .npy header for (rows, 8, 8, 1) uint8 followed by one image's pixels."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (rows, *SHAPE)})
    return buf.getvalue() + bytes(64)


def _json(images) -> bytes:
    return json.dumps({"images": images}).encode()


ONE = np.zeros((1, *SHAPE), int).tolist()


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", "nested 100001 levels deep"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "expected a JSON object"),
        (_json(np.zeros((1, 8, 8, 1), int).tolist()).replace(b"0]", b"1" + b"0" * 400 + b"]", 1), "", "401 digits"),
        (_json(ONE).replace(b"0]", b"1e400]", 1), "application/json", "integers in [0, 255]"),
        (_json(ONE).replace(b"0]", b"NaN]", 1), "application/json", "got NaN"),
        (_json(ONE).replace(b"0]", b"-Infinity]", 1), "application/json", "got -Infinity"),
        (_json(ONE).replace(b"0]", b'"7"]', 1), "application/json", "array of numbers"),
        (_json(ONE).replace(b"0]", b"true]", 1), "application/json", "array of numbers"),
        (_json([[[[0]] * 8] * 8, [[[0]] * 8] * 7]), "application/json", "rectangular array"),
        (_json(ONE), "text/plain", "Content-Type must be application/json or application/x-npy"),
        (_json(ONE), "application/x-www-form-urlencoded", "got application/x-www-form-urlencoded"),
        (_npy_header_claiming(10**12), "application/x-npy", "1 to 256 images; got 1000000000000"),
        (_npy_header_claiming(2), "application/x-npy", "declares 128 pixels; the body holds 64 bytes"),
        (_npy(np.zeros((2, *SHAPE), np.float64)), "application/x-npy", "uint8 pixels; got dtype float64"),
        (_npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", "uint8 pixels; got dtype object"),
        (b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 60000, "application/x-npy", "not a .npy array"),
        (_json(ONE), "application/x-npy", "not a .npy array"),
    ],
)
def test_every_malformed_input_is_a_bad_request_naming_the_fault(body, content_type, message):
    with pytest.raises(serving.BadRequest) as e:
        serving.parse_images(body, SHAPE, 256, content_type)
    assert message in str(e.value) and e.value.status == 400


def test_the_image_count_is_checked_before_the_json_is_parsed(monkeypatch):
    """100,000 images (the hostile request, scaled to 8x8): refused from the brackets alone; the JSON
    parser is never called. A request within the limit is parsed, and equals its pixels."""
    calls = []
    real = json.loads
    spy = types.SimpleNamespace(loads=lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(serving, "json", spy)  # the module's own json, counting its parses
    body = b'{"images": [' + b",".join([b"[" + b",".join([b"[" + b"0," * 7 + b"0]"] * 8) + b"]"] * 100_000) + b"]}"
    with pytest.raises(serving.BadRequest, match="1 to 256 images; got 100000"):
        serving.parse_images(body, SHAPE, 256, "application/json")
    assert calls == []
    x = np.random.default_rng(0).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
    np.testing.assert_array_equal(serving.parse_images(_json(x.tolist()), SHAPE, 256), x)
    assert calls == [1]
    np.testing.assert_array_equal(serving.parse_images(_npy(x), SHAPE, 256, "application/x-npy"), x)
    fortran = _npy(np.asfortranarray(x))  # a column-major .npy keeps its pixel order
    np.testing.assert_array_equal(serving.parse_images(fortran, SHAPE, 256, "application/x-npy"), x)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--host", "0.0.0.0"], "--host=0.0.0.0 would serve beyond this machine"),
        (["--max_body_bytes", "0"], "--max_body_bytes must be positive"),
        (["--teacher_timeout_s", "-1"], "--teacher_timeout_s must be positive"),
    ],
)
def test_unsafe_or_meaningless_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        serve_main.parse_args(["--export", "x", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert serve_main.parse_args(["--export", "x", "--host", "0.0.0.0", "--public"]).host == "0.0.0.0"
    assert serve_main.parse_args(["--export", "x", "--host", "::1"]).host == "::1"


# ------------------------------------------------------------------ the CLI's failure paths (real Ray)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> dict:
    import psutil

    with_cmdline = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                with_cmdline[p.pid] = (p, " ".join(p.cmdline()))
    return with_cmdline


def _run_cli(args, *, until=None, signum=None, timeout=420):
    """Runs titans-serve in its own process; every 0.3 s records its process tree; when `until(tree)` first
    holds, sends `signum`. Returns (exit code, stderr, every process seen, the Ray temp dir it used)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "titans.serve", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, sent, t0 = {}, False, time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        seen.update(_descendants(proc.pid))
        if signum and not sent and until(seen):
            proc.send_signal(signum)
            sent = True
        time.sleep(0.3)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    dirs = {m for _, cmd in seen.values() for m in re.findall(r"/tmp/titans-ray-[A-Za-z0-9_]+", cmd)}
    assert len(dirs) == 1, f"expected one Ray session directory; saw {dirs}\n{err[-3000:]}"
    return proc.returncode, err, seen, dirs.pop()


def _assert_nothing_left(seen: dict, temp_dir: str) -> None:
    import psutil

    alive = []
    for pid, (p, cmd) in seen.items():
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, cmd[:80]))
    named = [p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    assert alive == [] and named == [], (alive, named)
    assert not os.path.exists(temp_dir)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, data_dir):
    """A two-stage export of small digits MLPs."""
    from helpers import digits_config

    from titans import export, train

    root = tmp_path_factory.mktemp("serve_safety")
    dirs = []
    for name, hidden in (("student", (8,)), ("teacher", (16,))):
        c = digits_config(data_dir, total_steps=20, **{"dataset.train_split": "train[:80%]"})
        c.model.kwargs.hidden = hidden
        train.train_and_evaluate(c, str(root / name))
        dirs.append(str(root / name))
    export.export_cascade(dirs, "msp", [0.3], "train[80%:]", str(root / "export"), batch_size=64)
    return root / "export"


@pytest.mark.slow
def test_a_broken_export_exits_1_with_the_reason_and_leaves_no_ray_behind(tiny_export, tmp_path):
    """The teacher stage file is missing: the deployments fail in their replicas; titans-serve says which
    file (the replica's own error), exits 1, and no process of its Ray session nor its temp dir is left."""
    broken = tmp_path / "export"
    shutil.copytree(tiny_export, broken)
    stage = json.loads((broken / "manifest.json").read_text())["stages"][-1]["file"]
    os.remove(broken / stage)
    code, err, seen, temp_dir = _run_cli(["--export", str(broken), "--port", str(_free_port()), "--num_cpus", "2"])
    assert code == 1, err[-3000:]
    assert "failed to start" in err and stage in err, err[-3000:]
    assert any("raylet" in cmd for _, cmd in seen.values())  # Ray did start: the cleanup had work to do
    _assert_nothing_left(seen, temp_dir)


@pytest.mark.slow
def test_sigterm_during_the_start_exits_143_and_leaves_no_ray_behind(tiny_export):
    """SIGTERM once Ray's workers are up (the application still starting): the start is abandoned,
    Ray shut down, its processes and temp dir gone, and the exit code says which signal."""

    def workers_up(seen):
        return sum("ray::" in cmd for _, cmd in seen.values()) >= 2

    code, err, seen, temp_dir = _run_cli(
        ["--export", str(tiny_export), "--port", str(_free_port()), "--num_cpus", "2"],
        until=workers_up,
        signum=signal.SIGTERM,
    )
    assert code == 128 + signal.SIGTERM, err[-3000:]
    _assert_nothing_left(seen, temp_dir)
