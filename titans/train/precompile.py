"""A run's train and eval steps compiled in a child process, so that the training process only loads them
(opt-in: `TITANS_COMPILE_IN_CHILD=on`).

On XLA:CPU, a process that compiled a large program runs its later steps more slowly than a process that
loaded the same program from JAX's persistent compilation cache: the quickstart teacher's step took 1.075
[0.903, 1.280] times as long, with 9-12 times the voluntary context switches in every pair
(benchmarks/compile_after_effect.py; docs/benchmarks.md, "Why a first run is slower than its compile time").
A warm run loads every step. This module lets a first run do the same:

* `start(config, workdir, method)` launches a child Python (`main` below) as soon as the trainer knows
  the run will train. The child builds the run's model, optimizer and steps through the trainer's own
  functions (`titans.train.trainer.compile_steps`), lowers the train step on one batch of the training split
  and the eval step on one eval batch, and compiles both into the cache. Meanwhile the parent reads the
  split into memory and initialises its model.
* `Child.wait()`, just before the first step: the parent waits for the child, and its first call of each
  step then loads the program from the cache.

It is off unless `TITANS_COMPILE_IN_CHILD=on`. On this project's 2-core machine, in 4 pairs of first
(cold-cache) `configs/quickstart.py:0.3` runs, the student's steps ran faster with it (time per example
0.859 [0.742, 0.996]; the teacher's 0.949 [0.733, 1.230], unresolved), but the whole run did not: it took
1.124 [0.872, 1.449] times as long, unresolved (benchmarks/compile_in_child.py;
docs/benchmarks.md, "Compiling the steps in a child process"). The child's start (importing JAX and Titans:
5.6 s) and its tracing are paid in series before the student's stage, and on two cores its compile competes
with the parent's work. It may pay off where cores are spare and runs are long; measure before relying on it.
When on, it applies on the CPU backend, in a single-process run, with Titans' own compilation cache on
(`titans.compile_cache`), for the config's own method (not a method object passed in by the ensemble or
active-distillation runners) and a teacher that is none or online. A child that fails or runs past
`TIMEOUT_S` is reported in the log and killed; the parent then compiles as it would have without it. The
child writes nothing but cache entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time

import jax

from titans import compile_cache, logs

ENV = "TITANS_COMPILE_IN_CHILD"
TIMEOUT_S = 900.0
# The child's command line: `python -c CHILD_CODE CONFIG.pkl WORKDIR` (not `-m`: the package imports this module).
CHILD_CODE = (
    "import sys; from titans.train import precompile, trainer; "
    "sys.exit(precompile.main(sys.argv, trainer.compile_steps))"
)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def choice() -> str:
    value = os.environ.get(ENV, "off").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{ENV}={value!r}: expected 'off' (the default) or 'on'.")
    return value


def applies(config, method) -> str | None:
    """None when the steps should be compiled in a child, else why not."""
    if choice() == "off":
        return f"{ENV}=off (the default)"
    if method is not None:
        return "a method object was passed in"
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()}"
    if jax.process_count() != 1:
        return "a multi-process run"
    if not _titans_cache_on():
        return "Titans' compilation cache is off"
    if config.distill.teacher_workdir and config.distill.teacher_mode != "online":
        return f"distill.teacher_mode={config.distill.teacher_mode}"
    return None


def _titans_cache_on() -> bool:
    return compile_cache.directory() is not None


class Child:
    """A running compile child; `wait()` before the first step, `stop()` always."""

    def __init__(self, proc: subprocess.Popen, log_path: str, config_path: str, name: str):
        self.proc, self.log_path, self.config_path, self.name = proc, log_path, config_path, name
        self.started = time.perf_counter()

    def wait(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Waits for the child; True when it compiled the steps, False (logged) when it failed or timed out."""
        try:
            code = self.proc.wait(timeout=max(0.0, timeout_s - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            logging.warning("[%s] the compile child ran past %.0f s; killed, compiling here.", self.name, timeout_s)
            self.stop()
            return False
        if code != 0:
            logging.warning(
                "[%s] the compile child failed (exit %s); compiling here. Its last output:\n%s",
                self.name,
                code,
                self._tail(),
            )
            return False
        logging.info("[%s] steps compiled in a child in %.1f s", self.name, time.perf_counter() - self.started)
        return True

    def _tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        """Ends the child if it still runs, and removes its files."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in (self.log_path, self.config_path):
            with contextlib.suppress(OSError):
                os.remove(path)


def start(config, workdir: str, method=None) -> Child | None:
    """Launches the compile child for this run, or returns None (logged) when it does not apply."""
    why_not = applies(config, method)
    if why_not is not None:
        logging.debug("[%s] steps compiled in this process: %s", config.name, why_not)
        return None
    fd, config_path = tempfile.mkstemp(prefix="titans_precompile_", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(config, f)
    log_fd, log_path = tempfile.mkstemp(prefix="titans_precompile_", suffix=".log")
    env = dict(os.environ)
    env[ENV] = "off"  # the child compiles; it does not start a child of its own
    env["TITANS_COMPILATION_CACHE"] = compile_cache.directory()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, config_path, os.path.abspath(workdir)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )
    except OSError as e:
        logging.warning("[%s] cannot start the compile child (%s); compiling here.", config.name, e)
        os.remove(config_path)
        os.remove(log_path)
        return None
    finally:
        os.close(log_fd)
    return Child(proc, log_path, config_path, config.name)


def main(argv: list[str], compile_steps) -> int:
    """The child: `compile_steps(config, workdir)` (the trainer's) with the parent's process settings."""
    if len(argv) != 3:
        print(
            "usage: python -c CHILD_CODE CONFIG.pkl WORKDIR (started by titans.train.precompile.start)", file=sys.stderr
        )
        return 2
    logs.process_setup()  # the parent's allocator, XLA flags (inherited) and cache directory
    with open(argv[1], "rb") as f:
        config = pickle.load(f)
    compile_steps(config, argv[2])
    return 0
