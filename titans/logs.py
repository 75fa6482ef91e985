"""Run outputs written by process 0: metrics.jsonl, TensorBoard events, and the console progress line."""

from __future__ import annotations

import json
import logging
import math
import sys
import time

import jax

from titans import cli, host, paths, tensorboard


class MetricWriter:
    """Appends one JSON line per logged step to WORKDIR/metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True, keep_through_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        paths.makedirs(workdir)
        if keep_through_step is not None:
            _truncate_metrics(paths.join(workdir, "metrics.jsonl"), keep_through_step)
        self._file = paths.AppendFile(paths.join(workdir, "metrics.jsonl"))
        self._tb = tensorboard.EventWriter(paths.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}{k}": _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            finite = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
            self._tb.scalars(finite, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    """numpy/jax scalars -> Python numbers, non-finite ones -> None: metrics.jsonl is strict JSON."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a line cut off by a killed writer is skipped with a warning
    naming the file and the line."""
    rows = []
    content = paths.read_text(path)
    if content is None:
        return rows
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            logging.warning("%s: line %d is not valid JSON (cut off by a killed run?); skipped.", path, number)
    return rows


def _truncate_metrics(path: str, step: int) -> None:
    """Keeps the rows up to `step` (where a resumed run restarts), so no step is logged twice."""
    if not paths.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def progress_note(name: str, text: str, enabled: bool = True) -> None:
    """A line of the progress output (stdout, process 0): `[name] text`; also logged."""
    logging.info("[%s] %s", name, text)
    if enabled:
        print(f"[{name}] {text}", flush=True)


def progress_bar(label: str, done: int, total: int, t0: float) -> None:
    """Redraws a one-line progress bar with elapsed time and ETA on stderr (`t0`: perf_counter at start)."""
    frac = done / max(total, 1)
    elapsed = time.perf_counter() - t0
    eta = elapsed / frac - elapsed if frac > 0 else 0.0
    print(
        f"\r{label} [{'#' * int(30 * frac):<30}] {done}/{total} {elapsed:.0f}s ETA {eta:.0f}s",
        end="",
        file=sys.stderr,
        flush=True,
    )


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Console line with step, metrics, throughput and ETA. Time spent compiling the first step is
    left out of the throughput, which is measured over the steps since the previous line."""

    def __init__(self, total_steps: int, batch_size: int, name: str, enabled: bool = True):
        self.total, self.batch_size, self.name, self.enabled = total_steps, batch_size, name, enabled
        self._t = None
        self._step = None
        self.examples_per_s = float("nan")

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def update(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        if self._t is not None and step > self._step:
            sec_per_step = (now - self._t) / (step - self._step)
            self.examples_per_s = self.batch_size / sec_per_step
            eta = format_duration(sec_per_step * (self.total - step))
        else:
            eta = "?"
        self._t, self._step = now, step
        if not self.enabled:
            return
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        print(
            f"[{self.name}] step {step}/{self.total} | {shown} | {self.examples_per_s:,.0f} ex/s | ETA {eta}",
            file=sys.stdout,
            flush=True,
        )


# The console scripts' entry and logging live in titans.cli, their CPU settings in titans.host; these names
# stay for the callers that use them (titans.export, titans.serve, benchmarks/).
setup_cli_logging = cli.setup_logging
run_cli = cli.run


def process_setup() -> dict:
    """`titans.host.apply()`: the CPU process settings of the console scripts (what the benchmarks run with)."""
    return host.apply()


def is_writer() -> bool:
    return jax.process_index() == 0
