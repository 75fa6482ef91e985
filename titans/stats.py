"""Summary statistics for result tables: mean and spread over seeds, paired differences with an interval.

Every comparison in docs/results is a paired difference: the same seed (same teacher, same data order)
run with method A and with method B, d_i = A_i - B_i. Its 95% interval is Student's t on the n - 1
degrees of freedom of the seeds, mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n). The verdict says
"better" or "worse" only when the interval excludes zero, and "unresolved" when it spans it: with three
seeds (t = 4.30) only differences several times the seed-to-seed spread are resolved.
"""

from __future__ import annotations

import base64
import dataclasses
import math

import numpy as np
from scipy import stats as sp_stats


def finite(values) -> np.ndarray:
    """The finite entries of `values` (None and NaN dropped) as float64."""
    return np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def mean_sd(values, fmt: str = "{:.4f}") -> str:
    """'mean ± sd' (ddof=1) over the finite values; '(k/n seeds)' when some were missing; 'n/a' if none."""
    v = finite(values)
    if len(v) == 0:
        return "n/a"
    spread = v.std(ddof=1) if len(v) > 1 else 0.0
    out = f"{fmt.format(v.mean())} ± {fmt.replace('+', '').format(spread)}"
    return out if len(v) == len(list(values)) else f"{out} ({len(v)}/{len(list(values))} seeds)"


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over paired seeds, its 95% t-interval and the verdict it supports."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        if self.n < 2 or not math.isfinite(self.low):
            return "unresolved"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "unresolved"

    def format(self, fmt: str = "{:+.4f}") -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{fmt.format(self.mean)} (1 seed)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
    """a - b over the pairs where both are finite (same order = same seed)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    d = finite([x - y for x, y in pairs])
    n = len(d)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, 1)
    half = float(sp_stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return PairedDifference(mean, mean - half, mean + half, n)


def claim_verdict(d: PairedDifference) -> str:
    """A claim "A beats B" given d = A - B: reproduced (interval above zero), not reproduced (below zero),
    or unresolved (it spans zero, or too few seeds)."""
    return {"better": "reproduced", "worse": "not reproduced"}.get(d.verdict, "unresolved")


def not_worse_verdict(d: PairedDifference, margin: float) -> str:
    """A claim "A is as good as B" given d = A - B and a tolerance `margin` fixed in advance: reproduced when
    the whole interval lies above -margin, not reproduced when it lies below, else unresolved."""
    if d.n < 2 or not math.isfinite(d.low):
        return "unresolved"
    if d.low > -margin:
        return "reproduced"
    if d.high < -margin:
        return "not reproduced"
    return "unresolved"


def non_inferiority_verdict(d: PairedDifference, margin: float) -> str:
    """The test of "A is non-inferior to B within `margin`" (a tolerance declared before looking), given the
    paired d = A - B: "non-inferior" when the lower end of the 95% interval is above -margin, "inferior" when
    its upper end is below -margin, else "unresolved" (also with fewer than two pairs)."""
    if margin < 0:
        raise ValueError(f"a non-inferiority margin is >= 0, got {margin}")
    if d.n < 2 or not math.isfinite(d.low):
        return "unresolved"
    if d.low > -margin:
        return "non-inferior"
    if d.high < -margin:
        return "inferior"
    return "unresolved"


@dataclasses.dataclass(frozen=True)
class TimeRatio:
    """The geometric mean over paired repeats of time_a / time_b, its 95% interval (a t-interval on the log
    ratios, mapped back), and the verdict against a target the ratio must reach."""

    geomean: float
    low: float
    high: float
    n: int
    target: float | None

    @property
    def verdict(self) -> str:
        """Against `target`: "met" when the whole interval is at or above it, "not met" when the whole
        interval is below it, else "unresolved" (also with fewer than 2 repeats or no target)."""
        if self.target is None or self.n < 2 or not math.isfinite(self.low):
            return "unresolved"
        if self.low >= self.target:
            return "met"
        if self.high < self.target:
            return "not met"
        return "unresolved"

    def faster(self, a: str, b: str) -> str:
        """Which of the two timed sides is faster: "{a} faster" when the whole interval of time_a / time_b is
        below 1, "{b} faster" when it is above 1, else "unresolved"."""
        if self.n < 2 or not math.isfinite(self.low):
            return "unresolved"
        if self.high < 1:
            return f"{a} faster"
        if self.low > 1:
            return f"{b} faster"
        return "unresolved"

    def describe(self, a: str, b: str) -> str:
        """ "1.124 [0.872, 1.449] (unresolved)": the ratio, its interval and `faster(a, b)`."""
        return f"{self.geomean:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.faster(a, b)})"

    def as_dict(self, a: str, b: str) -> dict:
        """The ratio for a benchmark's JSON: geomean, low, high, n and `faster(a, b)`."""
        return {"geomean": self.geomean, "low": self.low, "high": self.high, "n": self.n, "faster": self.faster(a, b)}


def time_ratio(times_a, times_b, target: float | None = None) -> TimeRatio:
    """time_a / time_b over paired repeats (same position = timed back to back), e.g. PyTorch's time over
    Titans' for one step; see `TimeRatio`."""
    d = paired_difference([math.log(a) for a in times_a], [math.log(b) for b in times_b])
    return TimeRatio(math.exp(d.mean), math.exp(d.low), math.exp(d.high), d.n, target)


def claims_table(rows: list[tuple[str, PairedDifference, str]], fmt: str = "{:+.4f}", primary: str = "") -> str:
    """Markdown rows of (claim, paired difference, verdict); with `primary` (the declared claim's text), a role
    column marks that row primary and the others exploratory."""
    if not primary:
        lines = ["| claim | paired difference [95% CI] | verdict |", "|---|---|---|"]
        lines += [f"| {claim} | {d.format(fmt)} | {verdict} |" for claim, d, verdict in rows]
        return "\n".join(lines)
    lines = ["| claim | role | paired difference [95% CI] | verdict |", "|---|---|---|---|"]
    for claim, d, verdict in rows:
        role = "primary" if claim == primary else "exploratory"
        lines.append(f"| {claim} | {role} | {d.format(fmt)} | {verdict} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ test-set sampling

BOOTSTRAP_REPLICATES = 500


def bootstrap_difference(d: PairedDifference, diffs: list[np.ndarray], replicates: int = BOOTSTRAP_REPLICATES):
    """`d` (the paired t-interval over seeds) widened by test-set sampling: the test rows are resampled with
    replacement (one resample shared by both arms and every seed), the per-row differences of the two arms
    averaged over seeds; half-width = sqrt(h_seeds^2 + (1.96 sd_bootstrap)^2). `diffs` holds one array of
    per-row differences (in the unit of `d`) per seed."""
    if d.n < 2 or not diffs:
        return d
    mean_rows = np.mean(diffs, axis=0)
    n = len(mean_rows)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float32)
    spread = float(np.std(counts @ mean_rows.astype(np.float32) / n, ddof=1))
    half = float(np.hypot(d.high - d.mean, 1.96 * spread))
    return PairedDifference(d.mean, d.mean - half, d.mean + half, d.n)


def pack_bits(bits) -> str:
    """Per-row booleans (e.g. correct on each test row) as base64 of packed bits: 1,470 bytes per 10,000 rows."""
    return base64.b64encode(np.packbits(np.asarray(bits, bool)).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)
