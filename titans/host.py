"""The CPU process settings of Titans' training commands, applied only when a command asks: `apply()`.

Importing `titans`, or any of its modules, changes nothing about the process: no re-execution, no
environment variable, no XLA flag, no allocator setting (tests/test_cli.py checks every module). The
console scripts that train (`titans-train`, `titans-active`) call `apply(jemalloc=True)` at the start
of their `cli()`, after parsing their flags and before importing JAX; a notebook or a script may call
`apply()` itself, before JAX's backend starts. Each setting was kept because its own benchmark showed a
gain whose 95% interval excludes 1 (one-off benchmarks, in git before b2b70dd: docs/benchmarks.md there):

* the host allocator (`titans.host_malloc`): jemalloc with page decay off where it is installed, the
  process re-executed with it preloaded (`jemalloc=True`; a 1-epoch quickstart took 0.868 [0.783, 0.962]
  times as long as under glibc), else glibc's `mallopt` set to reuse freed memory (the teacher's step
  0.635 [0.567, 0.710] times as long as with glibc's defaults); `TITANS_HOST_MALLOC=auto|jemalloc|reuse|default`;
* XLA:CPU's convolutions on Eigen's multi-threaded kernels, not YNNPACK's (`titans.xla_cpu`: the teacher's
  step 0.705 [0.688, 0.723] at 2 threads); `TITANS_XLA_CPU=default` leaves XLA's own choice;
* JAX's persistent compilation cache (`titans.compile_cache`: a second quickstart 0.797 [0.729, 0.871]
  times as long as the first); `TITANS_COMPILATION_CACHE=PATH|off`.

What the process runs with is printed as one line on stderr, `titans process settings: ...`.
"""

from __future__ import annotations

import sys

from titans import compile_cache, host_malloc, xla_cpu

_applied: dict | None = None


def apply(*, jemalloc: bool = False) -> dict:
    """Applies the settings once per process and returns what each did. With `jemalloc`, first re-executes
    the process with jemalloc preloaded when `TITANS_HOST_MALLOC` allows it and the library is installed
    (`host_malloc.preload`): the process starts again from the beginning, so call it before anything slow
    (importing JAX). Must run before the JAX backend starts (XLA reads XLA_FLAGS once, then)."""
    global _applied
    if _applied is None:
        if jemalloc:
            host_malloc.preload()
        _applied = {
            "host_malloc": host_malloc.tune(),
            "xla_cpu": xla_cpu.tune(),
            "compile_cache": compile_cache.enable(),
        }
        print("titans process settings: " + "; ".join(f"{k} {v}" for k, v in _applied.items()), file=sys.stderr)
    return _applied
