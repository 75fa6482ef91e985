"""Checkpoint inspection without the data: saved steps, size and FLOPs, per-layer norms, differences."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import models, paths, runs
from titans.analyze.errors import AnalysisError


def _layers(params) -> list[tuple[str, np.ndarray]]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
    return [("/".join(str(getattr(k, "key", k)) for k in path), np.asarray(leaf)) for path, leaf in flat]


def inspect_checkpoint(workdir: str, step: int = -1) -> dict:
    """Saved steps, checkpoint meta, parameter count, XLA FLOPs per example, and per-layer parameter norms."""
    if not runs.RunDir(workdir).exists:
        raise AnalysisError(f"{workdir} is not a Titans run (no config.json)")
    desc = ckpt_lib.describe(workdir)
    model, cfg, info, used = runs.load_model(workdir, step=step)
    module = nnx.merge(model.graphdef, model.params, model.model_state)
    layers = [
        {
            "layer": name,
            "shape": list(a.shape),
            "params": int(a.size),
            "l2_norm": float(np.linalg.norm(a)),
            "rms": float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0,
        }
        for name, a in _layers(model.params)
    ]
    return {
        "workdir": paths.text(workdir),
        "steps": desc["steps"],
        "step": used,
        "meta": desc["meta"],
        "model": cfg.model.name,
        "model_kwargs": cfg.model.kwargs.to_dict(),
        "dataset": info.name,
        "param_count": models.param_count(module),
        "flops_per_example": models.flops_per_example(module, tuple(info.image_shape)),
        "layers": layers,
    }


def diff_checkpoints(workdir: str, step_a: int, step_b: int = -1, other_workdir: str | None = None) -> dict:
    """Per-layer ``||a - b||`` and ``||a - b|| / ||a||`` between two checkpoints of the same model.

    Two steps of one run, or (``other_workdir``) the checkpoints of two runs of the same model; runs
    of different models are refused with IncompatibleCheckpointError.
    """
    other = other_workdir or workdir
    meta_a = ckpt_lib.describe(workdir)["meta"]
    meta_b = ckpt_lib.describe(other)["meta"]
    if meta_a is None or meta_b is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint in {workdir if meta_a is None else other}")
    if meta_a["fingerprint"] != meta_b["fingerprint"]:
        diff = {
            k: (meta_a["fields"].get(k), meta_b["fields"].get(k))
            for k in meta_a["fields"]
            if meta_a["fields"].get(k) != meta_b["fields"].get(k)
        }
        raise ckpt_lib.IncompatibleCheckpointError(
            f"cannot compare checkpoints of different models: {diff} ({workdir} vs {other})"
        )
    a, _, _, sa = runs.load_model(workdir, step=step_a)
    b, _, _, sb = runs.load_model(other, step=step_b)
    rows = []
    for (name, x), (_, y) in zip(_layers(a.params), _layers(b.params)):
        d = float(np.linalg.norm(x - y))
        rows.append({"layer": name, "diff_l2": d, "relative": d / max(float(np.linalg.norm(x)), 1e-12)})
    total = float(np.sqrt(sum(r["diff_l2"] ** 2 for r in rows)))
    return {
        "a": {"workdir": paths.text(workdir), "step": sa},
        "b": {"workdir": paths.text(other), "step": sb},
        "total_diff_l2": total,
        "layers": rows,
    }
