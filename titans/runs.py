"""Finished runs and the models in them: the one place that loads and runs trained models.

    run = RunDir(workdir)                  # config.json, checkpoints/, results.json of a run
    run.finished                           # results.json exists
    model = run.load_model()               # FrozenModel of the latest checkpoint (or step=N)
    logits = predict(logits_fn, model, images, batch_size=512)   # batched, padded, on the mesh
    logits, labels = predict_split(logits_fn, model, src, info, batch_size=512)

Cascades, ensembles, active distillation, the teacher cache, the teacher service and analysis all
load models through `RunDir` / `load_teacher` and run them through `predict`; none of them imports
the trainer. The trainer writes a run's files through `RunDir` too, so what it writes and what is read
back here cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import logs, losses, models, parallel, paths
from titans.data import text as text_lib


class TeacherMismatchError(ValueError):
    """The teacher run does not fit the student's data (classes or input shape differ)."""


class NotARunError(FileNotFoundError):
    """A directory that holds no Titans run (no config.json) or no checkpoint yet."""


class UnfinishedTeacherError(RuntimeError):
    """A student asked for a teacher run that has not finished training."""


def compute_dtype(name: str):
    """A config's `dtype` as a jnp dtype; "auto" is bfloat16 on GPU/TPU and float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def num_outputs(config, info) -> int:
    """Classes, plus the outputs the run's objective adds (losses.OBJECTIVES: one "defer" output for learning to defer)."""
    return info.num_classes + losses.objective(config).extra_outputs


def build_run_model(config, info, *, seed: int, dtype) -> nnx.Module:
    """The model a run config trains (its outputs include a defer output where the objective has one; a
    masked-LM pre-training run's is a `models.MaskedLM`)."""
    if config.get("mlm") and config.mlm.enabled:
        return models.build_masked_lm(config.model, info, seed=seed, rate=config.mlm.mask_rate, dtype=dtype)
    return models.build_model(config.model, info, seed=seed, dtype=dtype, outputs=num_outputs(config, info))


@flax.struct.dataclass
class FrozenModel:
    """A trained model, frozen: its graph (static) and its variables (arrays, passed into jitted calls).

    `apply` takes normalised inputs (what the train step has at hand) and stops gradients, so a
    teacher can enter a student's step without being trained; `logits` takes raw uint8 images.
    """

    graphdef: Any = flax.struct.field(pytree_node=False)
    params: Any
    model_state: Any
    mean: tuple = flax.struct.field(pytree_node=False, default=())
    std: tuple = flax.struct.field(pytree_node=False, default=())

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, jax.tree.map(lambda x: x, self.model_state))

    def apply(self, images):
        return jax.lax.stop_gradient(self.module()(images, train=False))

    def normalize(self, images):
        """Raw (uint8-valued) images normalised with the run's dataset statistics, float32."""
        if not self.mean:  # a text run's int32 token ids (no statistics) pass through unchanged
            return jnp.asarray(images)
        mean = np.asarray(self.mean, np.float32)
        inv_std = 1.0 / np.asarray(self.std, np.float32)
        return (jnp.asarray(images).astype(jnp.float32) - mean) * inv_std

    def logits(self, images):
        """float32 logits of raw (uint8-valued) images."""
        return self.apply(self.normalize(images)).astype(jnp.float32)

    def flops_per_example(self, input_shape) -> float:
        return models.flops_per_example(self.module(), tuple(input_shape))


def restore_variables(module: nnx.Module, ckpt: ckpt_lib.Checkpointer, step: int) -> FrozenModel:
    """Reads the `model` item of `step` into a module built with the right structure; frozen."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    variables = ckpt.restore_model(step, {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)})
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(rest, variables["rest"])
    return FrozenModel(graphdef, params, rest)


class RunDir:
    """The directory of one training run: config.json, checkpoints/, metrics.jsonl, results.json."""

    def __init__(self, path):
        self.path = paths.text(path)  # a local path made absolute, or a URL (gs://...) kept as it is
        self.dir = paths.resolve(path)

    def file(self, name: str) -> str:
        return paths.join(self.path, name)

    @property
    def exists(self) -> bool:
        return paths.exists(self.file("config.json"))

    @property
    def finished(self) -> bool:
        return paths.exists(self.file("results.json"))

    @functools.cached_property
    def config(self) -> ml_collections.ConfigDict:
        if not self.exists:
            raise NotARunError(f"{self.path!r} is not a Titans run (no config.json); train a model there first.")
        return ml_collections.ConfigDict(json.loads(paths.read_text(self.file("config.json"))))

    @property
    def info(self) -> data_lib.DatasetInfo:
        return data_lib.dataset_info(self.config.dataset.name)

    def results(self) -> dict | None:
        """results.json of a finished run, or None."""
        return read_json(self.file("results.json"))

    def write_config(self, config) -> None:
        write_text(self.file("config.json"), config_lib.to_json(config))

    def write_results(self, result: dict) -> None:
        write_json(self.file("results.json"), result)

    def checkpoint_steps(self) -> list[int]:
        if not (self.dir / "checkpoints").is_dir():
            return []
        return ckpt_lib.Checkpointer(self.path, read_only=True).all_steps()

    def resolve_step(self, step: int = -1) -> int:
        """`step`, or the latest saved step for -1; refuses a step that is not saved."""
        steps = self.checkpoint_steps()
        if not steps:
            raise NotARunError(f"The run {self.path} has no checkpoint yet.")
        use = steps[-1] if step < 0 else step
        if use not in steps:
            raise ValueError(f"Step {step} is not saved in {self.path}; saved: {steps}.")
        return use

    def load_model(self, *, step: int = -1, dtype=jnp.float32, module: nnx.Module | None = None) -> FrozenModel:
        """The run's model at `step` (latest for -1), frozen. Only the checkpoint's `model` item is read.

        `module` overrides the architecture built from config.json (a method's own model, e.g. an
        ensemble member with a connection); its structure must match the checkpoint's.
        """
        cfg, info = self.config, self.info
        use = self.resolve_step(step)
        ckpt = ckpt_lib.Checkpointer(self.path, read_only=True)
        if module is None:
            ckpt.check_meta(use, ckpt_lib.meta_for(cfg, info, num_outputs(cfg, info)))
            # Shapes only: initial values would be overwritten, and their program costs a compilation.
            module = nnx.eval_shape(lambda: build_run_model(cfg, info, seed=0, dtype=dtype))
        model = restore_variables(module, ckpt, use)
        return model.replace(mean=tuple(info.mean), std=tuple(info.std))


def load_model(workdir: str, *, dtype=jnp.float32, step: int = -1):
    """(FrozenModel, config, dataset info, step used) of the run in `workdir`."""
    run = RunDir(workdir)
    use = run.resolve_step(step) if run.exists else step
    return run.load_model(step=use, dtype=dtype), run.config, run.info, use


def load_teacher(teacher_workdir: str, info, *, dtype=jnp.float32, step: int = -1):
    """(FrozenModel, config) of a teacher run for a student on dataset `info`; refuses other data."""
    run = RunDir(teacher_workdir)
    if not run.exists:
        raise NotARunError(
            f"distill.teacher_workdir={teacher_workdir!r} is not a Titans run "
            f"(no config.json); train the teacher there first."
        )
    t_info = run.info
    if t_info.num_classes != info.num_classes or tuple(t_info.image_shape) != tuple(info.image_shape):
        raise TeacherMismatchError(
            f"The teacher in {teacher_workdir} was trained on '{run.config.dataset.name}' "
            f"({t_info.num_classes} classes, input {tuple(t_info.image_shape)}), but this run's data "
            f"'{info.name}' has {info.num_classes} classes and input {tuple(info.image_shape)}."
        )
    return run.load_model(step=step, dtype=dtype), run.config


# ------------------------------------------------------------------------------------- predict


def logits_fn(model: FrozenModel, images):
    """The usual `predict` function: float32 logits of raw images."""
    return model.logits(images)


@functools.cache
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def pad_batch(chunk: np.ndarray, size: int) -> np.ndarray:
    """A short final batch padded to `size` rows with copies of its first row (dropped afterwards)."""
    if len(chunk) == size:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])


def _single_process(what: str) -> None:
    if jax.process_count() > 1:
        raise RuntimeError(f"{what} runs in a single process (it gathers the whole split on this host).")


def predict(fn: Callable, model, images: np.ndarray, *, batch_size: int, mesh=None, progress: str = ""):
    """fn(model, images batch) over all `images`, batch by batch on the mesh, in order.

    `fn` returns a pytree of arrays with the batch as leading axis; it is jitted once (keep it a
    module-level function so that repeated calls share the compiled program). The last batch is
    padded to `batch_size` rows, so one shape compiles; the padding is dropped. `batch_size` is
    rounded up to a multiple of the mesh's devices. With `progress`, a bar with that label and an
    ETA is drawn on stderr. Single process.

    Token ids (int (N, L), 0 = padding at the end; `split_arrays` of a text split) go through in order of
    length, each batch cut to its bucket (`data.text.bucket_length`: one program per bucket), and the
    outputs are put back in the rows' order: text models give the same outputs whatever padding follows.
    """
    _single_process("predict")
    mesh = mesh or parallel.make_mesh()
    batch_size = round_up(batch_size, mesh.devices.size)
    model = parallel.replicate(model, mesh)
    apply, outs, t0 = _jitted(fn), [], time.perf_counter()
    n, order = len(images), _by_length(images)
    rows_in = images if order is None else np.asarray(images)[order]
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        chunk = np.asarray(rows_in[start : start + batch_size])
        if order is not None:
            chunk = chunk[:, : text_lib.bucket_length(chunk, (*text_lib.BUCKETS, images.shape[1]))]
        x = parallel.to_global({"x": pad_batch(chunk, batch_size)}, mesh)["x"]
        outs.append(jax.tree.map(lambda a, r=rows: np.asarray(jax.device_get(a))[:r], apply(model, x)))
        if progress:
            logs.progress_bar(progress, start + rows, n, t0)
    if progress:
        print(file=sys.stderr)
    out = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
    if order is None:
        return out
    back = np.empty_like(order)
    back[order] = np.arange(n)
    return jax.tree.map(lambda a: a[back], out)


def _by_length(images) -> np.ndarray | None:
    """For token ids (int (N, L)), the rows in order of their number of tokens (stable); else None."""
    images = np.asarray(images)
    if images.ndim != 2 or not np.issubdtype(images.dtype, np.integer):
        return None
    return np.argsort(text_lib.token_lengths(images), kind="stable")


def length_buckets(tokens, max_tokens: int) -> dict[int, int]:
    """{bucket length: rows} of token ids (N, L): each row at the smallest length bucket that holds its tokens
    (`data.text.BUCKETS`, and `max_tokens`), the length it runs at when batches are sorted by length."""
    buckets = np.array([b for b in (*text_lib.BUCKETS, int(max_tokens)) if b <= max_tokens])
    at = buckets[np.searchsorted(buckets, text_lib.token_lengths(tokens))]
    return {int(b): int(np.sum(at == b)) for b in np.unique(at)}


def bucket_flops(module: nnx.Module, buckets: dict[int, int]) -> float:
    """XLA's FLOPs per example of a text `module`, averaged over rows at their buckets ({length: rows})."""
    total = sum(n * models.flops_per_example(module, (int(b),)) for b, n in buckets.items())
    return float(total / sum(buckets.values()))


def predict_split(fn: Callable, model, src, info, *, batch_size: int, mesh=None, progress: str = ""):
    """`predict` over a whole dataset split: (outputs in the split's order, labels (N,))."""
    images, labels = split_arrays(src, info)
    return predict(fn, model, images, batch_size=batch_size, mesh=mesh, progress=progress), labels


def split_arrays(src, info, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as (uint8 images (N, H, W, C), int labels (N,)), in the split's order; for a text split,
    int32 token ids (N, info.image_shape[0]) padded with 0 after each row's tokens."""
    images, labels = [], []
    for batch in data_lib.eval_batches(src, info, global_batch_size=batch_size):
        keep = np.asarray(batch["mask"])
        x = np.asarray(batch["image"])[keep]
        if info.modality == "text":  # each batch is cut to its own bucket
            x = np.pad(x, ((0, 0), (0, info.image_shape[0] - x.shape[1])))
        images.append(x)
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images), np.concatenate(labels)


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-int(n) // int(multiple)) * int(multiple)


# ------------------------------------------------------------------------------------ run files


def read_json(path, default: Any = None):
    """A JSON file (local or remote) parsed, or `default` when it does not exist."""
    text = paths.read_text(path)
    return default if text is None else json.loads(text)


def write_text(path, text: str) -> None:
    """Atomic: a reader sees the previous file or the new one (see `titans.paths.write_text`)."""
    paths.write_text(path, text)


def _strict(obj):
    """NaN and infinities (not JSON) become null, so every file a run writes is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    """Atomic, strict JSON (non-finite numbers written as null)."""
    write_text(path, json.dumps(_strict(obj), indent=2, allow_nan=False))
