"""The host allocator setting (titans.host_malloc): a large buffer freed in a worker thread is reused,
not mapped anew with a page fault per page, measured on the process's own fault counter; jemalloc preloaded
by re-executing the process (titans.host.apply(jemalloc=True), the training commands), with its settings
reaching the allocator."""

import os
import subprocess
import sys

import pytest

from titans import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread allocates, touches and frees an 80 MiB buffer (above glibc's 64 MiB per-thread heap,
# like XLA:CPU's step temporaries) 5 times; printed: the minor faults of the last 4 rounds.
_PROBE = r"""
import ctypes, resource, sys, threading
from titans import host_malloc
host_malloc.preload()  # re-executes this process under jemalloc for 'auto' and 'jemalloc' where installed
print(host_malloc.tune(), file=sys.stderr)
libc = ctypes.CDLL(None)  # the process's malloc: glibc's, or jemalloc's when preloaded
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


def _env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", host_malloc._REEXECUTED)}
    return dict(env, PYTHONPATH=REPO, **settings)


def _python(code: str, timeout: float = 120, **settings) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process with `settings` added to a clean allocator environment."""
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(**settings), capture_output=True, text=True, timeout=timeout
    )


def _faults(setting: str) -> int:
    p = _python(_PROBE, TITANS_HOST_MALLOC=setting)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


JEMALLOC = host_malloc.find_jemalloc() if sys.platform.startswith("linux") else None
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed (CI installs it)")


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
    p = _python("from titans import host_malloc; host_malloc.tune()", TITANS_HOST_MALLOC="fast")
    assert p.returncode != 0 and "TITANS_HOST_MALLOC='fast'" in p.stderr and "'reuse'" in p.stderr


def test_host_apply_sets_it():
    code = "from titans import host, host_malloc; host.apply(); print(host_malloc._applied)"
    p = _python(code, TITANS_HOST_MALLOC="reuse")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ("tuned" if sys.platform.startswith("linux") else f"not glibc ({sys.platform})")
    assert "titans process settings: host_malloc " in p.stderr


@needs_jemalloc
def test_jemalloc_reuses_a_large_buffer_freed_by_a_thread():
    """Under jemalloc with decay off, the 80 MiB buffer freed in round 1 is reused: almost no faults."""
    assert _faults("jemalloc") < (80 << 20) // 4096 // 10


# Prints its pid, re-executes itself under jemalloc, then
# reads jemalloc's own setting of page decay back through its mallctl.
_PRELOAD_PROBE = r"""
import ctypes, os
print("start", os.getpid(), flush=True)
from titans import host_malloc
host_malloc.preload()
value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
rc = -1 if mallctl is None else mallctl(b"opt.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, 0)
print("after", os.getpid(), host_malloc.jemalloc_loaded(), rc, value.value, host_malloc.tune())
"""


@needs_jemalloc
def test_preload_reexecutes_the_process_under_jemalloc_with_decay_off():
    """preload() replaces the process (same pid, run again from the start) by one with jemalloc mapped, and
    MALLOC_CONF reaches jemalloc: its opt.dirty_decay_ms reads -1 (its default is 10 s)."""
    p = _python(_PRELOAD_PROBE)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    pid = lines[0].split()[1]
    assert lines[:2] == [f"start {pid}", f"start {pid}"]  # once before the re-execution, once after
    assert lines[2] == f"after {pid} True 0 -1 jemalloc (MALLOC_CONF={host_malloc.JEMALLOC_CONF})"


@needs_jemalloc
def test_a_users_malloc_conf_is_kept():
    p = _python(_PRELOAD_PROBE, MALLOC_CONF="dirty_decay_ms:2500")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[2].split()[3:5] == ["0", "2500"]


def test_other_choices_do_not_reexecute():
    """'reuse' and 'default' leave the process as it is (one start, no jemalloc)."""
    for setting, applied in (("reuse", "tuned"), ("default", "left at glibc's defaults")):
        p = _python(_PRELOAD_PROBE, TITANS_HOST_MALLOC=setting)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("start") == 1 and " False " in p.stdout and applied in p.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_a_library_that_does_not_load_is_tried_once(tmp_path):
    """A jemalloc that the loader cannot preload (here an empty file) re-executes the process once, not in a
    loop; 'auto' then runs on glibc's reuse settings and says why."""
    fake = tmp_path / "libjemalloc.so.2"
    fake.write_bytes(b"")
    p = _python(_PRELOAD_PROBE, timeout=60, TITANS_JEMALLOC=str(fake))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("start") == 2 and f"tuned (glibc: {fake} did not load)" in p.stdout


def test_jemalloc_asked_for_but_missing_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "libjemalloc.so.2"
    code = "from titans import host_malloc; host_malloc.tune()"
    p = _python(code, timeout=60, TITANS_HOST_MALLOC="jemalloc", TITANS_JEMALLOC=str(missing))
    assert p.returncode != 0 and f"TITANS_JEMALLOC={str(missing)!r}: no such file" in p.stderr
    if JEMALLOC is not None:  # found, but this process never preloaded it: the error says how to
        p = _python(code, timeout=60, TITANS_HOST_MALLOC="jemalloc")
        assert p.returncode != 0 and f"LD_PRELOAD={JEMALLOC}" in p.stderr


@needs_jemalloc
def test_titans_train_runs_under_jemalloc_and_says_so(tmp_path):
    """`python -m titans.main` re-executes itself under jemalloc at the start of its cli() (titans.host.apply),
    after its flags parsed, and its first line on stderr says what the process runs with. (The override names
    no field, so the command stops there, exit 2.)"""
    args = ["--config=configs/digits.py", f"--workdir={tmp_path}", "--config.no_such_field=1"]
    p = subprocess.run(
        [sys.executable, "-m", "titans.main", *args], env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert p.returncode == 2 and "Unknown config field 'no_such_field'" in p.stderr, p.stderr
    assert f"host_malloc jemalloc (MALLOC_CONF={host_malloc.JEMALLOC_CONF})" in p.stderr


def test_help_and_a_bad_flag_leave_the_process_alone():
    """`--help` and a bad flag exit before the settings: no re-execution, no settings line."""
    for arg, code in (("--help", 0), ("--no_such_flag=1", 2)):
        p = subprocess.run(
            [sys.executable, "-m", "titans.main", arg],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert p.returncode == code and "titans process settings" not in p.stderr, p.stderr
