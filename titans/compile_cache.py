"""JAX's persistent compilation cache for Titans' processes: a program compiled once is loaded, not compiled,
by the next process that needs it.

A Titans run compiles dozens of programs: its train and eval steps, and one small program per parameter
shape for the initialisers. On this project's 2-core machine the quickstart's 53 compilations took 8.3 s
(0.26 s for even a tiny initialiser), about a third of a short run; a second run of the same config with
the cache took 14.5 s against 24.0 s (docs/benchmarks.md's "One read of the split, and the
compilation cache", in git before b2b70dd).

`enable()` points JAX at `$TITANS_COMPILATION_CACHE` (default: `$XDG_CACHE_HOME/titans/jax`, else
`~/.cache/titans/jax`) and caches every compilation, however short (JAX's own default keeps only those
over 1 s, which leaves out the initialisers). JAX keys an entry by the program, the jax/jaxlib version, the
backend and device, and the XLA flags, so a changed model, flag or version compiles anew. It leaves JAX's
settings alone when `TITANS_COMPILATION_CACHE=off`, or when a cache directory is already configured
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`). `titans.host.apply()` calls it (the training commands, at
the start of their `cli()`); importing this module imports nothing heavy and changes nothing.
"""

from __future__ import annotations

import os

ENV = "TITANS_COMPILATION_CACHE"
_applied: str | None = None


def default_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "titans", "jax")


def enable() -> str:
    """Turns the cache on once per process, when it applies; returns what was done."""
    global _applied
    if _applied is None:
        _applied = _decide()
    return _applied


def directory() -> str | None:
    """The cache directory when `enable()` turned Titans' cache on in this process (every compilation cached);
    None when it did not, or was not called."""
    return _applied[len("on: ") :] if _applied is not None and _applied.startswith("on: ") else None


def _decide() -> str:
    import jax  # noqa: PLC0415  (deferred: a training command re-executes itself under jemalloc before importing JAX)

    choice = os.environ.get(ENV, "").strip()
    if choice.lower() == "off":
        return f"off ({ENV}=off)"
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return f"left as configured: {configured}"
    path = os.path.abspath(os.path.expanduser(choice or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        return f"off: cannot create {path} ({e.strerror})"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return f"on: {path}"
