"""Host allocator settings for XLA:CPU runs: reuse a step's large buffers instead of mapping them anew.

XLA:CPU allocates an executable's temporaries (activations and gradients: 77 MiB a step for the
quickstart teacher at batch 128) with `posix_memalign` from one of its worker threads. glibc serves a
worker thread from a per-thread arena whose heaps hold at most 64 MiB, so a larger request falls back to
`mmap`, is unmapped again when freed, and every one of its 4 KiB pages faults on first touch the next
step: about 20,000 minor page faults a step, a quarter of the run's CPU time spent in the kernel
(docs/benchmarks.md's "Runtime overhead", in git before b2b70dd).

Two remedies, chosen by ``TITANS_HOST_MALLOC``:

* ``jemalloc``: the Titans commands run under jemalloc (Debian/Ubuntu: ``libjemalloc2``) with page decay
  off (``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``: freed pages are kept for reuse). A process
  must load an allocator before its first allocation, so `preload()` re-executes the process with
  ``LD_PRELOAD`` set (`titans.host.apply(jemalloc=True)`, called by the training commands at the start of
  their `cli()`, before they import JAX; the re-execution costs about 0.1 s). A first (cold-cache) 1-epoch quickstart ran
  0.868 [0.783, 0.962] times as long as under glibc with the `reuse` settings, with a lower peak RSS (4
  pairs; docs/benchmarks.md's "jemalloc", in git before b2b70dd).
* ``reuse``: glibc's `mallopt` set so that freed memory is kept and reused: one arena for every thread
  (M_ARENA_MAX=1, whose heap grows with brk and has no size limit), no mmap for large blocks
  (M_MMAP_MAX=0) and no trimming of the heap's free top (M_TRIM_THRESHOLD at its maximum). `tune()`
  applies it; threads that already allocated keep their arena, so it helps only threads started later.

``auto`` (the default) is ``jemalloc`` where the library is found and ``reuse`` elsewhere; ``default``
leaves glibc's own settings. ``TITANS_JEMALLOC=/path/libjemalloc.so.2`` names the library. The cost of
both remedies: the process's resident memory does not shrink after a peak (peak RSS 851 -> 1,514 MB on
the quickstart teacher with `reuse`; a 1-epoch quickstart peaked at 1,151-1,228 MB under jemalloc against
1,339-1,659 MB with `reuse`).

Nothing here runs on import: `titans.host.apply()` calls `preload()` and `tune()` for the commands that
ask. Child processes inherit ``LD_PRELOAD`` and ``MALLOC_CONF``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "TITANS_HOST_MALLOC"
CHOICES = ("auto", "jemalloc", "reuse", "default")
JEMALLOC_ENV = "TITANS_JEMALLOC"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Where Debian, Ubuntu and Fedora put the library (x86-64 and Arm).
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
# Set in the environment of the re-executed process, so that a preload that did not take is not retried.
_REEXECUTED = "TITANS_HOST_MALLOC_REEXECUTED"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
_applied: str | None = None


def choice() -> str:
    """``TITANS_HOST_MALLOC``, checked."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in CHOICES:
        raise ValueError(
            f"{ENV}={value!r}: expected one of {CHOICES}: 'auto' (the default: jemalloc where it is installed, "
            "else 'reuse'), 'jemalloc', 'reuse' (glibc set to keep freed memory) or 'default' (glibc's own settings)."
        )
    return value


def find_jemalloc() -> str | None:
    """The jemalloc library to preload: ``TITANS_JEMALLOC`` (which must exist), else the first of
    JEMALLOC_PATHS that exists."""
    named = os.environ.get(JEMALLOC_ENV, "").strip()
    if named:
        if not os.path.isfile(named):
            raise ValueError(f"{JEMALLOC_ENV}={named!r}: no such file.")
        return named
    return next((path for path in JEMALLOC_PATHS if os.path.isfile(path)), None)


def jemalloc_loaded() -> bool:
    """Whether a jemalloc library is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any("libjemalloc" in line for line in f)
    except OSError:
        return False


def preload() -> None:
    """Re-executes this process with jemalloc preloaded when ``TITANS_HOST_MALLOC`` is ``auto`` or
    ``jemalloc``, the library is found and not yet loaded, on Linux. Does nothing otherwise, and once only:
    the new process does not try again (`tune()` then reports why jemalloc is missing). Call it first, before
    anything starts a thread or allocates much: the new process starts from the beginning."""
    if not sys.platform.startswith("linux") or os.environ.get(_REEXECUTED) or choice() not in ("auto", "jemalloc"):
        return
    if jemalloc_loaded():
        return
    library = find_jemalloc()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = os.pathsep.join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # a user's own MALLOC_CONF wins
    env[_REEXECUTED] = library
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def tune() -> str:
    """Applies the choice once per process; returns what the process runs with ('jemalloc ...', 'tuned', or
    why neither). With ``jemalloc`` chosen, a process without it is an error."""
    global _applied
    if _applied is not None:
        return _applied
    value = choice()
    if value in ("auto", "jemalloc") and jemalloc_loaded():
        _applied = f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
    elif value == "jemalloc":
        library = find_jemalloc()
        why = (
            "no libjemalloc.so.2 found (Debian/Ubuntu: apt-get install libjemalloc2; or set TITANS_JEMALLOC)"
            if library is None
            else f"{library} did not load"
            if os.environ.get(_REEXECUTED)
            else "this process did not preload it (titans.host.apply(jemalloc=True) does): start it with "
            f"LD_PRELOAD={library} MALLOC_CONF={JEMALLOC_CONF}"
        )
        raise RuntimeError(f"{ENV}=jemalloc: {why}.")
    elif value == "default":
        _applied = f"left at glibc's defaults ({ENV}=default)"
    elif not sys.platform.startswith("linux"):
        _applied = f"not glibc ({sys.platform})"
    else:
        _applied = _mallopt()
        if value == "auto" and os.environ.get(_REEXECUTED):
            _applied += f" (glibc: {os.environ[_REEXECUTED]} did not load)"
    return _applied


def _mallopt() -> str:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no mallopt in this C library"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    failed = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    return "tuned" if not failed else f"mallopt refused parameters {failed}"
