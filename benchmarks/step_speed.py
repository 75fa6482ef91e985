"""Training-step speed: Titans (JAX) against the same steps written plainly in PyTorch.

Three steps, on the same architectures, the same global batch and the same initial weights:

* teacher step   cross-entropy training step of the teacher,
* student step   cross-entropy training step of the student alone,
* online-KD step teacher forward (eval mode, no gradient) + the student's Hinton-KD training step.

The Titans side is the real trainer code: `train.make_train_step` / `train.resolve` (the config's objective Method) /
`train.make_optimizer` on models from `train.build_model`, jitted with the state donated, the
batch placed with `parallel.to_global`, exactly as `train.train_and_evaluate` runs it. The PyTorch
side is eager nn.Modules with the same layers (conv3x3-BN-ReLU-maxpool stages, dense, classifier
for `cnn`; post-activation basic blocks for the CIFAR ResNets), SGD with Nesterov momentum and the
same learning-rate values, and the loss alpha*T^2*KL(p_t||p_s) + (1-alpha)*CE. Both normalise the
uint8 images inside the step. Images are random uint8 batches generated beforehand (a few, cycled),
so data loading is not measured.

A tuned PyTorch side runs too (`--torch_tuned`, default `compile`): channels-last tensors and the models
wrapped in `torch.compile` (channels-last only if compilation fails, with a note). The measurements are
interleaved within each repeat (per step kind: JAX, eager torch, tuned torch), and the report gives
medians over repeats; the ratio columns are medians over repeats of the paired ratio (PyTorch time /
Titans time, measured back to back). Compile + warm-up times are printed for Titans and the tuned side.

Before timing, a numerics check copies the JAX initial weights into the torch models and compares
the losses of the first two steps of each kind on the same batch (the second step also checks that
the optimizers agree).

    python benchmarks/step_speed.py --steps 30 --repeats 5
    python benchmarks/step_speed.py --model_pair cifar --steps 5 --repeats 3   # resnet56 -> resnet20
    python benchmarks/step_speed.py --device gpu --batch_size 256 --out /tmp/step_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

# Runnable as a script from anywhere in the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import numpy as np
from machine_load import banner, is_contaminated, other_cpu_load, write_result

from titans import logs as titans_logs
from titans import stats

PAIRS = {
    # name: dataset, (teacher model, kwargs), (student model, kwargs)
    "fmnist": (
        "fashion_mnist",
        ("cnn", {"channels": [32, 64], "dense": 128}),
        ("cnn", {"channels": [8, 16], "dense": 32}),
    ),
    "cifar": ("cifar10", ("resnet56", {}), ("resnet20", {})),
}
STEP_NAMES = ("teacher", "student", "kd")
STEP1_TOL = 1e-4  # first-step loss, same weights and batch: only float rounding differs
STEP2_RTOL = 1e-3  # after one update; deep nets at small batches amplify rounding a little
# The targets of issue 16, PyTorch time / Titans time (>= target: met): the KD step against eager and tuned
# PyTorch, the CE steps at 0.8 (applied against both sides).
TARGETS = {
    ("torch", "teacher"): 0.8,
    ("torch", "student"): 0.8,
    ("torch", "kd"): 1.0,
    ("tuned", "teacher"): 0.8,
    ("tuned", "student"): 0.8,
    ("tuned", "kd"): 0.9,
}
STEP_LABELS = {
    "teacher": "teacher step (CE)",
    "student": "student step (CE)",
    "kd": "online-KD step (teacher fwd + student KD)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model_pair",
        choices=sorted(PAIRS),
        default="fmnist",
        help="default dataset + teacher + student: fmnist (cnn 32-64/128 -> cnn 8-16/32, 28x28x1) "
        "or cifar (resnet56 -> resnet20, 32x32x3)",
    )
    p.add_argument("--dataset", default=None, help="override the pair's dataset (only its shape/classes are used)")
    p.add_argument("--teacher", default=None, help="teacher model name (Titans registry), overrides the pair")
    p.add_argument(
        "--teacher_kwargs", default=None, help='teacher kwargs as JSON, e.g. \'{"channels": [32, 64], "dense": 128}\''
    )
    p.add_argument("--student", default=None, help="student model name, overrides the pair")
    p.add_argument("--student_kwargs", default=None, help="student kwargs as JSON")
    p.add_argument("--batch_size", type=int, default=128, help="global batch size")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat and benchmark")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--num_batches", type=int, default=4, help="pre-generated random batches, cycled")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="torch.set_num_threads on CPU; 0 = os.cpu_count() (the pinned cores with --cpu_cores)",
    )
    p.add_argument(
        "--cpu_cores",
        type=int,
        default=0,
        help="pin this process to its first N cores before JAX and torch start (XLA sizes its "
        "thread pool from them); 0 = all",
    )
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--skip_torch", action="store_true", help="time the Titans steps only")
    p.add_argument(
        "--torch_tuned",
        choices=("none", "channels_last", "compile"),
        default="compile",
        help="also time a tuned PyTorch side: channels-last tensors, and with 'compile' the models wrapped in "
        "torch.compile (falls back to channels-last, with a note, if compilation fails)",
    )
    p.add_argument("--skip_numerics", action="store_true", help="skip the JAX-vs-torch loss check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reread",
        nargs="+",
        default=None,
        metavar="JSON",
        help="time nothing: print each saved result's ratios with their 95%% intervals and verdicts against the "
        "targets (for results saved before the verdicts were recorded)",
    )
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "num_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    dataset, (t_name, t_kw), (s_name, s_kw) = PAIRS[args.model_pair]
    args.dataset = args.dataset or dataset
    if args.teacher and args.teacher_kwargs is None and args.teacher != t_name:
        t_kw = {}
    if args.student and args.student_kwargs is None and args.student != s_name:
        s_kw = {}
    args.teacher_spec = (args.teacher or t_name, json.loads(args.teacher_kwargs) if args.teacher_kwargs else t_kw)
    args.student_spec = (args.student or s_name, json.loads(args.student_kwargs) if args.student_kwargs else s_kw)
    return args


def num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def xla_cpu_threads() -> int | None:
    """Threads of XLA's CPU intra-op pool (Eigen) that exist in this process, counted by name."""
    try:
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    except OSError:
        return None
    return sum(n.startswith("tf_XLAEigen") for n in names) or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# Titans (JAX) side: the trainer's own functions.
# ----------------------------------------------------------------------------------------------


class TitansSide:
    def __init__(self, args, total_steps: int):
        import jax
        import jax.numpy as jnp
        import ml_collections
        from flax import nnx

        from titans import config as config_lib
        from titans import data, models, parallel, runs, train

        self.jax, self.jnp, self.nnx, self.train, self.parallel, self.runs = jax, jnp, nnx, train, parallel, runs
        self.info = data.dataset_info(args.dataset)
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(args.batch_size, self.mesh)
        self.dtype = jnp.float32
        self.total_steps = total_steps
        self.specs = {"teacher": args.teacher_spec, "student": args.student_spec}
        self.configs, self.models, self.flops, self.params = {}, {}, {}, {}
        for role, seed in (("teacher", args.seed), ("student", args.seed + 1)):
            name, kwargs = self.specs[role]
            cfg = config_lib.base_config()
            cfg.name = f"bench_{role}"
            cfg.seed = seed
            cfg.dataset.name = args.dataset
            cfg.model.name = name
            cfg.model.kwargs = ml_collections.ConfigDict(kwargs)
            cfg.batch_size = args.batch_size
            cfg.total_steps = total_steps
            cfg.dtype = "float32"
            cfg = config_lib.validate(cfg)
            self.configs[role] = cfg
            model = models.build_model(cfg.model, self.info, seed=seed, dtype=self.dtype)
            self.models[role] = model
            self.flops[role] = models.flops_per_example(model, tuple(self.info.image_shape))
            self.params[role] = models.param_count(model)
        self.num_examples = self.info.splits.get("train", 50_000)

    # -- pieces --------------------------------------------------------------------------------

    def split(self, role):
        """Fresh (graphdef, params, rest) copies of the initial model (the timing donates buffers)."""
        graphdef, params, rest = self.nnx.split(self.models[role], self.nnx.Param, ...)
        copy = lambda tree: self.jax.tree.map(lambda a: self.jnp.array(a, copy=True), tree)
        return graphdef, copy(params), copy(rest)

    def optimizer(self, role):
        return self.train.make_optimizer(self.configs[role], self.total_steps, self.num_examples)

    def lr_values(self, role) -> np.ndarray:
        """The learning rate of every step, to drive the torch optimizer with the same values."""
        _, schedule = self.optimizer(role)
        return np.asarray(
            self.jax.device_get(self.jax.vmap(schedule)(self.jnp.arange(self.total_steps + 8))), np.float64
        )

    def teacher(self):
        graphdef, params, rest = self.split("teacher")
        return self.parallel.replicate(self.runs.FrozenModel(graphdef, params, rest), self.mesh)

    def make(self, kind: str, compiler_options: dict | None = None):
        """(jitted step, initial TrainState, teacher or None) for kind in teacher|student|kd; `compiler_options`
        are XLA options for this step's executable alone (conv_kernels.py)."""
        jax, train = self.jax, self.train
        role = "teacher" if kind == "teacher" else "student"
        graphdef, params, rest = self.split(role)
        tx, schedule = self.optimizer(role)
        _, state = train.TrainState.create(self.nnx.merge(graphdef, params, rest), tx)
        state = self.parallel.replicate(state, self.mesh)
        step = jax.jit(
            train.make_train_step(
                graphdef, tx, train.resolve(None, self.configs[role]), self.info, self.dtype, schedule
            ),
            donate_argnums=(0,),
            compiler_options=compiler_options,
        )
        return step, state, (self.teacher() if kind == "kd" else None)

    def batches(self, images_nhwc, labels):
        return [
            self.parallel.to_global({"image": x, "label": y.astype(np.int32)}, self.mesh)
            for x, y in zip(images_nhwc, labels)
        ]

    def sync(self, tree):
        self.jax.block_until_ready(tree)

    def pure(self, role):
        """Initial variables as nested dicts of numpy arrays (params and BatchNorm statistics)."""
        _, params, rest = self.nnx.split(self.models[role], self.nnx.Param, ...)
        to_np = lambda t: self.jax.tree.map(np.asarray, self.nnx.to_pure_dict(t))
        return to_np(params), to_np(rest)

    def describe(self, role):
        """The layer structure the torch model has to reproduce (read from the built JAX model)."""
        from titans.models.resnet_cifar import CifarResNet
        from titans.models.simple import CNN

        m = self.models[role]
        if isinstance(m, CNN):
            return dict(
                kind="cnn",
                input_shape=tuple(m.input_shape),
                num_classes=m.num_classes,
                channels=[int(c.kernel[...].shape[-1]) for c in m.convs],
                pools=list(m.pools),
                dense=int(m.dense.kernel[...].shape[-1]),
                batch_norm=bool(m.use_bn),
            )
        if isinstance(m, CifarResNet):
            blocks = []
            for stage in m.stages:
                blocks.append(
                    [
                        dict(
                            in_ch=int(b.conv1.kernel[...].shape[2]),
                            out_ch=int(b.conv1.kernel[...].shape[3]),
                            stride=int(b.stride),
                            projection=b.proj_conv is not None,
                            pad_channels=int(b.pad_channels),
                        )
                        for b in stage
                    ]
                )
            return dict(
                kind="cifar_resnet",
                input_shape=tuple(m.input_shape),
                num_classes=m.num_classes,
                stem=int(m.stem_conv.kernel[...].shape[-1]),
                stages=blocks,
            )
        raise NotImplementedError(
            f"No PyTorch twin written for {type(m).__name__} "
            f"('{self.specs[role][0]}'); use --skip_torch or a cnn / CIFAR ResNet."
        )


# ----------------------------------------------------------------------------------------------
# PyTorch side, written plainly.
# ----------------------------------------------------------------------------------------------


def torch_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CNN(nn.Module):
        """Per stage conv3x3-BN-ReLU-maxpool2x2; flatten; Dense-ReLU; classifier."""

        def __init__(self, input_shape, num_classes, channels, pools, dense, batch_norm=True):
            super().__init__()
            h, w, c = input_shape
            self.convs, self.norms, self.pools = nn.ModuleList(), nn.ModuleList(), list(pools)
            for ch, pool in zip(channels, pools):
                self.convs.append(nn.Conv2d(c, ch, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    self.norms.append(nn.BatchNorm2d(ch, eps=1e-5, momentum=0.1))
                if pool:
                    h, w = h // 2, w // 2
                c = ch
            self.dense = nn.Linear(h * w * c, dense)
            self.dense.flattened_hwc = (h, w, c)  # for loading JAX's (H, W, C)-ordered kernel
            self.classifier = nn.Linear(dense, num_classes)

        def forward(self, x):
            for i, conv in enumerate(self.convs):
                x = conv(x)
                if len(self.norms):
                    x = self.norms[i](x)
                x = F.relu(x)
                if self.pools[i]:
                    x = F.max_pool2d(x, 2)
            x = F.relu(self.dense(torch.flatten(x, 1)))
            return self.classifier(x)

    class BasicBlock(nn.Module):
        """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN, or subsample + zero channels), ReLU."""

        def __init__(self, in_ch, out_ch, stride, projection, pad_channels):
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
            self.stride, self.pad_channels = stride, pad_channels
            self.proj_conv = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if projection else None
            self.proj_bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1) if projection else None

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.proj_conv is not None:
                x = self.proj_bn(self.proj_conv(x))
            else:
                if self.stride != 1:
                    x = x[:, :, :: self.stride, :: self.stride]
                if self.pad_channels:
                    lo = self.pad_channels // 2
                    x = F.pad(x, (0, 0, 0, 0, lo, self.pad_channels - lo))
            return F.relu(x + y)

    class CifarResNet(nn.Module):
        def __init__(self, input_shape, num_classes, stem, stages):
            super().__init__()
            self.stem_conv = nn.Conv2d(input_shape[2], stem, 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(stem, eps=1e-5, momentum=0.1)
            self.stages = nn.ModuleList(nn.ModuleList(BasicBlock(**b) for b in stage) for stage in stages)
            self.classifier = nn.Linear(stages[-1][-1]["out_ch"], num_classes)

        def forward(self, x):
            x = F.relu(self.stem_bn(self.stem_conv(x)))
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            return self.classifier(torch.mean(x, dim=(2, 3)))

    return CNN, CifarResNet


def build_torch_model(desc):
    CNN, CifarResNet = torch_modules()
    if desc["kind"] == "cnn":
        return CNN(
            desc["input_shape"], desc["num_classes"], desc["channels"], desc["pools"], desc["dense"], desc["batch_norm"]
        )
    return CifarResNet(desc["input_shape"], desc["num_classes"], desc["stem"], desc["stages"])


def load_jax_weights(tmodel, params: dict, rest: dict) -> int:
    """Copies JAX variables into the torch model of the same structure; every tensor must be hit.

    Conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in) (the flattened dense layer's
    rows reordered from H,W,C to C,H,W), BatchNorm scale/bias/mean/var -> weight/bias/running_*.
    """
    import torch
    from torch import nn

    written = set()

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, path + (str(key),))
            else:
                assign(path, str(key), np.asarray(value, np.float32))

    def assign(path, name, arr):
        mod = tmodel
        for part in path:
            mod = getattr(mod, part)
        if name == "kernel" and isinstance(mod, nn.Conv2d):
            target, arr = mod.weight, arr.transpose(3, 2, 0, 1)
        elif name == "kernel" and isinstance(mod, nn.Linear):
            hwc = getattr(mod, "flattened_hwc", None)
            if hwc is not None:
                arr = arr.reshape(*hwc, -1).transpose(2, 0, 1, 3).reshape(arr.shape)
            target, arr = mod.weight, arr.T
        else:
            target = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
            target = getattr(mod, target)
        if tuple(target.shape) != arr.shape:
            raise ValueError(f"{'.'.join(path)}.{name}: torch {tuple(target.shape)} vs JAX {arr.shape}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(arr, np.float32, copy=True, order="C")))
        written.add(id(target))

    walk(params, ())
    walk(rest, ())
    missing = [
        n
        for n, t in list(tmodel.named_parameters()) + list(tmodel.named_buffers())
        if id(t) not in written and not n.endswith("num_batches_tracked")
    ]
    if missing:
        raise ValueError(f"torch tensors not loaded from JAX: {missing}")
    return len(written)


def torch_kd_loss(logits, t_logits, labels, alpha: float, temperature: float):
    """Hinton KD in PyTorch, as Titans' `kd` loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    import torch.nn.functional as F

    T = temperature
    kl = F.kl_div(
        F.log_softmax(logits / T, dim=1), F.log_softmax(t_logits / T, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * T * T * kl + (1.0 - alpha) * F.cross_entropy(logits, labels)


class TorchSide:
    """The PyTorch steps. `tuned`: "" (eager, NCHW), "channels_last", or "compile" (channels-last and
    every model wrapped in torch.compile)."""

    def __init__(self, args, titans: TitansSide, distill, tuned: str = ""):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.tuned = tuned
        self.memory_format = torch.channels_last if tuned else torch.contiguous_format
        self.device = torch.device("cuda" if args.device == "gpu" else "cpu")
        if args.device == "gpu":
            if not torch.cuda.is_available():
                raise SystemExit("--device gpu: this torch build sees no CUDA device.")
            # XLA runs float32 convs and matmuls in TF32 on GPUs that have it; let torch do the same.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        else:
            torch.set_num_threads(args.torch_threads or (num_threads() if args.cpu_cores else os.cpu_count()) or 1)
        self.titans = titans
        info = titans.info
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.inv_std = (1.0 / torch.tensor(info.std, dtype=torch.float32, device=self.device)).view(1, -1, 1, 1)
        self.alpha, self.temperature = float(distill.alpha), float(distill.temperature)
        self.desc = {role: titans.describe(role) for role in ("teacher", "student")}
        self.lrs = {role: titans.lr_values(role) for role in ("teacher", "student")}

    def model(self, role, train: bool):
        m = build_torch_model(self.desc[role])
        load_jax_weights(m, *self.titans.pure(role))
        m = m.to(self.device, memory_format=self.memory_format)
        m.train(train)
        return m

    def forward_fn(self, module):
        return self.torch.compile(module) if self.tuned == "compile" else module

    def make(self, kind: str):
        """A closure step(batch) -> loss (a tensor; no host sync) for kind in teacher|student|kd."""
        torch, F = self.torch, self.F
        role = "teacher" if kind == "teacher" else "student"
        cfg = self.titans.configs[role].optimizer
        model = self.model(role, train=True)
        teacher = self.model("teacher", train=False) if kind == "kd" else None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        lrs = self.lrs[role]
        model_fwd = self.forward_fn(model)
        teacher_fwd = self.forward_fn(teacher) if teacher is not None else None
        memory_format = self.memory_format
        opt = torch.optim.SGD(
            model.parameters(),
            lr=float(lrs[0]),
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
        mean, inv_std = self.mean, self.inv_std
        alpha, T = self.alpha, self.temperature
        counter = [0]

        def step(batch):
            images, labels = batch
            for group in opt.param_groups:
                group["lr"] = float(lrs[counter[0]])
            counter[0] += 1
            x = ((images.float() - mean) * inv_std).contiguous(memory_format=memory_format)
            logits = model_fwd(x)
            if teacher is None:
                loss = F.cross_entropy(logits, labels)
            else:
                with torch.no_grad():
                    t_logits = teacher_fwd(x)
                loss = torch_kd_loss(logits, t_logits, labels, alpha, T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    def batches(self, images_nhwc, labels):
        torch = self.torch
        return [
            (
                torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device),
                torch.from_numpy(y.astype(np.int64)).to(self.device),
            )
            for x, y in zip(images_nhwc, labels)
        ]

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------


def numerics_check(titans: TitansSide, torch_side: TorchSide, jax_batches, torch_batches):
    """Losses of the first two steps of each kind, from identical weights, on the same batches."""
    import jax

    torch = torch_side.torch
    results = {}
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):  # full float32 on both sides, also on GPUs
            for kind in STEP_NAMES:
                j_step, state, teacher = titans.make(kind)
                t_step = torch_side.make(kind)
                j_losses, t_losses = [], []
                for i in range(2):
                    state, metrics = j_step(state, jax_batches[i % len(jax_batches)], teacher)
                    j_losses.append(float(jax.device_get(metrics["loss"])))
                    t_losses.append(float(t_step(torch_batches[i % len(torch_batches)]).cpu()))
                results[kind] = {
                    "jax": j_losses,
                    "torch": t_losses,
                    "step1_abs_diff": abs(j_losses[0] - t_losses[0]),
                    "step2_rel_diff": abs(j_losses[1] - t_losses[1]) / max(abs(j_losses[1]), 1e-12),
                }
                del state
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
    results["pass"] = all(
        e["step1_abs_diff"] <= STEP1_TOL * max(1.0, abs(e["jax"][0])) and e["step2_rel_diff"] <= STEP2_RTOL
        for e in results.values()
    )
    return results


def warm_torch(side: TorchSide, kind: str, batches, args) -> dict:
    """Builds one PyTorch step and runs its first (compiling, for torch.compile) and warm-up steps."""
    t0 = time.perf_counter()
    step = side.make(kind)
    for i in range(1 + args.warmup):
        loss = step(batches[i % args.num_batches])
    side.sync()
    return {"step": step, "i": 1 + args.warmup, "loss": loss, "warmup_s": time.perf_counter() - t0}


def reread(paths) -> list[dict]:
    """Each saved result's ratios against the targets, from its per-repeat seconds; printed as a table."""
    rows = []
    print("| result | threads | repeats | step | against | ratio [95% CI] | target | verdict |")
    print("|---|---:|---:|---|---|---:|---:|---|")
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        for kind in STEP_NAMES:
            e = r["steps_results"][kind]
            for side in ("torch", "tuned"):
                if f"{side}_seconds" not in e:
                    continue
                row = {"result": os.path.basename(path), "kind": kind, "side": side}
                row.update(ratio_fields(side, e[f"{side}_seconds"], e["jax_seconds"], TARGETS[(side, kind)]))
                rows.append(row)
                print(
                    f"| {row['result']} | {r.get('jax_cpu_threads')} | {r['repeats']} | {STEP_LABELS[kind]} | "
                    f"{target_cells(row, side)} |"
                )
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.reread:
        return reread(args.reread)
    if args.cpu_cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpu_cores])
    # As every Titans console script does (titans.logs.run_cli); the process's allocator, so the PyTorch
    # sides run under it too. TITANS_HOST_MALLOC=default measures both under glibc's defaults, and
    # TITANS_XLA_CPU=default Titans under XLA's own convolution kernels (YNNPACK's, single-threaded here).
    process_settings = titans_logs.process_setup()
    import jax

    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    command = "python " + shlex.join(
        [
            os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/step_speed.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    load_before = other_cpu_load()
    total_steps = 2 + (1 + args.warmup + args.steps * args.repeats)  # numerics + compile + warm-up + timed
    titans = TitansSide(args, total_steps)
    info = titans.info

    rng = np.random.default_rng(args.seed)
    images = [
        rng.integers(0, 256, size=(args.batch_size, *info.image_shape), dtype=np.uint8) for _ in range(args.num_batches)
    ]
    labels = [
        rng.integers(0, info.num_classes, size=(args.batch_size,)).astype(np.int32) for _ in range(args.num_batches)
    ]
    jax_batches = titans.batches(images, labels)

    torch_side = tuned_side = None
    tuned_note = ""
    if not args.skip_torch:
        import torch

        torch_side = TorchSide(args, titans, titans.configs["student"].distill)
        torch_batches = torch_side.batches(images, labels)
        if args.torch_tuned != "none":
            tuned_side = TorchSide(args, titans, titans.configs["student"].distill, tuned=args.torch_tuned)

    numerics = None
    if torch_side is not None and not args.skip_numerics:
        numerics = numerics_check(titans, torch_side, jax_batches, torch_batches)

    # Build all six steps, compile and warm up.
    jax_runs, torch_runs, tuned_runs = {}, {}, {}
    for kind in STEP_NAMES:
        step, state, teacher = titans.make(kind)
        t0 = time.perf_counter()
        for i in range(1 + args.warmup):
            state, metrics = step(state, jax_batches[i % args.num_batches], teacher)
        titans.sync((state, metrics))
        jax_runs[kind] = {
            "step": step,
            "state": state,
            "teacher": teacher,
            "i": 1 + args.warmup,
            "warmup_s": time.perf_counter() - t0,
        }
        if torch_side is not None:
            torch_runs[kind] = warm_torch(torch_side, kind, torch_batches, args)
        if tuned_side is not None:
            try:
                tuned_runs[kind] = warm_torch(tuned_side, kind, torch_batches, args)
            except Exception as e:  # torch.compile needs a working C++ toolchain
                if tuned_side.tuned != "compile":
                    raise
                tuned_note = f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); tuned = channels-last only"
                tuned_side = TorchSide(args, titans, titans.configs["student"].distill, tuned="channels_last")
                tuned_runs.clear()
                for done in [*STEP_NAMES[: STEP_NAMES.index(kind)], kind]:
                    tuned_runs[done] = warm_torch(tuned_side, done, torch_batches, args)

    def time_jax(kind):
        r = jax_runs[kind]
        step, state, teacher, i = r["step"], r["state"], r["teacher"], r["i"]
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, jax_batches[i % args.num_batches], teacher)
            i += 1
        titans.sync((state, metrics))
        dt = time.perf_counter() - t0
        r.update(state=state, i=i, loss=metrics["loss"])
        return dt

    def time_torch(side, runs, kind):
        r = runs[kind]
        step, i = r["step"], r["i"]
        side.sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(torch_batches[i % args.num_batches])
            i += 1
        side.sync()
        dt = time.perf_counter() - t0
        r.update(i=i, loss=loss)
        return dt

    times = {("jax", k): [] for k in STEP_NAMES}
    times.update({("torch", k): [] for k in STEP_NAMES} if torch_side is not None else {})
    times.update({("tuned", k): [] for k in STEP_NAMES} if tuned_side is not None else {})
    for _ in range(args.repeats):
        for kind in STEP_NAMES:
            times[("jax", kind)].append(time_jax(kind))
            if torch_side is not None:
                times[("torch", kind)].append(time_torch(torch_side, torch_runs, kind))
            if tuned_side is not None:
                times[("tuned", kind)].append(time_torch(tuned_side, tuned_runs, kind))

    # ------------------------------------------------------------------ report
    n = args.steps * args.batch_size
    jax_threads = xla_cpu_threads() or num_threads()
    if args.device == "gpu":
        device = f"{jax.devices()[0].device_kind} (JAX)"
        if torch_side is not None:
            device += f", {torch.cuda.get_device_name(0)} (PyTorch)"
    else:
        device = f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, {num_threads()} schedulable"
    torch_threads = None if torch_side is None else (torch.get_num_threads() if args.device == "cpu" else None)
    result = {
        "command": command,
        "device": device,
        "jax_version": jax.__version__,
        "jaxlib_backend": jax.default_backend(),
        "torch_version": None if torch_side is None else torch.__version__,
        "jax_cpu_threads": jax_threads if args.device == "cpu" else None,
        "torch_cpu_threads": torch_threads,
        "dataset": args.dataset,
        "input_shape": list(info.image_shape),
        "num_classes": info.num_classes,
        "teacher": {
            "model": args.teacher_spec[0],
            "kwargs": args.teacher_spec[1],
            "flops_per_example": titans.flops["teacher"],
            "params": titans.params["teacher"],
        },
        "student": {
            "model": args.student_spec[0],
            "kwargs": args.student_spec[1],
            "flops_per_example": titans.flops["student"],
            "params": titans.params["student"],
        },
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": "float32",
        "numerics": numerics,
        "torch_tuned": None if tuned_side is None else tuned_side.tuned,
        "torch_tuned_note": tuned_note,
        "other_load_cores": {"before": load_before, "after": other_cpu_load()},
        **process_settings,
        "steps_results": {},
    }
    # Other processes busy on this machine make every number here a statement about them, not us.
    threads = max(1, jax_threads or 1)
    result["contaminated"] = is_contaminated(result["other_load_cores"].values(), threads)

    for kind in STEP_NAMES:
        j = times[("jax", kind)]
        entry = {
            "jax_seconds": j,
            "jax_examples_per_s": [n / t for t in j],
            "jax_median_examples_per_s": statistics.median(n / t for t in j),
            "jax_compile_and_warmup_s": jax_runs[kind]["warmup_s"],
            "jax_last_loss": float(jax.device_get(jax_runs[kind]["loss"])),
        }
        if torch_side is not None:
            t = times[("torch", kind)]
            ratios = [tt / jj for tt, jj in zip(t, j)]
            entry.update(
                {
                    "torch_seconds": t,
                    "torch_examples_per_s": [n / x for x in t],
                    "torch_median_examples_per_s": statistics.median(n / x for x in t),
                    "torch_over_jax_time_per_repeat": ratios,
                    "torch_over_jax_time_median": statistics.median(ratios),
                    **ratio_fields("torch", t, j, TARGETS[("torch", kind)]),
                    "torch_last_loss": float(torch_runs[kind]["loss"].cpu()),
                }
            )
        if tuned_side is not None:
            t = times[("tuned", kind)]
            ratios = [tt / jj for tt, jj in zip(t, j)]
            entry.update(
                {
                    "tuned_seconds": t,
                    "tuned_median_examples_per_s": statistics.median(n / x for x in t),
                    "tuned_compile_and_warmup_s": tuned_runs[kind]["warmup_s"],
                    "tuned_over_jax_time_per_repeat": ratios,
                    "tuned_over_jax_time_median": statistics.median(ratios),
                    **ratio_fields("tuned", t, j, TARGETS[("tuned", kind)]),
                }
            )
        result["steps_results"][kind] = entry

    print_report(result, args, threads)
    if args.out:
        write_result(args.out, result, indent=2)
    return result


def target_cells(e: dict, side: str) -> str:
    """The Markdown cells 'against | ratio [95% CI] | target | verdict' of one step's entry for one side."""
    lo, hi = e[f"{side}_over_jax_time_ci95"]
    return (
        f"{'eager' if side == 'torch' else 'tuned'} | {e[f'{side}_over_jax_time_geomean']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"| >= {e[f'{side}_target']:g} | {e[f'{side}_verdict']}"
    )


def ratio_fields(side: str, side_times, jax_times, target: float) -> dict:
    """The paired ratio side time / Titans time over the repeats: geometric mean, 95% interval, verdict."""
    r = stats.time_ratio(side_times, jax_times, target)
    return {
        f"{side}_over_jax_time_geomean": r.geomean,
        f"{side}_over_jax_time_ci95": [r.low, r.high],
        f"{side}_target": target,
        f"{side}_verdict": r.verdict,
    }


def print_report(r, args, threads: int):
    t, s = r["teacher"], r["student"]
    warning = banner(r["other_load_cores"].values(), threads)
    if warning:
        print("\n" + warning)
    print("\n## Training-step speed: Titans (JAX) vs plain PyTorch\n")
    print(
        f"- other processes' CPU load (cores): before {r['other_load_cores']['before']}, "
        f"after {r['other_load_cores']['after']}"
    )
    print(f"- command: `{r['command']}`")
    print(f"- device: {r['device']}")
    versions = f"jax {r['jax_version']} ({r['jaxlib_backend']})"
    if r["torch_version"]:
        versions += f", torch {r['torch_version']} (eager)"
    print(f"- versions: {versions}; python {platform.python_version()}")
    print(f"- host allocator (titans.host_malloc, both sides): {r.get('host_malloc', 'not recorded')}")
    print(f"- XLA:CPU convolutions (titans.xla_cpu, Titans side): {r.get('xla_cpu', 'not recorded')}")
    print(
        f"- data: {r['dataset']} shape {tuple(r['input_shape'])}, {r['num_classes']} classes, random uint8 "
        f"batches normalised inside the step; global batch {r['batch_size']}; float32"
    )
    print(
        f"- teacher: {t['model']} {json.dumps(t['kwargs'])}: {t['flops_per_example'] / 1e6:.3f} MFLOPs/example "
        f"(eval forward, XLA count), {t['params']:,} params"
    )
    print(
        f"- student: {s['model']} {json.dumps(s['kwargs'])}: {s['flops_per_example'] / 1e6:.3f} MFLOPs/example "
        f"(eval forward, XLA count), {s['params']:,} params"
    )
    print(
        f"- timing: {r['repeats']} repeats x {r['steps']} steps each, after compilation + {r['warmup']} warm-up "
        f"steps; the runs interleaved in every repeat; medians over repeats"
    )
    if args.device == "cpu":
        j_thr = f"XLA CPU, {r['jax_cpu_threads']} threads"
        t_thr = f"{r['torch_cpu_threads']} threads" if r["torch_cpu_threads"] else ""
    else:
        j_thr, t_thr = "GPU", "GPU"
    print()
    tuned = r.get("torch_tuned")
    head, rule = f"| step | Titans (JAX, {j_thr}) ex/s |", "|---|---:|"
    if r["torch_version"]:
        head += f" PyTorch eager ({t_thr}) ex/s | eager time / Titans time |"
        rule += "---:|---:|"
    if tuned:
        head += (
            f" PyTorch {tuned.replace('compile', 'channels-last + torch.compile')} ex/s | tuned time / Titans time |"
        )
        rule += "---:|---:|"
    print(head + " Titans compile + warm-up, s |" + (" tuned compile + warm-up, s |" if tuned else ""))
    print(rule + "---:|" + ("---:|" if tuned else ""))
    for kind in STEP_NAMES:
        e = r["steps_results"][kind]
        row = f"| {STEP_LABELS[kind]} | {e['jax_median_examples_per_s']:,.0f} |"
        for side in ("torch", "tuned") if tuned else ("torch",) if r["torch_version"] else ():
            rat = e[f"{side}_over_jax_time_per_repeat"]
            row += (
                f" {e[f'{side}_median_examples_per_s']:,.0f} | {e[f'{side}_over_jax_time_median']:.2f} "
                f"({min(rat):.2f}-{max(rat):.2f}) |"
            )
        row += f" {e['jax_compile_and_warmup_s']:.1f} |"
        if tuned:
            row += f" {e['tuned_compile_and_warmup_s']:.1f} |"
        print(row)
    if r["torch_version"]:
        print("\nRatio columns: median (min-max) over repeats of the back-to-back ratio; > 1 means Titans is faster.")
        print(
            "\nAgainst the targets (PyTorch time / Titans time, geometric mean over repeats with its 95% interval; "
            "met / not met only when the whole interval is on one side of the target):\n"
        )
        print("| step | against | ratio [95% CI] | target | verdict |\n|---|---|---:|---:|---|")
        for kind in STEP_NAMES:
            e = r["steps_results"][kind]
            for side in ("torch", "tuned") if tuned else ("torch",):
                print(f"| {STEP_LABELS[kind]} | {target_cells(e, side)} |")
    if r.get("torch_tuned_note"):
        print(f"\nNote: {r['torch_tuned_note']}")
    if r["numerics"]:
        print(
            "\nNumerics check (same initial weights, same batches, float32 'highest' precision; "
            "losses of steps 1 and 2):"
        )
        ok = r["numerics"]["pass"]
        for kind in STEP_NAMES:
            e = r["numerics"][kind]
            print(
                f"- {STEP_LABELS[kind]}: JAX {', '.join(f'{v:.7f}' for v in e['jax'])} | "
                f"torch {', '.join(f'{v:.7f}' for v in e['torch'])} | step-1 |diff| {e['step1_abs_diff']:.1e}, "
                f"step-2 relative diff {e['step2_rel_diff']:.1e}"
            )
        print(
            f"- {'PASS' if ok else 'FAIL'} (step 1: |diff| <= {STEP1_TOL:g} x max(1, |loss|); step 2, after one "
            f"optimizer update: relative diff <= {STEP2_RTOL:g})"
        )


if __name__ == "__main__":
    main()
