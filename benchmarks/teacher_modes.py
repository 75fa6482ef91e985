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
to online KD. A service or cache segment starts with an empty pipeline (its fill time is counted).
The teacher and student are the Fashion-MNIST pair of `configs/teacher_modes_fmnist.py` (a
cnn 32-64/128 teacher with 13x the student's FLOPs); the cache is written first into a temporary
directory (or `--cache_dir`).

    TFDS_DATA_DIR=/tmp/tfds_dev python benchmarks/teacher_modes.py --steps 40 --repeats 3
    python benchmarks/teacher_modes.py --workers 1,2,4 --out /tmp/teacher_modes.json
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_workdir", default="/work/runs/titans_fmnist/seed0/teacher")
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

    # --- the service pools (one per size, all started before timing)
    sizes = [int(x) for x in args.workers.split(",") if x]
    kinds = tuple(args.kinds.split("+"))
    service.connect(args.ray_address, num_cpus=sum(sizes) + 1)
    variables = {
        "params": jax.device_get(nnx.to_pure_dict(teacher.params)),
        "rest": jax.device_get(ckpt_lib.to_savable(nnx.to_pure_dict(teacher.model_state))),
    }
    pools = {}
    t0 = time.perf_counter()
    for n in sizes:
        pools[n] = service.TeacherPool(
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
    for n in sizes:
        pools[n].wait_for_workers(n, timeout=600)
    pool_seconds = time.perf_counter() - t0

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

    def segment(name, steps):
        m = modes[name]
        if name == "cache":
            labeler = teachers.CacheLabeler(cache, info.num_classes)
            source = teachers.SoftLabelSource(labeler, in_flight=2, closer=labeler.close)
        elif name.startswith("service"):
            source = teachers.SoftLabelSource(service.PoolLabeler(pools[int(name[7:])]), in_flight=args.in_flight)
        else:
            source = None
        loader = source.wrap(m["loader"]) if source is not None else m["loader"]
        state = m["state"]
        fn = ce_step if name == "ceiling" else step_fn
        teacher_arg = rep_teacher if name == "online" else None
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = fn(state, parallel.to_global(next(loader), mesh), teacher_arg)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        if source is not None:
            loader._drop_queue()  # cancel what was labelled ahead: the next segment starts empty
            m["loader"].set_state(loader.get_state())
            if name == "cache":
                source.close()
        m["state"] = state
        return dt

    load_before = os.getloadavg()
    for name in modes:
        segment(name, args.warmup)
    for _ in range(args.repeats):
        for name in modes:
            modes[name]["times"].append(segment(name, args.steps))
    load_after = os.getloadavg()
    stats = {n: dict(pools[n].stats) for n in sizes}

    n_ex = args.steps * args.batch_size
    result = {
        "command": command,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} logical cores",
        "jax_version": jax.__version__,
        "load_average_before_after": [load_before, load_after],
        "flops_per_example": flops,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "split": args.split,
        "cache_write_s": cache_seconds,
        "pool_start_s": pool_seconds,
        "pool_stats": stats,
        "modes": {},
    }
    for name, m in modes.items():
        eps = [n_ex / t for t in m["times"]]
        result["modes"][name] = {"label": m["label"], "examples_per_s": eps, "median": statistics.median(eps)}
    ceiling = result["modes"]["ceiling"]["median"]
    online = result["modes"]["online"]["median"]

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
        f"{tuple(round(x, 1) for x in load_after)}; cache written in {cache_seconds:.1f} s; pools started in "
        f"{pool_seconds:.1f} s\n"
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
    for pool in pools.values():
        pool.close()
    import ray

    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
