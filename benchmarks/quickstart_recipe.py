"""The quickstart end to end: Titans against the same recipe written plainly in PyTorch, on one machine."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.harness import REPO, Arg, Comparison, Plan, register

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
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            check=True,
            cwd=REPO,
            env=child_env(threads, cache),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - t0
        out = {
            "s": wall,
            "process_settings": titans_settings(proc.stderr),  # its host allocator and the rest
        }
        for stage in ("teacher", "student"):
            with open(os.path.join(workdir, stage, "results.json")) as f:
                r = json.load(f)
            out[stage] = {"train_s": r["train_time_s"], "accuracy": r["accuracy"], "steps": r["steps"]}
        return out


def run_pytorch(epochs: float, threads: int, seed: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.quickstart_recipe",
        "--child",
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd + ["--seed", str(seed)], check=True, cwd=REPO, env=child_env(threads), capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    return {"s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def child_env(threads: int, cache: str = "") -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    if cache:
        env["TITANS_COMPILATION_CACHE"] = cache
    return env


def titans_settings(stderr: str) -> str | None:
    """What a Titans command's first stderr line (titans.logs.run_cli) says it runs with: its host allocator,
    XLA:CPU flags and compilation cache; None if it printed none."""
    prefix = "titans process settings: "
    return next((line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)), None)


def titans_side(args):
    """The Titans run, with its compilation cache's state: with `fresh`, a new cache for this invocation (the
    first run compiles, cold; the later ones load, warm)."""
    cache = {"fresh": tempfile.mkdtemp(prefix="titans-qs-jax-cache-"), "off": "off", "user": ""}[args.compile_cache]
    runs = [0]

    def run():
        out = run_titans(args.epochs, args.threads, args.conv_impl, cache)
        states = {"fresh": "warm" if runs[0] else "cold", "off": "off", "user": "user's setting"}
        out["compile_cache"] = states[args.compile_cache]
        runs[0] += 1
        return out

    return run


def recipe_comparisons() -> list[Comparison]:
    out = [Comparison("PyTorch / Titans, wall time of the whole run", ("pytorch",), ("titans",))]
    for stage in ("teacher", "student"):
        label = f"PyTorch / Titans, {stage} training time"
        out.append(Comparison(label, ("pytorch",), ("titans",), field=f"{stage}.train_s"))
    return out


@register(
    "quickstart_recipe",
    Arg("epochs", 3.0, "epochs of each stage (configs/quickstart.py:EPOCHS)", float),
    Arg("threads", 2, "PyTorch's intra-op threads (XLA uses every core)", int),
    Arg("seed", 0, "the PyTorch side's seed", int),
    Arg("conv_impl", "", "Titans side: both CNNs' conv_impl (titans.models.layers.conv); empty: the quickstart's own"),
    Arg(
        "compile_cache",
        "fresh",
        "Titans' compilation cache: new for this run, off, or the user's",
        str,
        ("fresh", "off", "user"),
    ),
)
def quickstart_recipe(args) -> Plan:
    """The quickstart end to end: Titans against the same recipe written plainly in PyTorch.

    Each round runs both, each in its own process so that neither warms the other: `python -m titans.main
    --config=configs/quickstart.py:EPOCHS` (the CNN teacher, then the student distilled from it, both evaluated
    on the test split, with everything Titans does on the way: checkpoints, logs, FLOPs, the summary), and the
    same recipe in eager PyTorch (`benchmarks/quickstart_recipe.py`: the layer-for-layer twins of step_speed's
    models, SGD with Nesterov momentum 0.9 and L2 5e-4, learning rate 0.05 with 100 linear warm-up steps then
    cosine decay to 0, batch 128, reshuffled every epoch, KD at T=4 with alpha=0.9 against the trained teacher
    in eval mode, the same test evaluation; no checkpoints). Ratios are PyTorch time / Titans time (> 1:
    Titans faster) of the process's wall time (imports and data included) and of each stage's training time;
    each run's accuracies, cache state (`--compile_cache fresh`: the first Titans run compiles, the later ones
    load) and process settings are in the record's rounds."""
    sides = {"titans": titans_side(args), "pytorch": lambda: run_pytorch(args.epochs, args.threads, args.seed)}
    comparisons = recipe_comparisons()
    env = {k: os.environ.get(k, "") for k in ("TITANS_HOST_MALLOC", "TITANS_XLA_CPU", "XLA_FLAGS")}
    return Plan(sides, comparisons, facts={"process_env": env})


if __name__ == "__main__":  # the PyTorch side's own process
    p = argparse.ArgumentParser(description="the quickstart recipe in eager PyTorch (one run; JSON to stdout)")
    p.add_argument("--child", action="store_true", help="run the recipe (the harness's PyTorch side)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs per stage")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights and shuffling")
    a = p.parse_args()
    print(json.dumps(pytorch_recipe(a.epochs, a.threads, a.seed)))
