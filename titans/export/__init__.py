"""Export a cascade at a chosen operating point as artifacts that run without Titans.

    titans-export --stages=W/tiny_standard,W/teacher --gate=msp --rates=0.3 --val_split='train[90%:]' \
        --out=exports/fmnist_cascade

writes one directory:

    manifest.json       format/version, Titans and JAX versions, platforms, input shape and dtype,
                        normalisation, class names, gate, thresholds (chosen on --val_split for the
                        --rates), per-stage XLA FLOPs, expected validation accuracy and deferral,
                        per stage its file (size, SHA-256) and source run (workdir, step, total steps,
                        finished?, SHA-256 of its variables), whether unfinished runs were allowed, and
                        `integrity`: the SHA-256 of every other field (standalone.seal)
    stage{i}.jaxexport  stage i serialised with `jax.export` (StableHLO, symbolic batch dimension):
                        uint8 images -> (logits, gate score) for every stage but the last, which
                        returns logits only; normalisation happens inside
    titans_cascade.py   the loader: jax + numpy only (titans/export/standalone.py); it checks every
                        checksum before it runs anything

    import titans_cascade; cascade = titans_cascade.load("exports/fmnist_cascade"); cascade.predict(images)

The thresholds are chosen on validation data exactly as `titans-cascade` chooses them, so the exported
cascade defers the same examples as the in-process one (tests/test_export.py).

Text. A cascade of text runs (`dataset.name = "wordnet"`) exports with its tokenizer, and the manifest
says so (version 3, `modality` "text"): each stage takes int32 token ids (b, l), batch and token length
both symbolic (l <= the dataset's `max_tokens`, 128; one program serves every length bucket); the last
stage's dataset's tokenizer.json is copied in, its size and SHA-256 recorded under `tokenizer`, with
`max_tokens`, `token_buckets` (16/32/64/128) and `vocab_size`. Every stage's run must have recorded that
tokenizer's SHA-256 in its checkpoint meta: a stage trained over another tokenizer is refused
(`TokenizerMismatchError`), since its token ids would mean other words. The loader then takes strings:
`load(dir).predict_texts(["..."])` (tests/test_text_export.py).

Safety. Every stage run must have finished (results.json, and its checkpoint at the run's last step);
an unfinished one is refused (`UnfinishedRunError`) unless `allow_unfinished`, which the manifest
records. The export holds the output directory's `WorkdirLock` ("export"), so a second export into it
fails at once naming the first, and it writes everything into OUT/.export-partial/ first, then removes
the old manifest.json, moves the new files into place and the new manifest last: an export killed
before the moves leaves the previous export as it was, one killed during them leaves a directory
without a manifest, which the loader refuses. The output directory is an `etils.epath.Path`, so it may
be a bucket (gs://...); there the moves are copies, and the manifest still comes last.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import export as jax_export

import titans
from titans import checkpoint as ckpt_lib
from titans import data as data_lib
from titans import locks, parallel, paths, runs
from titans.cascade import apply as cascade_apply
from titans.cascade import evaluate, gates
from titans.data import text as text_lib
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


def input_spec(info) -> jax.ShapeDtypeStruct:
    """What an exported stage takes: uint8 images (b, H, W, C), or for text int32 token ids (b, l) with the
    token length symbolic too, at most the dataset's longest (`image_shape[0]`)."""
    if info.modality == "text":
        shape = jax_export.symbolic_shape("b, l", constraints=[f"l <= {int(info.image_shape[0])}"])
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    shape = jax_export.symbolic_shape("b, " + ", ".join(str(d) for d in info.image_shape))
    return jax.ShapeDtypeStruct(shape, jnp.uint8)


def export_stage(stage, gate, info, last: bool) -> bytes:
    """Stage `stage` serialised with jax.export for `input_spec(info)`: a symbolic batch dimension (and for
    text a symbolic token length)."""
    fn = jax.jit(_stage_fn(stage, gate, info.num_classes, last))
    return bytes(jax_export.export(fn, platforms=_platforms())(input_spec(info)).serialize())


def class_names(info) -> list[str]:
    if info.name in CLASS_NAMES:
        return list(CLASS_NAMES[info.name])
    if info.name == "wordnet":
        return list(text_lib.label_names())
    return [str(c) for c in range(info.num_classes)]


def export_tokenizer(stage_dirs, loaded) -> tuple[bytes, dict]:
    """(tokenizer.json's bytes, its manifest entry) of a text cascade: the tokenizer of the last stage's
    data_dir, which every stage's run must have recorded (its checkpoint meta's `tokenizer.sha256`)."""
    data_dir = loaded[-1][1].dataset.data_dir or None
    _, sha = data_lib.tokenizer_for(data_dir)
    where = os.path.expanduser(os.fspath(data_dir or data_lib.default_data_dir()))
    path = text_lib.TitansWordnet(data_dir=where, file_format="array_record").data_path / text_lib.TOKENIZER_FILE
    data = path.read_bytes()
    if standalone.sha256(data) != sha:
        raise data_lib.TokenizerMismatchError(
            f"{path} changed while it was read (SHA-256 {standalone.sha256(data)}, then {sha}); export again."
        )
    for i, (d, (*_, step)) in enumerate(zip(stage_dirs, loaded)):
        run = runs.RunDir(d)
        recorded = ckpt_lib.Checkpointer(run.path, read_only=True).read_meta(step).get("fields", {})
        if recorded.get("tokenizer.sha256") != sha:
            raise data_lib.TokenizerMismatchError(
                f"not exporting: stage {i}'s run {run.path} recorded tokenizer sha256 "
                f"{recorded.get('tokenizer.sha256')} (checkpoint step {step}), but the export's tokenizer ({path}, "
                f"the last stage's data_dir) is {sha}. Its token ids would mean other words under it. Export "
                f"stages trained over the same tokenizer (the same prepared wordnet dataset)."
            )
    entry = {"file": text_lib.TOKENIZER_FILE, "size": len(data), "sha256": sha, "source": str(path)}
    return data, entry


def text_fields(info, tokenizer: dict) -> dict:
    """The manifest fields of a text export (version 3)."""
    return {
        "version": standalone.TEXT_VERSION,
        "modality": "text",
        "input_dtype": "int32",
        "max_tokens": int(info.image_shape[0]),
        "token_buckets": [int(b) for b in text_lib.BUCKETS],
        "vocab_size": int(info.vocab_size),
        "tokenizer": tokenizer,
    }


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


class UnfinishedRunError(ValueError):
    """A stage's run has not finished training (no results.json, or its checkpoint is before its last step)."""


def run_status(stage_dir, step: int) -> dict:
    """Whether the run in `stage_dir` finished, for the checkpoint `step` an export would take from it."""
    run = runs.RunDir(stage_dir)
    results = run.results()
    total = (results or {}).get("steps") or max(int(run.config.get("total_steps", 0) or 0), 0) or None
    if results is None:
        reason = f"no results.json: training has not finished (checkpoint step {step:,}" + (
            f" of {total:,})" if total else ")"
        )
    elif total and step < total:
        reason = f"its latest checkpoint is step {step:,} of {total:,}"
    else:
        reason = None
    return {"finished": reason is None, "total_steps": total, "reason": reason}


def check_finished(stage_dirs, loaded, allow_unfinished: bool) -> list[dict]:
    """run_status of every stage; refuses unfinished runs unless `allow_unfinished` (then a warning)."""
    statuses = [run_status(d, step) for d, (*_, step) in zip(stage_dirs, loaded)]
    unfinished = [f"{runs.RunDir(d).path} ({s['reason']})" for d, s in zip(stage_dirs, statuses) if not s["finished"]]
    if unfinished and not allow_unfinished:
        raise UnfinishedRunError(
            f"not exporting: {len(unfinished)} stage run(s) have not finished: {'; '.join(unfinished)}. A cascade "
            f"exported now would serve a model that is still training. Finish the run(s) (the same training "
            f"command resumes them), or pass --allow_unfinished to export them as they are (the manifest records it)."
        )
    for u in unfinished:
        logging.warning("Exporting an unfinished run, as allowed: %s", u)
    return statuses


def export_cascade(
    stage_dirs, gate_name: str, rates, val_split: str, out, batch_size: int = 512, *, allow_unfinished: bool = False
) -> dict:
    """Writes the export directory `out` (see the module docstring); returns its manifest."""
    rates = [float(r) for r in rates]
    loaded, info = cascade_apply.load_stages(stage_dirs, rates)
    statuses = check_finished(stage_dirs, loaded, allow_unfinished)
    evaluate.check_threshold_split([cfg for _, cfg, _, _ in loaded], info, val_split)
    files, extra = {}, {}
    if info.modality == "text":  # refused before anything is written, like an unfinished run
        files[text_lib.TOKENIZER_FILE], tokenizer = export_tokenizer(stage_dirs, loaded)
        extra = text_fields(info, tokenizer)
    out = paths.resolve(out)  # an epath.Path: a local directory made absolute, or a bucket's URL as it is
    with locks.WorkdirLock(out, "export"):
        stages = [evaluate.NormalizedModel.of(m, info) for m, *_ in loaded]
        gate = gates.get_gate(gate_name, num_classes=info.num_classes)
        mesh = parallel.make_mesh()
        batch_size = runs.round_up(batch_size, mesh.devices.size)
        src = data_lib.get_source(info.name, val_split, data_dir=loaded[-1][1].dataset.data_dir or None)
        val_x, val_y = runs.split_arrays(src, info)  # text: token ids padded to 128, one array
        thresholds = cascade_apply.choose_thresholds(stages, gate, rates, val_x, mesh=mesh, batch_size=batch_size)
        entries = []
        for i, (stage, (model, cfg, _, step)) in enumerate(zip(stages, loaded)):
            name = f"stage{i}.jaxexport"
            files[name] = export_stage(stage, gate, info, i == len(stages) - 1)
            entries.append(
                {
                    "file": name,
                    "size": len(files[name]),
                    "sha256": standalone.sha256(files[name]),
                    "workdir": runs.RunDir(stage_dirs[i]).path,
                    "step": int(step),
                    "total_steps": statuses[i]["total_steps"],
                    "finished": statuses[i]["finished"],
                    "model": cfg.model.name,
                    "variables_sha256": cache_lib.variables_digest(model),
                    # text: averaged over the validation rows at their length buckets, as titans-cascade does
                    "flops_per_example": evaluate.flops_of(model, info, val_x),
                }
            )
        expected = _expected(stages, gate, thresholds, val_x, val_y, info.num_classes, mesh=mesh, batch_size=batch_size)
        manifest = _manifest(info, gate_name, rates, thresholds, val_split, entries, expected, allow_unfinished, extra)
        with open(standalone.__file__, "rb") as f:
            files["titans_cascade.py"] = f.read()
        write_export(out, files, manifest)
    return manifest


def _manifest(info, gate_name, rates, thresholds, val_split, entries, expected, allow_unfinished, extra) -> dict:
    """The export's manifest, sealed (standalone.seal: the SHA-256 of every field under `integrity`); `extra`:
    a text export's fields (`text_fields`), which replace or add to an image export's."""
    return standalone.seal(
        {
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
            "class_names": class_names(info),
            "gate": gate_name,
            "target_rates": rates,
            "thresholds": [float(t) for t in thresholds],
            "val_split": val_split,
            "allow_unfinished": bool(allow_unfinished),
            "stages": entries,
            **expected,
            **extra,
        }
    )


STAGING = ".export-partial"


def _write(path: epath.Path, data: bytes) -> None:
    path.write_bytes(data)


def _move(src: epath.Path, dst: epath.Path) -> None:
    src.replace(dst)


def write_export(out: epath.Path, files: dict[str, bytes], manifest: dict) -> None:
    """Puts `files` and `manifest` into `out`, whose lock the caller holds, so that no reader ever loads a
    half-written export: everything is written into OUT/.export-partial/ first (a kill here leaves the
    previous export intact), then the old manifest.json goes, the files move into place, and the new
    manifest comes last (a kill between leaves no manifest.json, which the loader refuses)."""
    staging = out / STAGING
    if staging.exists():  # left by an export that was killed
        staging.rmtree()
    staging.mkdir(parents=True)
    for name, data in files.items():
        _write(staging / name, data)
    _write(staging / standalone.MANIFEST, json.dumps(manifest, indent=2, allow_nan=False).encode())
    if (out / standalone.MANIFEST).exists():
        (out / standalone.MANIFEST).unlink()
    # a previous export with more stages, or a text export's tokenizer
    for stale in [*out.glob("stage*.jaxexport"), *out.glob(text_lib.TOKENIZER_FILE)]:
        if stale.name not in files:
            stale.unlink()
    for name in files:
        _move(staging / name, out / name)
    _move(staging / standalone.MANIFEST, out / standalone.MANIFEST)
    if staging.exists():  # a bucket has no empty directories: there it is gone already
        staging.rmtree()
