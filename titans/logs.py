"""Run outputs written by process 0: metrics.jsonl, TensorBoard events, and the console progress line."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends one JSON line per logged step to WORKDIR/metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115  (closed in close())
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}{k}": _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    """numpy/jax scalars -> Python numbers, so that json can write them."""
    return v.item() if hasattr(v, "item") else v


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


def setup_cli_logging() -> None:
    """What a command-line tool shows: Titans' INFO messages (resumed, finished, skipped ...) on
    stderr; orbax's and absl's own INFO chatter hidden."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def is_writer() -> bool:
    return jax.process_index() == 0
