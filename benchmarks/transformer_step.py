"""Transformer training-step speed: Titans (JAX) against the same Transformer steps in PyTorch."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks import step_speed
from benchmarks.harness import Arg, Comparison, Plan, register

STEP_NAMES = ("teacher", "kd")
STEP_LABELS = {"teacher": "teacher step (CE + AdamW)", "kd": "KD step (teacher fwd + student KD)"}
TARGET = 1.0  # PyTorch time / Titans time, both step kinds, against eager and compiled PyTorch (issue 34)
TORCH_SIDES = {"eager": "PyTorch eager", "compile": "PyTorch compiled"}
STEP1_TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # first-step loss, same weights and batch
STEP2_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}  # after one update
# Dense bfloat16 peak FLOP/s of GPUs a record may come from (vendor data sheets), for MFU; the most specific
# name first. A name matches when each of its words is a word of the device kind, or begins one before a "-".
PEAK_BF16_FLOPS = {"H100 PCIE": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device_kind: str) -> float | None:
    """The bfloat16 peak of a JAX `device_kind` ("NVIDIA H100 80GB HBM3"), None when not in the table."""
    words = device_kind.upper().split()

    def has(w):
        return any(t == w or t.startswith(w + "-") for t in words)

    return next((v for k, v in PEAK_BF16_FLOPS.items() if all(has(w) for w in k.split())), None)


def text_info(args):
    """The synthetic token dataset's DatasetInfo: `max_tokens` long rows from a `vocab`-id vocabulary."""
    from titans.data.info import DatasetInfo

    return DatasetInfo(
        name="synthetic_text",
        num_classes=args.classes,
        image_shape=(args.max_tokens,),
        mean=(),
        std=(),
        splits={"train": 94080},  # WordNet's train split: only the (unused) epoch arithmetic reads it
        augment="none",
        modality="text",
        vocab_size=args.vocab,
    )


def token_batches(args, rng) -> tuple[list, list]:
    """`num_batches` batches of token ids (B, max_tokens) int32: per row a length drawn uniformly from
    min_len..max_tokens, real ids 1..vocab-1 up to it, padding (0) after; labels uniform over the classes."""
    tokens, labels = [], []
    for _ in range(args.num_batches):
        lengths = rng.integers(args.min_len, args.max_tokens + 1, size=args.batch_size)
        t = rng.integers(1, args.vocab, size=(args.batch_size, args.max_tokens)).astype(np.int32)
        t[np.arange(args.max_tokens)[None, :] >= lengths[:, None]] = 0
        tokens.append(t)
        labels.append(rng.integers(0, args.classes, size=args.batch_size).astype(np.int32))
    return tokens, labels


def model_desc(flax_model) -> dict:
    """The hyperparameters of a Flax `TextTransformer`, read from its built layers."""
    enc, embedding = flax_model.encoder, flax_model.embed.embedding[...]
    return dict(
        vocab_size=int(embedding.shape[0]),
        width=int(embedding.shape[1]),
        positions=int(enc.pos[...].shape[0]),
        depth=len(enc.blocks),
        heads=int(enc.blocks[0].attn.heads),
        mlp_dim=int(enc.blocks[0].fc1.kernel[...].shape[1]),
        num_classes=int(flax_model.classifier.kernel[...].shape[1]),
        pool=enc.pool,
        dropout=enc.rate,
    )


def model_flops(desc: dict, batch: int, tokens: int) -> float:
    """Matmul FLOPs of one forward pass over (batch, tokens) (2 per multiply-add): the projections, the
    MLP, the attention scores and mixing (every position, padding included) and the classifier."""
    d, m = desc["width"], desc["mlp_dim"]
    per_block = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
    return float(batch * (desc["depth"] * per_block + 2 * d * desc["num_classes"]))


def step_model_flops(descs: dict, kind: str, batch: int, tokens: int) -> float:
    """Model FLOPs of a step: 3x the trained model's forward (forward + backward), plus the frozen teacher's
    forward in the KD step."""
    trained = descs["teacher" if kind == "teacher" else "student"]
    teacher = model_flops(descs["teacher"], batch, tokens) if kind == "kd" else 0.0
    return 3 * model_flops(trained, batch, tokens) + teacher


def xla_flops(compiled) -> float:
    """FLOPs of a compiled executable, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


# ----------------------------------------------------------------------------------------------
# Titans (JAX) side: step_speed's, with a text dataset and Transformer models.
# ----------------------------------------------------------------------------------------------


class TitansText(step_speed.TitansSide):
    """step_speed's Titans side (the trainer's own optimizer, state, `make_train_step`, jit with the state
    donated, batches placed by `parallel.to_global`) on the synthetic token dataset and two Transformers."""

    def __init__(self, args, total_steps: int):
        import jax
        import jax.numpy as jnp
        import ml_collections
        from flax import nnx

        from titans import config as config_lib
        from titans import models, parallel, runs, train

        self.jax, self.jnp, self.nnx, self.train, self.parallel, self.runs = jax, jnp, nnx, train, parallel, runs
        self.info = text_info(args)
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(args.batch_size, self.mesh)
        self.dtype = jnp.dtype(args.dtype)
        self.total_steps = total_steps
        self.specs = {"teacher": args.teacher_spec, "student": args.student_spec}
        self.configs, self.models, self.params = {}, {}, {}
        for role, seed in (("teacher", args.seed), ("student", args.seed + 1)):
            name, kwargs = self.specs[role]
            cfg = config_lib.base_config()
            cfg.name, cfg.seed, cfg.dataset.name = f"bench_{role}", seed, self.info.name
            cfg.model.name, cfg.model.kwargs = name, ml_collections.ConfigDict(kwargs)
            cfg.batch_size, cfg.total_steps, cfg.dtype = args.batch_size, total_steps, args.dtype
            cfg.optimizer.name, cfg.optimizer.learning_rate = args.optimizer, args.learning_rate
            cfg.optimizer.weight_decay = args.weight_decay
            self.configs[role] = config_lib.validate(cfg)
            self.models[role] = models.build_model(cfg.model, self.info, seed=seed, dtype=self.dtype)
            self.params[role] = models.param_count(self.models[role])
        self.num_examples = self.info.splits["train"]

    def compile_step(self, kind: str, example_batch) -> dict:
        """`make`'s jitted step (state donated) lowered and compiled once, so the executable timed is the one
        XLA's cost analysis describes: {"step", "flops", "compile_s"}."""
        step, state, teacher = self.make(kind)
        t0 = time.perf_counter()
        exe = step.lower(state, example_batch, teacher).compile()
        # XLA's cost analysis counts one device's program: summed over the mesh (one device in a benchmark run)
        flops = xla_flops(exe) * self.mesh.devices.size
        return {"step": exe, "flops": flops, "compile_s": time.perf_counter() - t0}

    def fresh(self, kind: str):
        """(initial TrainState, teacher or None) for a compiled step of `kind` (new buffers: steps donate)."""
        _, state, teacher = self.make(kind)
        return state, teacher

    def logits(self, role: str, tokens):
        return np.asarray(self.jax.device_get(self.models[role](self.jnp.asarray(tokens))), np.float64)


# ----------------------------------------------------------------------------------------------
# PyTorch side: the twin in benchmarks/torch_transformer.py, the same optimizer and learning rates.
# ----------------------------------------------------------------------------------------------


class TorchText:
    """The PyTorch steps; `compiled`: every model wrapped in torch.compile. bfloat16 runs the forward under
    torch.autocast (matmuls in bfloat16, LayerNorm and softmax in float32), parameters float32 as in Titans."""

    def __init__(self, args, titans: TitansText, compiled: bool = False):
        import torch

        from benchmarks import torch_transformer

        self.torch, self.tt, self.compiled = torch, torch_transformer, compiled
        self.device = torch.device("cuda" if args.device == "gpu" else "cpu")
        if args.device == "gpu":  # XLA runs float32 matmuls in TF32 where the GPU has it; so may torch
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_num_threads(args.torch_threads or step_speed.num_threads())
        self.bf16 = args.dtype == "bfloat16"
        self.titans = titans
        distill = titans.configs["student"].distill
        self.alpha, self.temperature = float(distill.alpha), float(distill.temperature)
        self.desc = {role: model_desc(titans.models[role]) for role in ("teacher", "student")}
        self.lrs = {role: titans.lr_values(role) for role in ("teacher", "student")}

    def model(self, role: str, train: bool):
        m = self.tt.build(self.desc[role])
        self.tt.load_flax_weights(m, self.titans.pure(role)[0])
        m = m.to(self.device)
        m.train(train)
        return m

    def optimizer(self, role: str, params):
        o, lr, torch = self.titans.configs[role].optimizer, float(self.lrs[role][0]), self.torch
        if o.name == "adamw":  # optax.adamw: eps 1e-8, decoupled decay on every parameter
            return torch.optim.AdamW(params, lr=lr, betas=(o.b1, o.b2), eps=1e-8, weight_decay=o.weight_decay)
        if o.name == "sgd":  # optax.add_decayed_weights before sgd: L2 as a gradient, as torch's SGD
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        raise ValueError(f"transformer_step: no PyTorch twin of optimizer {o.name!r} (--optimizer adamw|sgd)")

    def make(self, kind: str):
        """A closure step((tokens, labels)) -> loss (a tensor; no host sync) for kind in teacher|kd."""
        torch, F = self.torch, self.torch.nn.functional
        role = "teacher" if kind == "teacher" else "student"
        model = self.model(role, train=True)
        teacher = self.model("teacher", train=False).requires_grad_(False) if kind == "kd" else None
        forward = torch.compile(model) if self.compiled else model
        teacher_fwd = torch.compile(teacher) if self.compiled and teacher is not None else teacher
        opt, lrs = self.optimizer(role, model.parameters()), self.lrs[role]
        alpha, T, device_type, bf16 = self.alpha, self.temperature, self.device.type, self.bf16
        counter = [0]

        def step(batch):
            tokens, labels = batch
            for group in opt.param_groups:
                group["lr"] = float(lrs[counter[0]])
            counter[0] += 1
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(tokens).float()
                if teacher_fwd is not None:
                    with torch.no_grad():
                        t_logits = teacher_fwd(tokens).float()
            if teacher_fwd is None:
                loss = F.cross_entropy(logits, labels)
            else:
                loss = step_speed.torch_kd_loss(logits, t_logits, labels, alpha, T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    def logits(self, role: str, tokens) -> np.ndarray:
        m = self.model(role, train=False)
        with self.torch.no_grad(), self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16):
            out = m(self.torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device))
        return out.float().cpu().numpy().astype(np.float64)

    def batches(self, tokens, labels):
        torch = self.torch
        return [
            (torch.from_numpy(t.astype(np.int64)).to(self.device), torch.from_numpy(y.astype(np.int64)).to(self.device))
            for t, y in zip(tokens, labels)
        ]

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------


def numerics_check(titans: TitansText, compiled: dict, side: TorchText, tokens, jax_batches, torch_batches) -> dict:
    """Both models' eval logits on the first batch, and the losses of the first two steps of each kind (the
    compiled Titans steps on fresh states), from the same initial weights and batches."""
    dtype = str(titans.dtype)
    out = {"dtype": dtype}
    for role in ("teacher", "student"):
        a, b = titans.logits(role, tokens[0]), side.logits(role, tokens[0])
        out[f"{role}_logits_max_abs_diff"] = float(np.max(np.abs(a - b)))
        out[f"{role}_logits_max_abs"] = float(np.max(np.abs(a)))
    for kind in STEP_NAMES:
        state, teacher = titans.fresh(kind)
        t_step = side.make(kind)
        j_losses, t_losses = [], []
        for i in range(2):
            state, metrics = compiled[kind]["step"](state, jax_batches[i % len(jax_batches)], teacher)
            j_losses.append(float(titans.jax.device_get(metrics["loss"])))
            t_losses.append(float(t_step(torch_batches[i % len(torch_batches)]).cpu()))
        del state
        out[kind] = {
            "jax": j_losses,
            "torch": t_losses,
            "step1_abs_diff": abs(j_losses[0] - t_losses[0]),
            "step2_rel_diff": abs(j_losses[1] - t_losses[1]) / max(abs(j_losses[1]), 1e-12),
        }
    out["pass"] = numerics_pass(out)
    return out


def numerics_pass(out: dict) -> bool:
    """Whether every logit and loss difference of `numerics_check` is within its dtype's tolerance."""
    tol1, rtol2 = STEP1_TOL[out["dtype"]], STEP2_RTOL[out["dtype"]]
    logits_ok = all(
        out[f"{r}_logits_max_abs_diff"] <= tol1 * max(1.0, out[f"{r}_logits_max_abs"]) for r in ("teacher", "student")
    )
    losses_ok = all(
        out[k]["step1_abs_diff"] <= tol1 * max(1.0, abs(out[k]["jax"][0])) and out[k]["step2_rel_diff"] <= rtol2
        for k in STEP_NAMES
    )
    return logits_ok and losses_ok


def warm_titans(titans: TitansText, kind: str, compiled: dict, batches, args) -> dict:
    """A fresh state for the compiled step of `kind`, advanced by the warm-up steps (untimed)."""
    state, teacher = titans.fresh(kind)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        state, metrics = compiled["step"](state, batches[i % len(batches)], teacher)
    titans.sync(state)
    return {"step": compiled["step"], "state": state, "teacher": teacher, "i": args.warmup,
            "warmup_s": compiled["compile_s"] + time.perf_counter() - t0}  # fmt: skip


def with_rates(run, flops: float, model_flops: float, steps: int, peak: float | None):
    """A side that also reports its achieved FLOP/s (XLA's count of the step) and, with a peak, the model
    FLOPs utilisation (model FLOPs / s / peak)."""

    def timed():
        s = run()
        out = {"s": s, "xla_gflop_per_s": flops * steps / s / 1e9}
        if peak:
            out["mfu"] = model_flops * steps / s / peak
        return out

    return timed


def torch_sides(args, titans: TitansText, compiled: dict, tokens, labels, jax_batches) -> tuple[dict, dict]:
    """The warmed PyTorch steps ({side: {kind: timer-ready state}}) and facts: numerics, torch.compile's fate."""
    eager = TorchText(args, titans)
    batches = eager.batches(tokens, labels)
    facts = {
        "numerics": None
        if args.skip_numerics
        else numerics_check(titans, compiled, eager, tokens, jax_batches, batches),
        "torch_threads": eager.torch.get_num_threads() if args.device == "cpu" else None,
    }
    warmed = {"eager": {k: step_speed.warm_torch(eager, k, batches, args) for k in STEP_NAMES}}
    sides = {"eager": eager}
    if not args.skip_compile:
        facts["torch_compile"] = try_compile(args, titans, batches, warmed, sides)
    timers = {
        s: {k: step_speed.torch_timer(sides[s], r, batches, args.steps) for k, r in ws.items()}
        for s, ws in warmed.items()
    }
    facts["compile_and_warmup_s"] = {f"{s} {k}": r["warmup_s"] for s, ws in warmed.items() for k, r in ws.items()}
    return timers, facts


def try_compile(args, titans: TitansText, batches, warmed: dict, sides: dict) -> str:
    """Adds the torch.compile side when its compile and warm-up of every step kind succeed within
    `compile_budget_s` each; returns what happened, for the record."""
    side = TorchText(args, titans, compiled=True)
    runs = {}
    for kind in STEP_NAMES:
        try:
            runs[kind] = step_speed.warm_torch(side, kind, batches, args)
        except Exception as e:  # inductor needs a working C++ toolchain (CPU) or Triton (GPU)
            return f"failed on the {kind} step ({type(e).__name__}: {str(e)[:200]}); not timed"
        if runs[kind]["warmup_s"] > args.compile_budget_s:
            return (
                f"took {runs[kind]['warmup_s']:.0f} s to compile and warm up the {kind} step, over the "
                f"{args.compile_budget_s:g} s budget; not timed"
            )
    warmed["compile"], sides["compile"] = runs, side
    return "timed: " + ", ".join(f"{k} compiled and warmed in {r['warmup_s']:.0f} s" for k, r in runs.items())


def resolve_args(args) -> None:
    """args.dtype ('' -> float32 on CPU, bfloat16 on GPU), args.teacher_spec and args.student_spec."""
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.teacher_spec = ("transformer", json.loads(args.teacher_kwargs) if args.teacher_kwargs else {})
    # transformer_small fixes depth, width and heads: a student of other sizes is a `transformer`
    args.student_spec = (
        ("transformer", json.loads(args.student_kwargs)) if args.student_kwargs else ("transformer_small", {})
    )
    if not 1 <= args.min_len <= args.max_tokens:
        raise SystemExit(f"--min_len must be in 1..--max_tokens ({args.max_tokens}), got {args.min_len}")


def require_gpu(jax_platforms: list[str], torch_cuda: bool | None) -> None:
    """Exits with a message naming what is missing unless JAX has a GPU and (unless None: no PyTorch side)
    torch sees CUDA."""
    if "gpu" not in jax_platforms:
        raise SystemExit(
            f"--device gpu: JAX sees no GPU (its platforms: {sorted(set(jax_platforms)) or 'none'}); install "
            "jax[cuda12] on a GPU machine"
        )
    if torch_cuda is False:
        raise SystemExit("--device gpu: torch sees no CUDA device (a CPU build?); install a CUDA torch or --skip_torch")


def start_backend(args):
    """Pins the cores (--cpu_cores) and starts JAX on the device asked for; returns jax."""
    if args.cpu_cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpu_cores])
    import jax

    if args.device == "gpu":
        jax.config.update("jax_platforms", "cuda")
        try:
            platforms = [d.platform for d in jax.devices()]
        except RuntimeError:
            platforms = []
        torch_cuda = None
        if not args.skip_torch:
            import torch

            torch_cuda = torch.cuda.is_available()
        require_gpu(platforms, torch_cuda)
    return jax


def describe_flops(compiled: dict, model: dict, torch_note: str | None) -> str:
    """The record's note: FLOPs per step of each kind, and what became of torch.compile."""
    parts = [
        f"{STEP_LABELS[k]}: {compiled[k]['flops'] / 1e9:.3g} GFLOP per step (XLA's cost analysis), "
        f"{model[k] / 1e9:.3g} GFLOP of model matmuls"
        for k in STEP_NAMES
    ]
    note = "FLOPs: " + "; ".join(parts) + ". Each round's details hold the sides' FLOP/s (XLA's count)."
    return note + (f" torch.compile: {torch_note}." if torch_note else "")


@register(
    "transformer_step",
    Arg("batch_size", 64, "rows per step", int),
    Arg("max_tokens", 64, "the length bucket every batch is padded to", int),
    Arg("min_len", 8, "shortest row; lengths are uniform over min_len..max_tokens", int),
    Arg("vocab", 8192, "token ids 1..vocab-1 (0 = padding)", int),
    Arg("classes", 45, "label classes (WordNet supersenses)", int),
    Arg("teacher_kwargs", "", 'kwargs of the `transformer` teacher as JSON, e.g. \'{"depth": 2, "width": 32}\''),
    Arg("student_kwargs", "", "the student as a `transformer` of these kwargs (JSON) instead of `transformer_small`"),
    Arg("optimizer", "adamw", "the optimizer of both sides", str, ("adamw", "sgd")),
    Arg("learning_rate", 1e-3, "peak learning rate (cosine schedule, both sides)", float),
    Arg("weight_decay", 0.01, "weight decay (decoupled for adamw)", float),
    Arg("steps", 5, "steps per timed measurement", int),
    Arg("warmup", 2, "untimed steps after compilation", int),
    Arg("num_batches", 4, "pre-generated batches, cycled", int),
    Arg("device", "cpu", "where both sides run", str, ("cpu", "gpu")),
    Arg("dtype", "", "compute dtype; '' = float32 on CPU, bfloat16 on GPU", str, ("", "float32", "bfloat16")),
    Arg("torch_threads", 0, "torch.set_num_threads on CPU; 0: the schedulable cores", int),
    Arg("cpu_cores", 0, "pin the process to its first N cores before JAX and torch start; 0: all", int),
    Arg("skip_torch", False, "time the Titans steps only", bool),
    Arg("skip_compile", False, "no torch.compile side", bool),
    Arg("compile_budget_s", 60.0, "seconds torch.compile may take to compile and warm up a step kind", float),
    Arg("skip_numerics", False, "skip the JAX-vs-PyTorch logits and loss check", bool),
    Arg("seed", 0, "weights and batches", int),
)
def transformer_step(args) -> Plan:
    """Transformer training-step speed: Titans (JAX) against the same Transformer steps in PyTorch.

    Two steps on synthetic token batches (64 rows padded to a 64-token bucket, lengths uniform over 8..64,
    vocabulary 8,192, 45 classes): the `transformer` teacher's cross-entropy step (4 blocks, width 256, 4 heads,
    MLP x4), and the KD step, a `transformer_small` student (2 x 64 x 2 heads) trained on Hinton KD (alpha 0.9,
    T 4) against the frozen teacher's logits, the teacher's forward inside the step. Both sides use AdamW with
    the same learning-rate values. The Titans side is the trainer's own `train.make_train_step` (jitted, state
    donated); the PyTorch side is a plain twin of the model (`benchmarks/torch_transformer.py`: pre-LN,
    `scaled_dot_product_attention` with the same key mask, masked mean pooling) loaded with the Flax initial
    parameters, eager and under `torch.compile` (when that compiles within the budget). Before timing, both
    models' logits and the first two losses of each step are compared (the record's `numerics`). A ratio is
    PyTorch time / Titans time (> 1: Titans faster); the target is 1 for both steps. FLOPs per step come from
    XLA's cost analysis of the compiled step; on a GPU (bfloat16) each round also gives the model FLOPs
    utilisation."""
    resolve_args(args)
    jax = start_backend(args)
    total_steps = 2 + args.warmup + args.steps * 2 * args.repeats + 8  # numerics + warm-up + timed (+ spares)
    titans = TitansText(args, total_steps)
    tokens, labels = token_batches(args, np.random.default_rng(args.seed))
    jax_batches = titans.batches(tokens, labels)
    compiled = {k: titans.compile_step(k, jax_batches[0]) for k in STEP_NAMES}
    timers, facts = ({}, {}) if args.skip_torch else torch_sides(args, titans, compiled, tokens, labels, jax_batches)
    descs = {role: model_desc(titans.models[role]) for role in ("teacher", "student")}
    model = {k: step_model_flops(descs, k, args.batch_size, args.max_tokens) for k in STEP_NAMES}
    device = jax.devices()[0].device_kind if args.device == "gpu" else None
    peak = peak_flops(device) if device else None
    sides, warm = {}, {}
    for kind in STEP_NAMES:
        r = warm_titans(titans, kind, compiled[kind], jax_batches, args)
        warm[f"titans {kind}"] = r["warmup_s"]
        rate = lambda run, k=kind: with_rates(run, compiled[k]["flops"], model[k], args.steps, peak)
        sides[f"titans {kind}"] = rate(step_speed.titans_timer(titans, r, jax_batches, args.steps))
        sides.update({f"{s} {kind}": rate(timers[s][kind]) for s in timers})
    facts["compile_and_warmup_s"] = {**warm, **facts.get("compile_and_warmup_s", {})}
    facts.update(
        note=describe_flops(compiled, model, facts.get("torch_compile")),
        show_sides=True,
        xla_flops_per_step={k: compiled[k]["flops"] for k in STEP_NAMES},
        model_flops_per_step=model,
        peak_flops=peak,
        dtype=args.dtype,
        models={r: {"model": titans.specs[r][0], "kwargs": titans.specs[r][1], **descs[r]} for r in descs},
        params=titans.params,
        jax_cpu_threads=(step_speed.xla_cpu_threads() or step_speed.num_threads()) if args.device == "cpu" else None,
    )
    comparisons = [
        Comparison(f"{TORCH_SIDES[s]} / Titans, {STEP_LABELS[k]}", (f"{s} {k}",), (f"titans {k}",), target=TARGET)
        for k in STEP_NAMES
        for s in timers
    ]
    custom = args.teacher_kwargs or args.student_kwargs or args.dtype != ("bfloat16" if device else "float32")
    return Plan(sides, comparisons, facts, device, variant="custom" if custom else "")
