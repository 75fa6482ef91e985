"""Where soft labels come from, and what it costs: examples/s of student training per teacher mode.

Six ways to run the same student step, measured side by side in one process:

* ceiling      the student's cross-entropy step alone (no teacher at all),
* online KD    the teacher's forward inside the jitted student step (`distill.teacher_mode=online`),
* cached KD    soft labels read from an ArrayRecord teacher cache (`teacher_mode=cache`),
* service KD   soft labels from a Ray pool of 1, 2 and 4 teacher workers (`teacher_mode=service`).

All use the trainer's own pieces: `TrainLoader` over the split held in memory, the `SoftLabelLoader`
of `titans.teachers` for cache and service, `parallel.to_global`, and `train.make_train_step`
jitted with the state donated. Every mode runs `--steps` steps per repeat, the modes interleaved in
each repeat; the table gives medians over repeats and the ratios of the medians to the ceiling and
to online KD. A service or cache segment starts with an empty pipeline (its fill time is counted) and
ends by draining what it labelled ahead (waited for, untimed), so no labelling work runs while the
next mode is timed. Each service pool is started (untimed) just before its segment and shut down right
after it: no idle Ray worker shares the cores with another mode's timing.
The teacher and student are the Fashion-MNIST pair of `configs/teacher_modes_fmnist.py` (a
cnn 32-64/128 teacher with 13x the student's FLOPs); the cache is written first into a temporary
directory (or `--cache_dir`).

    python benchmarks/teacher_modes.py --teacher_workdir workdirs/titans_fmnist/seed0/teacher --steps 40 --repeats 3
    python benchmarks/teacher_modes.py --teacher_workdir RUN --workers 1,2,4 --out /tmp/teacher_modes.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness as machine_load
from titans import logs as titans_logs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher_workdir",
        required=True,
        help="a finished teacher run, e.g. workdirs/titans_fmnist/seed0/teacher of configs/titans_fmnist.py",
    )
    p.add_argument("--student_kwargs", default='{"channels": [8, 16], "dense": 32}')
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--split", default="train[:20%]")
    p.add_argument("--data_dir", default="")
    p.add_argument("--cache_dir", default="", help="an existing cache for (teacher, split); default: write one")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per mode before the repeats")
    p.add_argument("--workers", default="1,2,4", help="service pool sizes to measure")
    p.add_argument("--in_flight", type=int, default=8, help="service batches in flight")
    p.add_argument("--kinds", default="cpu", help="worker kinds (cpu, gpu, or cpu+gpu)")
    p.add_argument("--ray_address", default="", help="an existing Ray cluster; default: a local one")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    process = titans_logs.process_setup()  # as the console scripts run (before the backend starts)
    command = "python benchmarks/teacher_modes.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from titans import checkpoint as ckpt_lib
    from titans import config as config_lib
    from titans import data, models, parallel, teachers, train
    from titans.teachers import cache as cache_lib
    from titans.teachers import service

    info = data.dataset_info(args.dataset)
    src = data.load_in_memory(data.get_source(args.dataset, args.split, data_dir=args.data_dir or None))
    mesh = parallel.make_mesh()
    teacher, t_cfg, _ = cache_lib.load_teacher_with_identity(args.teacher_workdir, -1, info)

    cfg = config_lib.base_config()
    cfg.dataset.name = args.dataset
    cfg.model.name = "cnn"
    cfg.model.kwargs = ml_collections.ConfigDict(json.loads(args.student_kwargs))
    cfg.batch_size = args.batch_size
    cfg.total_steps = 100_000
    cfg.dtype = "float32"
    cfg.distill.teacher_workdir = args.teacher_workdir
    cfg = config_lib.validate(cfg)
    student = models.build_model(cfg.model, info, seed=1, dtype=jnp.float32)
    flops = {
        "teacher": teacher.flops_per_example(info.image_shape),
        "student": models.flops_per_example(student, tuple(info.image_shape)),
    }

    # --- the cache
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="titans-bench-cache-")
    t0 = time.perf_counter()
    cache_lib.write_cache(
        teacher_workdir=args.teacher_workdir,
        dataset=args.dataset,
        split=args.split,
        out=cache_dir,
        data_dir=args.data_dir or None,
        log=lambda s: None,
    )
    cache_seconds = time.perf_counter() - t0
    cache = cache_lib.TeacherCache(cache_dir)

    # --- the service pools: one per size, each started just before its segment and closed after it
    sizes = [int(x) for x in args.workers.split(",") if x]
    kinds = tuple(args.kinds.split("+"))
    service.connect(args.ray_address, num_cpus=max(sizes) + 1)
    variables = {
        "params": jax.device_get(nnx.to_pure_dict(teacher.params)),
        "rest": jax.device_get(ckpt_lib.to_savable(nnx.to_pure_dict(teacher.model_state))),
    }
    pool_seconds = {n: [] for n in sizes}
    pool_stats = {n: [] for n in sizes}

    def start_pool(n):
        t0 = time.perf_counter()
        pool = service.TeacherPool(
            model_config=t_cfg.to_dict(),
            dataset=args.dataset,
            variables=variables,
            batch_shape=(args.batch_size, *info.image_shape),
            dtype="float32",
            min_workers=n,
            max_workers=n,
            kinds=kinds,
            wait=False,
            start_timeout_s=600,
        )
        pool.wait_for_workers(n, timeout=600)
        pool_seconds[n].append(time.perf_counter() - t0)
        return pool

    # --- one runner per mode: its own train state, loader and step
    tx, schedule = train.make_optimizer(cfg, cfg.total_steps, len(src))
    graphdef, params0, rest0 = nnx.split(student, nnx.Param, ...)
    rep_teacher = parallel.replicate(teacher, mesh)
    step_fn = jax.jit(
        train.make_train_step(graphdef, tx, train.resolve(None, cfg), info, jnp.float32, schedule), donate_argnums=(0,)
    )
    ce_cfg = config_lib.base_config()
    ce_cfg.total_steps = 1
    ce_step = jax.jit(
        train.make_train_step(graphdef, tx, train.resolve(None, ce_cfg), info, jnp.float32, schedule),
        donate_argnums=(0,),
    )

    def fresh_state():
        copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)
        p, r = copy(params0), copy(rest0)
        _, st = train.TrainState.create(nnx.merge(graphdef, p, r), tx)
        return parallel.replicate(st, mesh)

    def base_loader(with_index):
        return data.TrainLoader(src, info, global_batch_size=args.batch_size, seed=0, with_index=with_index)

    modes = {
        "ceiling": dict(label="student alone (ceiling)"),
        "online": dict(label="online KD (teacher in the step)"),
        "cache": dict(label="cached KD (ArrayRecord, full logits)"),
    }
    for n in sizes:
        modes[f"service{n}"] = dict(label=f"service KD, {n} teacher worker{'s' if n > 1 else ''}")
    for name, m in modes.items():
        m["state"] = fresh_state()
        m["loader"] = base_loader(with_index=(name == "cache"))
        m["times"] = []

    def run_steps(name, loader, steps):
        state = modes[name]["state"]
        fn = ce_step if name == "ceiling" else step_fn
        teacher_arg = rep_teacher if name == "online" else None
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = fn(state, parallel.to_global(next(loader), mesh), teacher_arg)
        jax.block_until_ready((state, metrics))
        modes[name]["state"] = state
        return time.perf_counter() - t0

    def segment(name, steps, warmup=0):
        """`warmup` untimed steps, then `steps` timed ones; the labelling pipeline of a cache or service
        mode is built before and drained (untimed) after; a service pool lives only inside its segment."""
        m = modes[name]
        pool = None
        if name == "cache":
            labeler = teachers.CacheLabeler(cache, info.num_classes)
            source = teachers.SoftLabelSource(labeler, in_flight=2, closer=labeler.close)
        elif name.startswith("service"):
            pool = start_pool(int(name[7:]))
            source = teachers.SoftLabelSource(service.PoolLabeler(pool), in_flight=args.in_flight)
        else:
            source = None
        loader = source.wrap(m["loader"]) if source is not None else m["loader"]
        try:
            if warmup:
                run_steps(name, loader, warmup)
            return run_steps(name, loader, steps) if steps else 0.0
        finally:
            if source is not None:
                loader.drain()  # nothing labelled ahead keeps running into the next mode's timing
                m["loader"].set_state(loader.get_state())
                if name == "cache":
                    source.close()
            if pool is not None:
                pool_stats[int(name[7:])].append(dict(pool.stats))
                pool.close()

    load_before = os.getloadavg()
    other_before = machine_load.other_cpu_load()
    for name in modes:  # compile every step function once
        if not name.startswith("service"):
            segment(name, 0, warmup=args.warmup)
    for _ in range(args.repeats):
        for name in modes:
            # A service pool's workers are new each repeat: their warm-up steps are untimed.
            modes[name]["times"].append(
                segment(name, args.steps, warmup=args.warmup if name.startswith("service") else 0)
            )
    load_after = os.getloadavg()
    other_after = machine_load.other_cpu_load()
    stats = pool_stats

    n_ex = args.steps * args.batch_size
    result = {
        "command": command,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} logical cores",
        "jax_version": jax.__version__,
        "load_average_before_after": [load_before, load_after],
        "other_load_cores": [other_before, other_after],
        "process_setup": process,
        "contaminated": machine_load.is_contaminated([other_before, other_after], os.cpu_count()),
        "flops_per_example": flops,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "split": args.split,
        "cache_write_s": cache_seconds,
        "pool_start_s": pool_seconds,  # per size, one start per repeat (untimed)
        "pool_stats": stats,
        "modes": {},
    }
    for name, m in modes.items():
        eps = [n_ex / t for t in m["times"]]
        result["modes"][name] = {"label": m["label"], "examples_per_s": eps, "median": statistics.median(eps)}
    ceiling = result["modes"]["ceiling"]["median"]
    online = result["modes"]["online"]["median"]

    warning = machine_load.banner([other_before, other_after], os.cpu_count())
    if warning:
        print("\n" + warning)
    print("\n## Teacher modes: student training throughput\n")
    print(f"- command: `{command}`")
    print(f"- device: {result['device']}; jax {jax.__version__}; float32; global batch {args.batch_size}")
    print(
        f"- teacher {t_cfg.model.name} {json.dumps(t_cfg.model.kwargs.to_dict())}: "
        f"{flops['teacher'] / 1e6:.2f} MFLOPs/example; student cnn {args.student_kwargs}: "
        f"{flops['student'] / 1e6:.2f} MFLOPs/example ({flops['teacher'] / flops['student']:.1f}x)"
    )
    print(
        f"- {args.repeats} repeats x {args.steps} steps per mode, modes interleaved; medians over repeats; "
        f"data: {args.dataset} {args.split} in memory; service: local Ray, CPU workers, {args.in_flight} batches in flight"
    )
    print(
        f"- load average (1/5/15 min) before {tuple(round(x, 1) for x in load_before)}, after "
        f"{tuple(round(x, 1) for x in load_after)}; cache written in {cache_seconds:.1f} s; pool start (untimed, "
        f"median s per size) { ({n: round(statistics.median(v), 1) for n, v in pool_seconds.items()}) }\n"
    )
    print("| mode | examples/s (median) | per repeat | / ceiling | / online KD |")
    print("|---|---:|---|---:|---:|")
    for r in result["modes"].values():
        per = ", ".join(f"{x:,.0f}" for x in r["examples_per_s"])
        print(
            f"| {r['label']} | {r['median']:,.0f} | {per} | {r['median'] / ceiling:.2f} | {r['median'] / online:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}", flush=True)
    import ray

    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
