"""The one harness every benchmark runs under.

A benchmark is a registered unit (`register`): a name, its arguments and a function that builds a `Plan`
(the sides it times, each a callable returning the seconds of one measurement, and the ratios it
compares). The harness times the sides interleaved (A, B, A, B, ...: one round times every side once),
screens the machine (other processes' CPU load before and after; the CPU time the hypervisor gave other
guests during each round, a round over `--max_steal` s is kept in the record but left out of the ratios and
replaced), computes each paired ratio's geometric mean with its 95% interval (a t-interval over the log
ratios of the rounds, `titans.stats.time_ratio`) and its verdict, and writes one record:
benchmarks/results/<benchmark>/<device>.json (compact JSON; git keeps the history).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import psutil

from titans import stats  # numpy and scipy only: a PyTorch side's process does not import JAX for it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
SCHEMA = 1
MAX_STEAL_S = 5.0
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "ray")
RECORD_FIELDS = (
    "schema",
    "benchmark",
    "device",
    "versions",
    "commit",
    "date",
    "command",
    "arguments",
    "facts",
    "rounds",
    "summary",
    "verdict",
)


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a benchmark: `--name` on its command line, `args.name` in its function."""

    name: str
    default: object
    help: str
    type: Callable = str
    choices: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A paired ratio: per round, scale * sum(times of `num`) / sum(times of `den`); with `field`, the times
    are that entry (dotted: "teacher.train_s") of each side's details instead of its measured seconds.

    `target` (optional) is what the ratio must reach: at least it when `better` is "higher", at most it when
    "lower"; without a target the verdict says on which side of 1 the whole interval lies."""

    label: str
    num: tuple[str, ...]
    den: tuple[str, ...]
    scale: float = 1.0
    target: float | None = None
    better: str = "higher"
    field: str = ""


@dataclasses.dataclass
class Plan:
    """What a benchmark's function returns: the timed sides, the ratios, and facts for the record (sizes,
    FLOPs, numerics checks). `device`: a description of the accelerator the sides ran on (None: this CPU).
    `shuffle`: time the sides in a new (seeded) random order every round instead of the order given.
    `variant`: a configuration measured apart from the default one (e.g. another model pair); its record is
    <device>-<variant>.json, next to the default's."""

    sides: dict[str, Callable[[], float | dict]]
    comparisons: list[Comparison]
    facts: dict = dataclasses.field(default_factory=dict)
    device: str | None = None
    shuffle: bool = False
    variant: str = ""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    func: Callable
    args: tuple[Arg, ...]
    doc: str


REGISTRY: dict[str, Benchmark] = {}
UNITS = ("step_speed", "transformer_step", "quickstart_recipe", "cascade_speed", "pool_speed", "selection_speed")


def register(name: str, *args: Arg):
    """Registers `func(args) -> Plan` as benchmark `name` with `args`; its docstring is its description."""

    def wrap(func):
        if name in REGISTRY and REGISTRY[name].func.__qualname__ != func.__qualname__:
            raise ValueError(f"benchmark {name!r} is registered twice")
        REGISTRY[name] = Benchmark(name, func, tuple(args), inspect.cleandoc(func.__doc__ or ""))
        return func

    return wrap


def load_all() -> dict[str, Benchmark]:
    """Imports every unit module (registering its benchmarks) and returns the registry in UNITS' order."""
    for unit in UNITS:
        importlib.import_module(f"benchmarks.{unit}")
    order = {unit: i for i, unit in enumerate(UNITS)}
    ranked = sorted(REGISTRY.values(), key=lambda b: order.get(b.func.__module__.rsplit(".", 1)[-1], len(order)))
    return {b.name: b for b in ranked}


# ---------------------------------------------------------------------------------------------- screen


def other_cpu_load(interval_s: float = 1.0) -> float:
    """Cores kept busy by processes other than this one (and its children), measured over an interval."""
    me = psutil.Process()
    skip = {me.pid, *(c.pid for c in me.children(recursive=True))}
    procs = [p for p in psutil.process_iter() if p.pid not in skip]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(interval_s)
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.cpu_percent(None)
    return round(total / 100.0, 2)


def steal_s() -> float | None:
    """CPU seconds the hypervisor has given other guests since boot (Linux's `steal`; None elsewhere): time
    this machine's clock ran while another virtual machine had its cores, which `other_cpu_load` cannot see."""
    return getattr(psutil.cpu_times(), "steal", None)


def schedulable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_contaminated(loads, cores: int) -> bool:
    """True when other processes kept more than a quarter of the cores this benchmark uses busy."""
    return max(loads) > 0.25 * max(1, cores)


# ---------------------------------------------------------------------------------------------- timing


def interleave(
    sides: dict[str, Callable], repeats: int, max_steal: float = MAX_STEAL_S, clock=steal_s, shuffle: bool = False
) -> list[dict]:
    """Times every side once per round, in the order given (A, B, A, B, ...; with `shuffle`, a new random order
    each round from a fixed seed, recorded as the round's "order"), until `repeats` rounds were
    kept. A round in which the hypervisor took more than `max_steal` CPU seconds (negative: never) is kept
    with `kept: False` and one more round runs in its place, at most `repeats` extra rounds in all.

    Each side returns its seconds, or a dict with the seconds under "s" and details of that run. Returns the
    rounds: {"s": {side: seconds}, "details": {side: dict} (sides that gave some), "steal_s", "kept"}."""
    rounds: list[dict] = []
    rng = random.Random(0)
    while sum(r["kept"] for r in rounds) < repeats and len(rounds) < 2 * repeats:
        order = rng.sample(list(sides), len(sides)) if shuffle else list(sides)
        before = clock()
        times, details = {}, {}
        for name in order:
            out = sides[name]()
            if isinstance(out, dict):
                details[name] = {k: v for k, v in out.items() if k != "s"}
                out = out["s"]
            times[name] = float(out)
        after = clock()
        stolen = None if before is None or after is None else round(after - before, 3)
        kept = max_steal < 0 or (stolen or 0.0) <= max_steal
        times = {name: times[name] for name in sides}  # the sides' own order, whatever order they ran in
        extra = {"details": details} if details else {}
        if shuffle:
            extra["order"] = order
        rounds.append({"s": times, **extra, "steal_s": stolen, "kept": kept})
    return rounds


def per_round(rounds: list[dict], sides: tuple[str, ...], field: str = "") -> list[float]:
    """The summed seconds of `sides` in each kept round (with `field`: that entry of each side's details)."""

    def value(r, side):
        if not field:
            return r["s"][side]
        v = r["details"][side]
        for key in field.split("."):
            v = v[key]
        return v

    return [sum(value(r, s) for s in sides) for r in rounds if r["kept"]]


def verdict(ratio: stats.TimeRatio, c: Comparison) -> str:
    """met / not met (the whole interval on one side of the target), else unresolved; without a target:
    "above 1" / "below 1" when the whole interval is there."""
    if ratio.n < 2 or not math.isfinite(ratio.low):
        return "unresolved"
    lo, hi = ratio.low * c.scale, ratio.high * c.scale
    if c.target is None:
        return "above 1" if lo > 1 else "below 1" if hi < 1 else "unresolved"
    if c.better == "higher":
        return "met" if lo >= c.target else "not met" if hi < c.target else "unresolved"
    return "met" if hi <= c.target else "not met" if lo > c.target else "unresolved"


def summarise(rounds: list[dict], comparisons: list[Comparison]) -> list[dict]:
    """One row per comparison: the paired ratio's geometric mean, its 95% interval, n, target, verdict."""
    rows = []
    for c in comparisons:
        r = stats.time_ratio(per_round(rounds, c.num, c.field), per_round(rounds, c.den, c.field))
        rows.append(
            {
                "comparison": c.label,
                "ratio": r.geomean * c.scale,
                "low": r.low * c.scale,
                "high": r.high * c.scale,
                "n": r.n,
                "target": None if c.target is None else f"{'>=' if c.better == 'higher' else '<='} {c.target:g}",
                "verdict": verdict(r, c),
            }
        )
    return rows


def overall_verdict(summary: list[dict], loads, cores: int) -> str:
    if is_contaminated(loads, cores):
        return f"not a result: other processes kept {list(loads)} cores busy (before, after) on {cores} cores"
    counts = {}
    for row in summary:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items()) or "times only (no ratio)"


# ---------------------------------------------------------------------------------------------- record


def versions() -> dict:
    """Python and the installed versions of the packages a benchmark may time (no import)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def git_commit() -> str:
    """HEAD's hash, with "+dirty" when the working tree has changes; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_of(accelerator: str | None, variant: str = "") -> dict:
    """{"slug", "description"}: the record's file name and what it ran on. CPU: "cpu-2core" (schedulable
    cores); an accelerator "NVIDIA H200": "gpu-nvidia-h200"."""
    if accelerator:
        slug = "gpu-" + re.sub(r"[^a-z0-9]+", "-", accelerator.lower()).strip("-")
        return {
            "slug": slug + (f"-{variant}" if variant else ""),
            "description": accelerator + (f" ({variant})" if variant else ""),
        }
    cores = schedulable_cores()
    out = {"slug": f"cpu-{cores}core", "description": f"CPU: {cpu_name()}, {cores} schedulable cores"}
    if variant:
        out = {"slug": f"{out['slug']}-{variant}", "description": f"{out['description']} ({variant})"}
    return out


def record_path(results_dir: str, benchmark: str, slug: str) -> str:
    return os.path.join(results_dir, benchmark, f"{slug}.json")


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to the local file `path` through a temporary file and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_record(record: dict, results_dir: str) -> str:
    check_record(record, "the new record")
    path = record_path(results_dir, record["benchmark"], record["device"]["slug"])
    write_atomic(path, json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n")
    return path


def check_record(record: dict, where: str) -> dict:
    """The record if it has every field of the schema; a ValueError naming `where` and the field if not."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{where}: field 'schema' is {record.get('schema')!r}, expected {SCHEMA}")
    for field in RECORD_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: record has no field {field!r}")
    return record


def read_record(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    return check_record(record, path)


def records(results_dir: str, benchmark: str) -> list[dict]:
    """Every current record of `benchmark` (one per device), in file-name order."""
    folder = os.path.join(results_dir, benchmark)
    if not os.path.isdir(folder):
        return []
    return [read_record(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def side_medians(rounds: list[dict]) -> dict:
    """Per side: the median, min and max seconds over the kept rounds."""
    kept = [r for r in rounds if r["kept"]]
    sides = kept[0]["s"] if kept else {}
    return {s: [statistics.median(v := [r["s"][s] for r in kept]), min(v), max(v)] for s in sides}


def build_record(name: str, args, argv: list[str], plan: Plan, rounds: list[dict], loads: list, settings: dict) -> dict:
    """The record of one run of benchmark `name`: its schema is RECORD_FIELDS (plus "screen")."""
    summary = summarise(rounds, plan.comparisons)
    arguments = {a.name: getattr(args, a.name) for a in REGISTRY[name].args}
    return {
        "schema": SCHEMA,
        "benchmark": name,
        "device": device_of(plan.device, plan.variant),
        "versions": versions(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks run " + shlex.join([name, *argv]),
        "arguments": {**arguments, "repeats": args.repeats, "max_steal": args.max_steal},
        "facts": {**plan.facts, "process_settings": settings},
        "screen": {"other_load_cores": loads, "cores": schedulable_cores()},
        "rounds": rounds,
        "summary": summary,
        "verdict": overall_verdict(summary, loads, schedulable_cores()),
    }


def run(name: str, args, argv: list[str]) -> tuple[dict, str]:
    """Runs registered benchmark `name` with parsed `args` (its own, plus repeats, max_steal, results_dir) and
    writes its record; returns (record, path)."""
    from titans import logs  # imports JAX

    settings = logs.process_setup()  # as every Titans console script starts (allocator, XLA:CPU flags, cache)
    loads = [other_cpu_load()]
    plan = REGISTRY[name].func(args)
    rounds = interleave(plan.sides, args.repeats, args.max_steal, shuffle=plan.shuffle)
    loads.append(other_cpu_load())
    record = build_record(name, args, argv, plan, rounds, loads, settings)
    return record, write_record(record, args.results_dir)


def stolen_since(before: float | None) -> float | None:
    """Seconds of steal since the `steal_s()` reading `before` (None where steal is not counted)."""
    after = steal_s()
    return None if before is None or after is None else after - before


def banner(loads, cores: int) -> str:
    """The loud header a contaminated run prints above its table ('' when the machine was quiet)."""
    if not is_contaminated(loads, cores):
        return ""
    return f"NOT A RESULT: other processes kept {list(loads)} cores busy (before, after) on {cores} cores."
