"""Host allocator settings for XLA:CPU runs: reuse a step's large buffers instead of mapping them anew.

XLA:CPU allocates an executable's temporaries (activations and gradients: 77 MiB a step for the
quickstart teacher at batch 128) with `posix_memalign` from one of its worker threads. glibc serves a
worker thread from a per-thread arena whose heaps hold at most 64 MiB, so a larger request falls back to
`mmap`, is unmapped again when freed, and every one of its 4 KiB pages faults on first touch the next
step: about 20,000 minor page faults a step, a quarter of the run's CPU time spent in the kernel
(docs/benchmarks.md, "Runtime overhead").

`tune()` sets glibc's `mallopt` so that freed memory is kept and reused: one arena for every thread
(M_ARENA_MAX=1, whose heap grows with brk and has no size limit), no mmap for large blocks
(M_MMAP_MAX=0) and no trimming of the heap's free top (M_TRIM_THRESHOLD at its maximum). The cost: the
process's resident memory does not shrink after a peak (peak RSS 851 -> 1,514 MB on the quickstart teacher), and
all threads share one arena lock (XLA allocates a few large blocks a step, not many small ones).

Every console script calls `tune()` before the JAX backend starts (`titans.logs.run_cli`); threads
that already allocated keep their arena, so calling it later helps only threads started later. It does
nothing off glibc (macOS, musl) and when `TITANS_HOST_MALLOC=default` asks to leave glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "TITANS_HOST_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
_applied: str | None = None


def tune() -> str:
    """Applies the settings once per process; returns what was done ('tuned', or why not)."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "reuse").strip().lower()
    if choice not in ("reuse", "default"):
        raise ValueError(f"{ENV}={choice!r}: expected 'reuse' (the default) or 'default' (glibc's own settings).")
    if choice == "default":
        _applied = f"left at glibc's defaults ({ENV}=default)"
    elif not sys.platform.startswith("linux"):
        _applied = f"not glibc ({sys.platform})"
    else:
        _applied = _mallopt()
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
