"""The quickstart end to end: Titans against the same recipe written plainly in PyTorch, on one machine.

    python benchmarks/quickstart_recipe.py [--epochs 3] [--repeats 1] [--threads 2] [--max_steal 5] [--out FILE]
    python benchmarks/quickstart_recipe.py --conv_impl xla    # Titans' CNNs with XLA's convolutions (default: auto)

Each repeat runs, one after the other and each in its own process so that neither warms the other:

* titans   `python -m titans.main --config=configs/quickstart.py:EPOCHS --workdir=TMP`: the CNN teacher
           (cross-entropy), the student distilled from it (Hinton KD), both evaluated on the test split,
           with everything Titans does on the way (checkpoints, logs, FLOPs, the summary);
* pytorch  the same recipe in eager PyTorch in this file (`--child pytorch`): the same models (the
           layer-for-layer twins of `benchmarks/step_speed.py`), SGD with Nesterov momentum 0.9 and L2
           5e-4, learning rate 0.05 with 100 linear warm-up steps then cosine decay to 0, batch 128,
           the training set reshuffled every epoch, KD at T=4 with alpha=0.9 against the trained teacher
           in eval mode, and the same test evaluation; no checkpoints.

Reported per repeat: the process's wall time (start to exit, imports and data included), each stage's
training time and its test accuracy, and the ratios pytorch/titans. The other processes' CPU load is
measured before and after; a run under load is marked "NOT A RESULT". The order alternates between
repeats (titans first in even repeats). A repeat in which the hypervisor took more than `--max_steal` CPU
seconds from either side (a host shared with other guests slows a run without any process here showing it)
is printed and saved but left out of the ratios, and another repeat is run in its place (at most
`--repeats` more). Over the kept repeats (two or more), the ratios' geometric means with 95% intervals
(`titans.stats.time_ratio`).

Titans' persistent compilation cache (`titans.compile_cache`, on by default in its console scripts):
`--compile_cache fresh` (the default) gives the Titans runs of this invocation a new, empty cache
directory, so that the first Titans run compiles everything (cold) and the later ones load it (warm);
each run's state is recorded. `off` compiles in every run; `user` leaves the user's own setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np
from machine_load import (
    add_max_steal_flag,
    banner,
    is_contaminated,
    other_cpu_load,
    steal_s,
    stolen_since,
    titans_settings,
    within_steal,
)

from titans.stats import time_ratio

BATCH, LR, WARMUP, MOMENTUM, WEIGHT_DECAY, T, ALPHA = 128, 0.05, 100, 0.9, 5e-4, 4.0, 0.9
TEACHER = {"channels": (32, 64), "dense": 128}
STUDENT = {"channels": (8, 16), "dense": 32}


def lr_at(step: int, total: int) -> float:
    """Linear warm-up from 0 over WARMUP steps, then cosine from LR to 0 over the rest."""
    if step < WARMUP:
        return LR * step / WARMUP
    return 0.5 * LR * (1 + math.cos(math.pi * min(1.0, (step - WARMUP) / max(1, total - WARMUP))))


def pytorch_recipe(epochs: float, threads: int, seed: int) -> dict:
    """The quickstart in plain PyTorch: returns per-stage train seconds and test accuracy."""
    import torch
    import torch.nn.functional as F
    from step_speed import torch_kd_loss, torch_modules

    from titans import data, runs

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    info = data.dataset_info("fashion_mnist")
    x_train, y_train = runs.split_arrays(data.get_source("fashion_mnist", "train"), info)
    x_test, y_test = runs.split_arrays(data.get_source("fashion_mnist", "test"), info)
    to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    x_train, x_test = to_nchw(x_train), to_nchw(x_test)
    y_train, y_test = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    norm = lambda x: (x.float() - mean) * inv_std
    CNN, _ = torch_modules()
    total = round(epochs * len(x_train) / BATCH)
    per_epoch = len(x_train) // BATCH

    def train(kwargs, teacher=None):
        model = CNN(info.image_shape, info.num_classes, kwargs["channels"], (True, True), kwargs["dense"])
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
        model.train()
        t0 = time.perf_counter()
        step = 0
        while step < total:
            order = torch.randperm(len(x_train))
            for b in range(per_epoch):
                if step >= total:
                    break
                idx = order[b * BATCH : (b + 1) * BATCH]
                x, y = norm(x_train[idx]), y_train[idx]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total)
                logits = model(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = torch_kd_loss(logits, t_logits, y, ALPHA, T)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        if not torch.isfinite(loss):
            raise SystemExit("the PyTorch recipe diverged (non-finite loss)")
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model(norm(x_test[i : i + 1000])).argmax(1) for i in range(0, len(x_test), 1000)])
        return model, {"train_s": seconds, "steps": step, "accuracy": float((preds == y_test).float().mean())}

    teacher, t = train(TEACHER)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _, s = train(STUDENT, teacher)
    return {"teacher": t, "student": s}


CONV_IMPL_CONFIG = """from titans.config import load_config_file


def get_config(arg):
    c = load_config_file({quickstart!r} + ":" + arg)
    for stage in c.stage_order:
        kwargs = c.stages[stage].model.kwargs
        with kwargs.unlocked():
            kwargs.conv_impl = {conv_impl!r}
    return c
"""


def run_titans(epochs: float, threads: int, conv_impl: str = "", cache: str = "") -> dict:
    with tempfile.TemporaryDirectory(prefix="titans-qs-bench-") as workdir:
        config = quickstart = os.path.join(REPO, "configs", "quickstart.py")
        if conv_impl:  # the quickstart with both CNNs' conv_impl set, as a config file wrapping it
            config = os.path.join(workdir, "quickstart_conv_impl.py")
            with open(config, "w") as f:
                f.write(CONV_IMPL_CONFIG.format(quickstart=quickstart, conv_impl=conv_impl))
            workdir = os.path.join(workdir, "run")
        cmd = [sys.executable, "-m", "titans.main", f"--config={config}:{epochs:g}", f"--workdir={workdir}"]
        t0, steal0 = time.perf_counter(), steal_s()
        proc = subprocess.run(
            cmd,
            check=True,
            cwd=REPO,
            env=child_env(threads, cache),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall, stolen = time.perf_counter() - t0, stolen_since(steal0)
        out = {
            "wall_s": wall,
            "steal_s": stolen,
            "process_settings": titans_settings(proc.stderr),  # its host allocator and the rest
        }
        for stage in ("teacher", "student"):
            with open(os.path.join(workdir, stage, "results.json")) as f:
                r = json.load(f)
            out[stage] = {"train_s": r["train_time_s"], "accuracy": r["accuracy"], "steps": r["steps"]}
        return out


def run_pytorch(epochs: float, threads: int, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--epochs", str(epochs), "--threads", str(threads)]
    t0, steal0 = time.perf_counter(), steal_s()
    proc = subprocess.run(
        cmd + ["--seed", str(seed)], check=True, cwd=REPO, env=child_env(threads), capture_output=True, text=True
    )
    wall, stolen = time.perf_counter() - t0, stolen_since(steal0)
    return {"wall_s": wall, "steal_s": stolen, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def child_env(threads: int, cache: str = "") -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    if cache:
        env["TITANS_COMPILATION_CACHE"] = cache
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads (XLA uses every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--conv_impl",
        default="",
        choices=("", "xla", "patches", "auto"),
        help="Titans side: both CNNs' conv_impl (titans.models.layers.conv); empty: the quickstart's own",
    )
    p.add_argument(
        "--compile_cache",
        choices=("fresh", "off", "user"),
        default="fresh",
        help="Titans' compilation cache: a new one for this invocation (first run cold, later warm), off, "
        "or the user's own",
    )
    add_max_steal_flag(p, "repeat", "another repeat is run in its place (at most --repeats more)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(pytorch_recipe(a.epochs, a.threads, a.seed)))
        return
    load_before = other_cpu_load()
    cache_dir = tempfile.mkdtemp(prefix="titans-qs-jax-cache-") if a.compile_cache == "fresh" else ""
    cache = {"fresh": cache_dir, "off": "off", "user": ""}[a.compile_cache]
    runs = []
    titans_runs = 0
    rep = 0
    while sum(got["kept"] for got in runs) < a.repeats and rep < 2 * a.repeats:
        order = ("titans", "pytorch") if rep % 2 == 0 else ("pytorch", "titans")
        got = {}
        for side in order:
            got[side] = (
                run_titans(a.epochs, a.threads, a.conv_impl, cache)
                if side == "titans"
                else run_pytorch(a.epochs, a.threads, a.seed)
            )
            if side == "titans":
                state = {"fresh": "warm" if titans_runs else "cold", "off": "off", "user": "user's setting"}
                got[side]["compile_cache"] = state[a.compile_cache]
                titans_runs += 1
            print(f"repeat {rep} {side}: {json.dumps(got[side])}", flush=True)
        got["kept"] = within_steal(got.values(), a.max_steal)
        runs.append(got)
        rep += 1
    load_after = other_cpu_load()
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    contaminated = is_contaminated((load_before, load_after), os.cpu_count())
    if contaminated:
        print(banner((load_before, load_after), os.cpu_count()))
    print("| repeat | side | wall s | stolen s | teacher train s | teacher acc | student train s | student acc |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rep, got in enumerate(runs):
        for side in ("titans", "pytorch"):
            g = got[side]
            label = f"{side} (cache {g['compile_cache']})" if "compile_cache" in g else side
            rep_label = f"{rep}" if got["kept"] else f"{rep} (stolen: left out)"
            print(
                f"| {rep_label} | {label} | {g['wall_s']:.0f} | {_fmt(g.get('steal_s'))} | {g['teacher']['train_s']:.0f} | "
                f"{g['teacher']['accuracy']:.4f} | {g['student']['train_s']:.0f} | {g['student']['accuracy']:.4f} |"
            )
    times = {"wall_s": lambda g: g["wall_s"]}
    for stage in ("teacher", "student"):
        times[f"{stage}_train_s"] = lambda g, stage=stage: g[stage]["train_s"]
    kept = [got for got in runs if got["kept"]]
    ratios, intervals = {}, {}
    for key, time_of in times.items():
        ratios[key] = [time_of(got["pytorch"]) / time_of(got["titans"]) for got in runs]
        shown = ", ".join(f"{v:.2f}" + ("" if got["kept"] else " (stolen)") for v, got in zip(ratios[key], runs))
        print(f"pytorch time / titans time, {key}: {shown} (>= 1: Titans faster)")
        if len(kept) >= 2:
            r = time_ratio([time_of(got["pytorch"]) for got in kept], [time_of(got["titans"]) for got in kept])
            intervals[key] = r.as_dict("pytorch", "titans")
            print(f"  over the {len(kept)} kept repeats: {r.describe('pytorch', 'titans')}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {
                    "args": vars(a),
                    "runs": runs,
                    "ratios_pytorch_over_titans": ratios,
                    # geometric mean and 95% interval over the kept repeats (at most max_steal s stolen)
                    "kept_ratios_pytorch_over_titans": intervals or None,
                    "other_load_cores": [load_before, load_after],
                    "contaminated": contaminated,
                    "cpu_count": os.cpu_count(),
                    # titans.main applies titans.logs.process_setup() itself; these choose what it does
                    "process_env": {
                        k: os.environ.get(k, "") for k in ("TITANS_HOST_MALLOC", "TITANS_XLA_CPU", "XLA_FLAGS")
                    },
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
