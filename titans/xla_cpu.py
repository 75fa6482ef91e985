"""XLA:CPU settings for Titans' processes: convolutions on Eigen's multi-threaded kernels, not YNNPACK's.

jax 0.10's XLA:CPU hands every single convolution to YNNPACK (its default YNN fusion types include
"individual_convolution"). On this project's 2-core machine YNNPACK ran the quickstart teacher's
32 -> 64 convolution and its two gradients on one thread: the same time at 1 and at 2 threads
(forward 10.6 / 10.9 ms, kernel gradient 13.7 / 16.0 ms at batch 128), where XLA's Eigen path uses both.
Without that fusion type the teacher's training step took 41.9 ms instead of 58.5 ms at 2 threads, the
two compiled side by side in one process (the one-off benchmarks/conv_kernels.py and docs/benchmarks.md's
"XLA:CPU's convolutions off YNNPACK", in git before b2b70dd).

`tune()` appends `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to XLA_FLAGS, which
removes that one type from XLA's defaults and keeps the rest (YNNPACK's reductions and dots). A convolution
can still reach YNNPACK as the producer inside a reduce fusion (the teacher's 64 -> 32 input gradient, fused
with the pool's backward); in one trial each, taking reductions off YNNPACK too (`-reduce`) made the
teacher's step slower (68 against 40 ms), and so did a fusion fence after the training pool (50-56 ms). It must
run before JAX starts its backend (XLA reads XLA_FLAGS once, then); `titans.host.apply()` calls it (the
training commands, at the start of their `cli()`), and child processes (Ray workers, launched hosts)
inherit the variable. It
leaves XLA_FLAGS alone when:

* the user already set that flag (their value stands);
* `TITANS_XLA_CPU=default` asks for XLA's own defaults;
* the installed jaxlib is not one this was checked on: XLA aborts the whole process on a fusion type it
  does not know, so an unchecked version gets no flag rather than a crash;
* the backend has already started (too late to matter; reported, not raised).

The flag only concerns XLA:CPU; GPU and TPU compilations do not read it. Eigen's kernels sum in another
order than YNNPACK's, so CPU runs round differently from runs made without the flag.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

ENV = "TITANS_XLA_CPU"
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
# jaxlib (major, minor) versions whose XLA knows the "individual_convolution" YNN fusion type.
CHECKED_JAXLIB = ((0, 10),)
_applied: str | None = None


def tune() -> str:
    """Sets the flag once per process, when it applies; returns what was done ('tuned', or why not)."""
    global _applied
    if _applied is None:
        _applied = _decide()
    return _applied


def _decide() -> str:
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "default"):
        raise ValueError(f"{ENV}={choice!r}: expected 'tuned' (the default) or 'default' (XLA's own settings).")
    if choice == "default":
        return f"left at XLA's defaults ({ENV}=default)"
    flags = os.environ.get("XLA_FLAGS", "")
    if any(f.split("=", 1)[0] == FLAG for f in flags.split()):
        return f"left as set in XLA_FLAGS ({FLAG})"
    version = _jaxlib_version()
    if version is None or version[:2] not in CHECKED_JAXLIB:
        return f"not set: jaxlib {'.'.join(map(str, version or ())) or 'missing'} is not a checked version"
    if _backend_started():
        return "not set: the JAX backend had already started"
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={VALUE}".strip()
    return "tuned"


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")  # loaded with jax; this module does not import jax itself
    return bridge is not None and bool(bridge.backends_are_initialized())


def ynn_convolutions(hlo: str) -> int:
    """How many convolutions in a compiled module's HLO text (`compiled.as_text()`) run inside YNNPACK
    fusions: the ones in a computation that an instruction with a `__ynn_fusion` backend config calls."""
    lines = hlo.splitlines()
    called = {
        line.split("calls=", 1)[1].split(",", 1)[0].strip().lstrip("%")
        for line in lines
        if "__ynn_fusion" in line and "calls=" in line
    }
    found, computation = 0, None
    for line in lines:
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[0].lstrip("%")
        elif computation in called and " convolution(" in line:
            found += 1
    return found
