"""Export a cascade at a chosen operating point as artifacts that run without Titans.

    titans-export --stages=W/tiny_standard,W/teacher --gate=msp --rates=0.3 --val_split='train[90%:]' \
        --out=exports/fmnist_cascade

writes one directory:

    manifest.json       format/version, Titans and JAX versions, platforms, input shape and dtype,
                        normalisation, class names, gate, thresholds (chosen on --val_split for the
                        --rates), per-stage XLA FLOPs, expected validation accuracy and deferral,
                        and per stage its source run (workdir, step, SHA-256 of its variables)
    stage{i}.jaxexport  stage i serialised with `jax.export` (StableHLO, symbolic batch dimension):
                        uint8 images -> (logits, gate score) for every stage but the last, which
                        returns logits only; normalisation happens inside
    titans_cascade.py   the loader: jax + numpy only (titans/export/standalone.py)

    import titans_cascade; cascade = titans_cascade.load("exports/fmnist_cascade"); cascade.predict(images)

The thresholds are chosen on validation data exactly as `titans-cascade` chooses them, so the exported
cascade defers the same examples as the in-process one (tests/test_export.py).
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

import titans
from titans import data as data_lib
from titans import parallel, runs
from titans.cascade import apply as cascade_apply
from titans.cascade import evaluate, gates
from titans.export import standalone
from titans.teachers import cache as cache_lib

CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "digits": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def _stage_fn(stage: evaluate.NormalizedModel, gate, num_classes: int, last: bool):
    def fn(images):
        logits = stage.apply(images)
        if last:
            return logits[:, :num_classes]
        return logits[:, :num_classes], jax.vmap(gate)(logits)

    return fn


def _platforms() -> list[str]:
    here = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    return sorted({"cpu", here})


def export_stage(stage, gate, info, last: bool, path: str) -> None:
    shape = jax_export.symbolic_shape("b, " + ", ".join(str(d) for d in info.image_shape))
    spec = jax.ShapeDtypeStruct(shape, jnp.uint8)
    exported = jax_export.export(jax.jit(_stage_fn(stage, gate, info.num_classes, last)), platforms=_platforms())(spec)
    with open(path, "wb") as f:
        f.write(exported.serialize())


def _expected(stages, gate, thresholds, x, y, num_classes: int, *, mesh, batch_size) -> dict:
    """Validation accuracy and per-stage answered fractions of the cascade, in process."""
    n, k = len(y), len(stages)
    preds = np.full(n, -1)
    answered = np.full(n, -1)
    reach = np.arange(n)
    for i, stage in enumerate(stages):
        logits = runs.predict(evaluate.stage_logits, stage, x[reach], mesh=mesh, batch_size=batch_size)
        keep = np.ones(len(reach), bool)
        if i < k - 1:
            keep = np.asarray(jax.jit(jax.vmap(gate))(jnp.asarray(logits))) <= thresholds[i]
        preds[reach[keep]] = logits[keep, :num_classes].argmax(-1)
        answered[reach[keep]] = i
        reach = reach[~keep]
    return {
        "val_accuracy": float(np.mean(preds == y)),
        "val_answered_fraction": [float(np.mean(answered == i)) for i in range(k)],
    }


def export_cascade(stage_dirs, gate_name: str, rates, val_split: str, out: str, batch_size: int = 512) -> dict:
    """Writes the export directory `out` (see the module docstring); returns its manifest."""
    rates = [float(r) for r in rates]
    loaded, info = cascade_apply.load_stages(stage_dirs, rates)
    evaluate.check_threshold_split([cfg for _, cfg, _, _ in loaded], info, val_split)
    stages = [evaluate.NormalizedModel.of(m, info) for m, *_ in loaded]
    gate = gates.get_gate(gate_name, num_classes=info.num_classes)
    mesh = parallel.make_mesh()
    batch_size = runs.round_up(batch_size, mesh.devices.size)
    src = data_lib.get_source(info.name, val_split, data_dir=loaded[-1][1].dataset.data_dir or None)
    val_x, val_y = runs.split_arrays(src, info)
    thresholds = cascade_apply.choose_thresholds(stages, gate, rates, val_x, mesh=mesh, batch_size=batch_size)
    os.makedirs(out, exist_ok=True)
    entries = []
    for i, (stage, (model, cfg, _, step)) in enumerate(zip(stages, loaded)):
        export_stage(stage, gate, info, i == len(stages) - 1, os.path.join(out, f"stage{i}.jaxexport"))
        entries.append(
            {
                "file": f"stage{i}.jaxexport",
                "workdir": os.path.abspath(stage_dirs[i]),
                "step": int(step),
                "model": cfg.model.name,
                "variables_sha256": cache_lib.variables_digest(model),
                "flops_per_example": model.flops_per_example(info.image_shape),
            }
        )
    manifest = {
        "format": standalone.FORMAT,
        "version": standalone.VERSION,
        "titans_version": titans.__version__,
        "jax_version": jax.__version__,
        "platforms": _platforms(),
        "input_shape": list(info.image_shape),
        "input_dtype": "uint8",
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "dataset": info.name,
        "num_classes": info.num_classes,
        "class_names": list(CLASS_NAMES.get(info.name, [str(c) for c in range(info.num_classes)])),
        "gate": gate_name,
        "target_rates": rates,
        "thresholds": [float(t) for t in thresholds],
        "val_split": val_split,
        "stages": entries,
        **_expected(stages, gate, thresholds, val_x, val_y, info.num_classes, mesh=mesh, batch_size=batch_size),
    }
    runs.write_json(os.path.join(out, "manifest.json"), manifest)
    shutil.copyfile(standalone.__file__, os.path.join(out, "titans_cascade.py"))
    return manifest
