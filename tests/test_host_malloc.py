"""The host allocator setting (titans.host_malloc): a large buffer freed in a worker thread is reused,
not mapped anew with a page fault per page; measured on the process's own fault counter."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread allocates, touches and frees an 80 MiB buffer (above glibc's 64 MiB per-thread heap,
# like XLA:CPU's step temporaries) 5 times; printed: the minor faults of the last 4 rounds.
_PROBE = r"""
import ctypes, resource, sys, threading
from titans import host_malloc
print(host_malloc.tune(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n, out = 80 << 20, []
def cycle():  # malloc directly (numpy would ask for transparent huge pages, which hides the faults)
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
def work():
    cycle()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(4):
        cycle()
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
print(out[0])
"""


def _faults(setting: str) -> int:
    env = dict(os.environ, PYTHONPATH=REPO, TITANS_HOST_MALLOC=setting)
    p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_a_large_buffer_freed_by_a_thread():
    pages = (80 << 20) // 4096
    default = _faults("default")
    if default < 2 * pages:
        pytest.skip(f"this C library does not remap large thread buffers ({default} faults in 4 rounds)")
    # glibc's defaults: every round maps the buffer anew and faults on each of its 20,480 pages.
    assert default >= 3 * pages
    # Tuned: the buffer freed in round 1 is reused; almost no faults.
    assert _faults("reuse") < pages // 10


def test_bad_setting_is_named():
    env = dict(os.environ, PYTHONPATH=REPO, TITANS_HOST_MALLOC="fast")
    p = subprocess.run(
        [sys.executable, "-c", "from titans import host_malloc; host_malloc.tune()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "TITANS_HOST_MALLOC='fast'" in p.stderr and "'reuse'" in p.stderr


def test_console_scripts_apply_it_before_their_entry():
    code = "from titans import host_malloc, logs; logs.run_cli(lambda: print(host_malloc._applied))"
    env = dict(os.environ, PYTHONPATH=REPO, TITANS_HOST_MALLOC="reuse")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ("tuned" if sys.platform.startswith("linux") else f"not glibc ({sys.platform})")
