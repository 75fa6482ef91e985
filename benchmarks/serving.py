"""Served cascade vs served teacher vs served student: throughput and latency under load, side by side.

    python benchmarks/serving.py --stages=STUDENT_RUN,TEACHER_RUN --val_split='train[90%:]' \
        [--batch 8 --concurrency 4 --requests 120 --open_rate 10,40 | --open_load 0.3,0.6,0.9] \
        [--duration 15 --repeats 2] [--body npy|json] [--rate R] [--out FILE]

1. The operating point: on the validation split, the smallest deferral rate (grid of 0.05) whose
   cascade accuracy reaches the teacher's, or `--rate` when given; the cascade is exported there
   (titans-export).
2. Three Ray Serve applications on one local (loopback) cluster, served the same way (the same
   ingress, the same teacher deployment code): /teacher (every row to the teacher deployment),
   /student (the first stage answers everything), /cascade.
3. Per repeat, for each application in turn (interleaved): a closed loop (`--concurrency` clients
   sending `--requests` requests of `--batch` test images back to back) and an open loop (Poisson
   arrivals at `--open_rate` requests/s for `--duration` s, at most rate*duration requests; latency
   counted from the scheduled send time; `--open_rate` may list several rates; `--open_load` gives them
   instead as fractions of the teacher's capacity, measured by one closed loop on the served teacher
   before the repeats). Both are bounded in
   count and time, loopback only. Requests
   carry the images as a binary .npy body (`--body npy`, the default) or as JSON (`--body json`).
4. Reports each exported stage's own compute time in-process at 1, 2, 4 and `--batch` rows (no hops;
   measured before the service starts), images/s, p50/p95/p99 latency, accuracy of the served answers on the test images, the
   cascade's throughput against the ideal 1 / (t_student + r * t_teacher) (t from the served
   student and teacher throughputs), the cascade's p99 minus the teacher's at each open-loop rate with a
   95% bootstrap interval over the paired requests (the same arrival times and images in both), and the
   other processes' CPU load before and after, and the CPU time the hypervisor gave other machines
   while measuring (steal).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import jax
import jax.numpy as jnp
import numpy as np
from ray import serve

from benchmarks.harness import other_cpu_load, steal_s, stolen_since
from titans import data, export, parallel, runs
from titans import logs as titans_logs
from titans.cascade import apply as cascade_apply
from titans.cascade import evaluate, gates
from titans.export import standalone
from titans.serve import build_app
from titans.teachers import service

MODES = ("teacher", "student", "cascade")


def operating_rate(stage_dirs, val_split, fixed_rate=None) -> tuple[float, dict]:
    """The smallest rate on a 0.05 grid whose validation accuracy reaches the teacher's, or `fixed_rate`
    when given (for a pair without a meaningful accuracy match); the validation accuracies at that rate."""
    loaded, info = cascade_apply.load_stages(stage_dirs, [0.0])
    src = data.get_source(info.name, val_split, data_dir=loaded[-1][1].dataset.data_dir or None)
    x, y = runs.split_arrays(src, info)
    mesh = parallel.make_mesh()
    s, t = (
        runs.predict(evaluate.stage_logits, evaluate.NormalizedModel.of(m, info), x, mesh=mesh, batch_size=512)
        for m, *_ in loaded
    )
    scores = np.asarray(jax.jit(jax.vmap(gates.get_gate("msp", num_classes=info.num_classes)))(jnp.asarray(s)))
    t_acc = float(np.mean(t.argmax(-1) == y))
    order = np.argsort(-scores)  # most doubtful first

    def cascade_accuracy(rate):
        deferred = np.zeros(len(y), bool)
        deferred[order[: int(rate * len(y))]] = True
        return float(np.mean(np.where(deferred, t.argmax(-1), s.argmax(-1)) == y))

    if fixed_rate is None:
        grid = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # 1.0 defers everything: the teacher's accuracy
        rate = next(r for r in grid if cascade_accuracy(r) >= t_acc)
    else:
        rate = fixed_rate
    return float(rate), {
        "teacher_val_accuracy": t_acc,
        "cascade_val_accuracy": cascade_accuracy(rate),
        "student_val_accuracy": float(np.mean(s.argmax(-1) == y)),
        "rate_chosen_by": "fixed (--rate)" if fixed_rate is not None else "teacher's validation accuracy",
    }


def rates_for_loads(loads, teacher_images_per_s, batch) -> list[float]:
    """Open-loop request rates (requests/s) offering the given fractions of the served teacher's capacity."""
    return [round(float(f) * teacher_images_per_s / batch, 2) for f in loads]


TRANSPORT = {"body": "npy"}  # set from --body: "npy" (binary .npy request) or "json"


def _post(url, images):
    if TRANSPORT["body"] == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, np.uint8), allow_pickle=False)
        body, kind = buf.getvalue(), "application/x-npy"
    else:
        body, kind = json.dumps({"images": images.tolist()}).encode(), "application/json"
    req = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def closed_loop(url, batches, concurrency):
    """(images/s, latencies s, answers in request order)."""
    answers = [None] * len(batches)
    latencies = []
    lock = threading.Lock()

    def one(i):
        t0 = time.perf_counter()
        answers[i] = _post(url, batches[i])
        with lock:
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(batches))))
    wall = time.perf_counter() - t0
    return sum(len(b) for b in batches) / wall, latencies, answers


def open_loop(url, batches, rate, duration, seed=0):
    """Poisson arrivals; latency from each request's scheduled time. (images/s answered, latencies s)."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration) + 1))
    times = times[times < duration]
    latencies = [float("nan")] * len(times)  # by request: the same schedule and images in every mode
    start = time.perf_counter() + 0.05

    def one(i):
        time.sleep(max(0.0, start + times[i] - time.perf_counter()))
        _post(url, batches[i % len(batches)])
        latencies[i] = time.perf_counter() - (start + times[i])

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(len(times))))
    wall = time.perf_counter() - start
    return sum(len(batches[i % len(batches)]) for i in range(len(times))) / wall, latencies


def stage_compute_ms(export_dir, images, sizes=(1, 2, 4, 8), calls=15) -> dict:
    """Each exported stage's own time in this process (no HTTP, no Ray), median ms over `calls` calls per
    row count: what the served latencies hold beyond the hops. Runs before the service starts."""
    cascade = standalone.load(export_dir)
    cascade.warm_up()
    out = {}
    for i in range(cascade.num_stages):
        name = "teacher" if i == cascade.num_stages - 1 else f"stage{i}"
        out[name] = {}
        for n in sizes:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                cascade.stage_outputs(i, images[:n])
                times.append(time.perf_counter() - t0)
            out[name][str(n)] = 1e3 * statistics.median(times)
    return out


def over_ideal(cascade_ips, student_ips, teacher_ips, r) -> float:
    """The cascade's throughput over the ideal 1 / (t_student + r t_teacher), t = 1 / (served images/s)."""
    return cascade_ips * (1.0 / student_ips + r / teacher_ips)


def pct(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q)) if len(values) else float("nan")


def paired_p99_difference(a, b, resamples=4000, seed=0) -> dict:
    """p99(a) - p99(b) in ms over paired requests (the same arrival time and images in both modes), with
    a 95% bootstrap interval over the requests; the verdict is "unresolved" when the interval spans 0."""
    a, b = np.asarray(a) * 1e3, np.asarray(b) * 1e3
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = np.percentile(a[idx], 99, axis=1) - np.percentile(b[idx], 99, axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    verdict = "lower" if hi < 0 else "higher" if lo > 0 else "unresolved"
    return {
        "diff_ms": float(np.percentile(a, 99) - np.percentile(b, 99)),
        "ci95_ms": [float(lo), float(hi)],
        "verdict": verdict,
    }


def parse_args(argv=None):
    """The command line, checked: (args, the open-loop rates or loads as numbers). A bad value exits 2
    with a message naming the flag."""
    p = argparse.ArgumentParser()
    p.add_argument("--stages", required=True)
    p.add_argument("--val_split", default="train[90%:]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--body", choices=("npy", "json"), default="npy", help="request encoding: binary .npy or JSON")
    p.add_argument(
        "--open_rate", default="", help="requests/s of the open loop; comma-separated for several (default 10)"
    )
    p.add_argument(
        "--open_load",
        default="",
        help="instead of --open_rate: offered loads as fractions of the served teacher's closed-loop capacity "
        "(comma-separated, e.g. 0.3,0.6,0.9), converted to requests/s by a closed loop on the teacher before the repeats",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="defer this fraction instead of the rate matching the teacher's validation accuracy "
        "(for a pair with no meaningful match, e.g. random weights)",
    )
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--teacher_max_replicas",
        type=int,
        default=2,
        help="the teacher deployment's autoscaling ceiling (titans-serve's default: 2)",
    )
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.rate is not None and not 0.0 <= a.rate <= 1.0:
        p.error(f"--rate must be in [0, 1], got {a.rate}")
    if a.open_rate and a.open_load:
        p.error("give --open_rate (requests/s) or --open_load (fractions of the teacher's capacity), not both")
    try:
        offered = [float(v) for v in (a.open_load or a.open_rate or "10").split(",")]
    except ValueError:
        p.error(f"--open_rate / --open_load take comma-separated numbers, got {a.open_load or a.open_rate!r}")
    if not all(v > 0 for v in offered):
        p.error(f"open-loop rates and loads must be positive, got {offered}")
    return a, offered


def main():
    a, offered = parse_args()
    # As titans-serve runs (before the backend starts); the Ray workers inherit its XLA_FLAGS.
    process = titans_logs.process_setup()
    TRANSPORT["body"] = a.body
    stage_dirs = a.stages.split(",")
    rate, val = operating_rate(stage_dirs, a.val_split, a.rate)
    export_dir = tempfile.mkdtemp(prefix="titans-serving-bench-")
    manifest = export.export_cascade(stage_dirs, "msp", [rate], a.val_split, export_dir)
    info = data.dataset_info(manifest["dataset"])
    x, y = runs.split_arrays(data.get_source(info.name, "test"), info)
    n = a.requests * a.batch
    batches = [x[i : i + a.batch] for i in range(0, n, a.batch)]
    labels = y[:n]
    compute = stage_compute_ms(export_dir, x, sizes=sorted({1, 2, 4, a.batch}))
    val["stage_compute_ms"] = compute
    print("in-process stage compute, median ms by rows:", json.dumps(compute))
    load_before = other_cpu_load()
    steal_before = steal_s()
    # Logical CPUs for Ray's scheduler: three applications of two deployments at 0.5 CPU each.
    service.connect("", num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    for mode in MODES:
        serve.run(
            build_app(export_dir, mode=mode, name=mode, teacher_max_replicas=a.teacher_max_replicas),
            name=mode,
            route_prefix=f"/{mode}",
        )
    url = {m: f"http://127.0.0.1:{a.port}/{m}" for m in MODES}
    for m in MODES:  # warm up: compile, start replicas
        _post(url[m], batches[0])
    if a.open_load:
        probe_ips, _, _ = closed_loop(url["teacher"], batches, a.concurrency)
        rates = rates_for_loads(offered, probe_ips, a.batch)
        print(f"teacher capacity probe: {probe_ips:.0f} images/s; offered loads {offered} -> {rates} requests/s")
        val["teacher_probe_images_per_s"] = probe_ips
        val["open_loads"] = dict(zip(map(str, rates), offered, strict=True))
    else:
        rates = offered
    res = {
        m: {"closed_ips": [], "closed_lat": [], "open": {r: ([], []) for r in rates}, "answers": None} for m in MODES
    }
    for rep in range(a.repeats):
        for m in MODES:
            ips, lat, answers = closed_loop(url[m], batches, a.concurrency)
            res[m]["closed_ips"].append(ips)
            res[m]["closed_lat"] += lat
            res[m]["answers"] = answers
            for r in rates:
                oips, olat = open_loop(url[m], batches, r, a.duration, seed=rep)
                res[m]["open"][r][0].append(oips)
                res[m]["open"][r][1].extend(olat)
    stolen = stolen_since(steal_before)  # CPU time other virtual machines took while measuring
    val["stolen_s"] = None if stolen is None else round(stolen, 2)
    load_after = other_cpu_load()
    serve.shutdown()
    service.shutdown_local()
    report(a, rate, val, manifest, res, labels, load_before, load_after, process)


def report(a, rate, val, manifest, res, labels, load_before, load_after, process):
    out = {
        "args": vars(a),
        "rate": rate,
        **val,
        "thresholds": manifest["thresholds"],
        "other_load_cores": [load_before, load_after],
        "process_setup": process,
        "modes": {},
        "open_loop": {},
    }
    for m, r in res.items():
        classes = np.concatenate([ans["classes"] for ans in r["answers"]])
        answered = np.concatenate([ans["answered_by"] for ans in r["answers"]])
        out["modes"][m] = {
            "closed_images_per_s": statistics.median(r["closed_ips"]),
            "closed_images_per_s_repeats": r["closed_ips"],
            "closed_p50_ms": pct(r["closed_lat"], 50),
            "closed_p95_ms": pct(r["closed_lat"], 95),
            "closed_p99_ms": pct(r["closed_lat"], 99),
            "test_accuracy": float(np.mean(classes == labels)),
            "teacher_fraction": float(np.mean(answered == 1)),
        }
    for rps in res["teacher"]["open"]:
        row = {}
        for m in MODES:
            ips, lat = res[m]["open"][rps]
            row[m] = {
                "images_per_s": statistics.median(ips),
                **{f"p{q}_ms": pct(lat, q) for q in (50, 95, 99)},
            }
        row["cascade_minus_teacher_p99"] = paired_p99_difference(
            res["cascade"]["open"][rps][1], res["teacher"]["open"][rps][1]
        )
        out["open_loop"][str(rps)] = row
    r_served = out["modes"]["cascade"]["teacher_fraction"]
    out["cascade_over_ideal"] = over_ideal(
        *(out["modes"][m]["closed_images_per_s"] for m in ("cascade", "student", "teacher")), r_served
    )
    out["cascade_over_ideal_repeats"] = [
        over_ideal(c, s, t, r_served)
        for c, s, t in zip(*(res[m]["closed_ips"] for m in ("cascade", "student", "teacher")), strict=True)
    ]
    out["cascade_over_teacher_repeats"] = [
        c / t for c, t in zip(res["cascade"]["closed_ips"], res["teacher"]["closed_ips"], strict=True)
    ]
    print(
        f"operating point ({val['rate_chosen_by']}): defer {rate:.2f} of validation (val acc teacher "
        f"{val['teacher_val_accuracy']:.4f}, student {val['student_val_accuracy']:.4f}, cascade "
        f"{val['cascade_val_accuracy']:.4f}); other processes' CPU load {load_before} / {load_after} cores; "
        f"stolen by the hypervisor while measuring: {val['stolen_s']} s"
    )
    print(
        f"| served | closed loop ({a.concurrency} clients) images/s | p50 / p95 / p99 ms | test accuracy | teacher rows |"
    )
    print("|---|---:|---:|---:|---:|")
    for m, v in out["modes"].items():
        print(
            f"| {m} | {v['closed_images_per_s']:.0f} | {v['closed_p50_ms']:.0f} / {v['closed_p95_ms']:.0f} / "
            f"{v['closed_p99_ms']:.0f} | {v['test_accuracy']:.4f} | {v['teacher_fraction']:.3f} |"
        )
    print(
        f"cascade closed-loop throughput / ideal 1/(t_s + r t_t) = {out['cascade_over_ideal']:.2f} (r = {r_served:.3f}; "
        f"per repeat {', '.join(f'{x:.2f}' for x in out['cascade_over_ideal_repeats'])}); "
        f"cascade / teacher per repeat: {', '.join(f'{x:.2f}' for x in out['cascade_over_teacher_repeats'])}"
    )

    def load_note(rps):
        load = val.get("open_loads", {}).get(rps)
        return "" if load is None else f" ({load:g} of the teacher's capacity)"

    print("| open loop req/s | served | images/s | p50 / p95 / p99 ms |")
    print("|---:|---|---:|---:|")
    for rps, row in out["open_loop"].items():
        for m in MODES:
            v = row[m]
            print(
                f"| {rps} | {m} | {v['images_per_s']:.0f} | {v['p50_ms']:.0f} / {v['p95_ms']:.0f} / {v['p99_ms']:.0f} |"
            )
        d = row["cascade_minus_teacher_p99"]
        print(
            f"open loop {rps} req/s{load_note(rps)}: p99 cascade - teacher = {d['diff_ms']:+.1f} ms, 95% CI "
            f"[{d['ci95_ms'][0]:+.1f}, {d['ci95_ms'][1]:+.1f}] ({d['verdict']})"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
