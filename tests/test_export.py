"""Exported cascades: predictions equal the in-process ones (every stage, 2 and 3 stages), the
standalone loader runs where titans cannot be imported, and an artifact from another JAX version or
for another platform is refused with a clear message. Integrity: a missing, truncated, swapped or
changed stage file and an edited manifest field are refused naming the file or field; a second export
into a locked directory is refused naming the holder; an export killed midway leaves the previous
export intact or a directory the loader refuses; unfinished runs are refused unless allowed."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import digits_config

from titans import data, export, parallel, runs, train
from titans.cascade import apply as cascade_apply
from titans.cascade import evaluate, gates
from titans.cascade.runner import CascadeRunner
from titans.export import standalone


@pytest.fixture(scope="module")
def stage_dirs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    dirs = []
    for name, hidden, steps in (("tiny", (8,), 40), ("small", (16,), 40), ("teacher", (64,), 80)):
        c = digits_config(data_dir, total_steps=steps, **{"dataset.train_split": "train[:80%]"})
        c.model.kwargs.hidden = hidden
        train.train_and_evaluate(c, str(root / name))
        dirs.append(str(root / name))
    return dirs


@pytest.fixture(scope="module")
def test_images(data_dir):
    info = data.dataset_info("digits")
    return runs.split_arrays(data.get_source("digits", "test", data_dir=data_dir), info)


def _export(stage_dirs, out, rates):
    return export.export_cascade(stage_dirs, "msp", rates, "train[80%:]", str(out), batch_size=64)


@pytest.mark.parametrize("k", [2, 3])
def test_exported_stages_and_cascade_equal_in_process(stage_dirs, test_images, tmp_path, k):
    dirs = stage_dirs[-k:] if k == 2 else stage_dirs
    rates = [0.3] * (k - 1)
    manifest = _export(dirs, tmp_path, rates)
    cascade = standalone.load(str(tmp_path))
    # An image export is as before the text exports: version 2, no text fields, no tokenizer file.
    assert manifest["version"] == 2 and type(cascade) is standalone.Cascade
    assert not {"modality", "tokenizer", "max_tokens", "token_buckets"} & set(manifest)
    assert not (tmp_path / "tokenizer.json").exists() and manifest["input_dtype"] == "uint8"
    x, _ = test_images
    loaded, info = cascade_apply.load_stages(dirs, rates)
    stages = [evaluate.NormalizedModel.of(m, info) for m, *_ in loaded]
    gate = gates.get_gate("msp", num_classes=info.num_classes)
    mesh = parallel.make_mesh()
    for i, stage in enumerate(stages):  # every stage: logits, and the gate score of non-final stages
        want = runs.predict(evaluate.stage_logits, stage, x, mesh=mesh, batch_size=64)
        got, scores = cascade.stage_outputs(i, x)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        np.testing.assert_allclose(_softmax(got), _softmax(want), atol=1e-5, rtol=0)
        if i < k - 1:
            np.testing.assert_allclose(scores, np.asarray([float(gate(row)) for row in want]), atol=1e-5)
    # The whole cascade against the in-process runner at the same thresholds.
    runner = CascadeRunner(stages, [gate] * (k - 1), manifest["thresholds"], mesh=mesh)
    preds, answered_by, _ = evaluate.run_runner(runner, x, 64)
    out = cascade.predict(x)
    np.testing.assert_array_equal(out["classes"], preds)
    np.testing.assert_array_equal(out["answered_by"], answered_by)
    assert 0 < np.mean(answered_by == 0) < 1  # both the student and a later stage answered something
    assert manifest["stages"][0]["flops_per_example"] < manifest["stages"][-1]["flops_per_example"]


def _backend_compiles(fn) -> int:
    """How many XLA backend compilations `fn()` triggered."""
    count = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(count)


def test_stages_compile_once_per_bucket_and_never_after_warm_up(stage_dirs, test_images, tmp_path):
    """A deferred-row count that changes every call must not recompile the stage every call: chunks are
    padded to the loader's buckets (outputs as if unpadded), and warm_up compiles them all ahead."""
    _export(stage_dirs[-2:], tmp_path, [0.3])
    x, _ = test_images
    sizes = (1, 3, 5, 7, 37, 45, 100, 300)  # 300 > the largest bucket: two chunks
    cascade = standalone.load(str(tmp_path), buckets=(1, 4, 8, 48, 128))
    direct = cascade._stages[1].call(x[:300])  # the artifact at one batch of 300, no padding
    cold = _backend_compiles(lambda: [cascade.stage_outputs(1, x[:n]) for n in sizes])
    assert 0 < cold <= 5  # at most one compilation per bucket, not one per size
    for n in sizes:
        got, _ = cascade.stage_outputs(1, x[:n])
        np.testing.assert_allclose(got, np.asarray(direct)[:n], atol=1e-5, rtol=0)
    warm = standalone.load(str(tmp_path), buckets=(1, 4, 8, 48, 128))
    warm.warm_up()
    assert _backend_compiles(lambda: [warm.stage_outputs(i, x[:n]) for n in sizes for i in range(2)]) == 0
    empty, scores = warm.stage_outputs(0, x[:0])
    assert empty.shape == (0, 10) and scores.shape == (0,)


def test_the_default_buckets_pad_at_most_half():
    """The loader's promise (module docstring, docs/serving.md): padding a chunk to its bucket costs at most
    1.5x its rows' compute, and nothing for 2 rows or fewer. (Without the 6 bucket, 5 rows ran as 8.)"""
    padded = {n: standalone.padded_size(n) for n in range(1, standalone.BUCKETS[-1] + 1)}
    assert all(n <= b < 1.5 * n for n, b in padded.items() if n > 2)
    assert all(padded[n] == n for n in (1, 2))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


LOADER = """
import sys
sys.modules["titans"] = None  # any attempt to import titans now fails
sys.path.insert(0, sys.argv[1])
import numpy as np
import titans_cascade
cascade = titans_cascade.load(sys.argv[1])
out = cascade.predict(np.load(sys.argv[2]))
np.save(sys.argv[3], np.stack([out["classes"], out["answered_by"]]))
"""


def test_loader_runs_without_titans(stage_dirs, test_images, tmp_path):
    _export(stage_dirs[-2:], tmp_path / "exp", [0.3])
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "exp", moved)
    x, _ = test_images
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(moved), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    classes, answered_by = np.load(tmp_path / "y.npy")
    out = standalone.load(str(moved)).predict(x)
    np.testing.assert_array_equal(classes, out["classes"])
    np.testing.assert_array_equal(answered_by, out["answered_by"])


@pytest.mark.parametrize(
    "field, value, message",
    [("jax_version", "0.0.1", "exported with jax 0.0.1"), ("platforms", ["tpu"], r"exported for \['tpu'\]")],
)
def test_artifact_of_another_jax_or_platform_is_refused(stage_dirs, tmp_path, field, value, message):
    _export(stage_dirs[-2:], tmp_path, [0.3])
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(standalone.seal({**manifest, field: value})))  # as that JAX would have written it
    with pytest.raises(standalone.ExportError, match=message):
        standalone.load(str(tmp_path))


def test_bad_input_is_refused(stage_dirs, tmp_path):
    _export(stage_dirs[-2:], tmp_path, [0.3])
    cascade = standalone.load(str(tmp_path))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        cascade.predict(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        cascade.predict(np.zeros((2, 28, 28, 1), np.uint8))


def test_export_cli(stage_dirs, tmp_path):
    from helpers import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "titans.export",
            f"--stages={','.join(stage_dirs[-2:])}",
            "--rates=0.25",
            "--val_split=train[80%:]",
            "--batch_size=64",
            f"--out={tmp_path / 'cli'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(printed["thresholds"]) == 1 and 0.0 < printed["val_answered_fraction"][0] < 1.0
    assert os.path.exists(tmp_path / "cli" / "titans_cascade.py")
    bad = subprocess.run(
        [sys.executable, "-m", "titans.export", "--stages=/nonexistent,/nope", f"--out={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "error:" in bad.stderr


def test_threshold_split_overlapping_a_training_split_is_refused(stage_dirs, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"shares 288 examples with the training split 'train\[:80%\]'"):
        _export(stage_dirs[-2:], tmp_path, [0.3]) if False else export.export_cascade(
            stage_dirs[-2:], "msp", [0.3], "train[60%:]", str(tmp_path), batch_size=64
        )


# ------------------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def exported(stage_dirs, tmp_path_factory):
    """One real 2-stage export (student, teacher), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("sealed") / "export"
    _export(stage_dirs[-2:], out, [0.3])
    return out


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(path, **fields):
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, **fields}, indent=2))


DAMAGE = {
    "flipped byte": (lambda d: _flip_byte(d / "stage1.jaxexport"), r"stage1\.jaxexport has SHA-256 [0-9a-f]{64}"),
    "student copied over teacher": (
        lambda d: shutil.copyfile(d / "stage0.jaxexport", d / "stage1.jaxexport"),
        r"stage1\.jaxexport is \d+ bytes; the exporter wrote \d+ bytes",
    ),
    "truncated": (
        lambda d: (d / "stage0.jaxexport").write_bytes((d / "stage0.jaxexport").read_bytes()[:1000]),
        r"stage0\.jaxexport is 1000 bytes",
    ),
    "missing": (lambda d: (d / "stage0.jaxexport").unlink(), r"stage0\.jaxexport is missing"),
    "edited threshold": (
        lambda d: _edit_manifest(d / "manifest.json", thresholds=[0.5]),
        r"manifest\.json was changed after the export: field 'thresholds' differs",
    ),
    "edited file checksum": (
        lambda d: _edit_manifest(d / "manifest.json", stages=[{**s, "sha256": "0" * 64} for s in _stages(d)]),
        r"manifest\.json was changed after the export: field 'stages' differs",
    ),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), r"holds no manifest\.json"),
    "truncated manifest": (
        lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:200]),
        r"manifest\.json is not valid JSON",
    ),
}


def _stages(d):
    return json.loads((d / "manifest.json").read_text())["stages"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_export_is_refused_naming_the_file(exported, tmp_path, damage):
    d = tmp_path / "copy"
    shutil.copytree(exported, d)
    standalone.load(str(d))  # the undamaged copy loads
    do, message = DAMAGE[damage]
    do(d)
    with pytest.raises(standalone.ExportIntegrityError, match=message) as e:
        standalone.load(str(d))
    assert isinstance(e.value, ValueError)


def test_every_manifest_field_is_covered_by_its_checksum(exported, tmp_path):
    """Editing any field (the operating point, the expected accuracy, a stage's source run) is refused."""
    d = tmp_path / "copy"
    shutil.copytree(exported, d)
    original = (d / "manifest.json").read_text()
    manifest = json.loads(original)
    for field in sorted(set(manifest) - {"format", "version", "integrity"}):
        _edit_manifest(d / "manifest.json", **{field: "edited"})
        with pytest.raises(standalone.ExportIntegrityError, match=f"field '{field}' differs"):
            standalone.load(str(d))
        (d / "manifest.json").write_text(original)
    _edit_manifest(d / "manifest.json", extra=1)
    with pytest.raises(standalone.ExportIntegrityError, match="field 'extra' was added"):
        standalone.load(str(d))


def test_a_second_export_into_a_locked_directory_is_refused(stage_dirs, tmp_path, capsys):
    from titans import locks
    from titans.export import __main__ as export_main

    out = tmp_path / "exp"
    with locks.WorkdirLock(str(out), "export"):  # what a running export holds
        with pytest.raises(locks.WorkdirLockedError, match=rf"export on host .*, pid {os.getpid()}"):
            _export(stage_dirs[-2:], out, [0.3])
        argv = [f"--stages={','.join(stage_dirs[-2:])}", "--val_split=train[80%:]", f"--out={out}"]
        with pytest.raises(SystemExit) as e:
            export_main.main(argv)
    assert e.value.code == 2 and f"pid {os.getpid()}" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


KILLER = """
import os, sys
from titans import export
point, count = sys.argv[1], int(sys.argv[2])
real, calls = getattr(export, point), []
def dying(*args):
    calls.append(args)
    if len(calls) == count:
        os._exit(9)  # a kill: no cleanup runs
    return real(*args)
setattr(export, point, dying)
export.export_cascade(sys.argv[3].split(","), "msp", [0.3], "train[80%:]", sys.argv[4], batch_size=64)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, count",
    [("_write", 2), ("_move", 1), ("_move", 4)],  # staging; the first move; before the manifest's move
)
def test_an_export_killed_midway_leaves_the_old_export_or_none(stage_dirs, test_images, tmp_path, point, count):
    from helpers import REPO

    out = tmp_path / "exp"
    _export(stage_dirs, out, [0.5, 0.5])  # the previous export: other stage files, and one more
    x, _ = test_images
    before = standalone.load(str(out)).predict(x)["classes"]
    new = ",".join(stage_dirs[1:])
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(count), new, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr
    if point == "_write":  # killed while writing the new files aside: the previous export is untouched
        np.testing.assert_array_equal(standalone.load(str(out)).predict(x)["classes"], before)
    else:  # killed while moving them into place: no manifest, refused
        with pytest.raises(standalone.ExportIntegrityError, match=r"holds no manifest\.json"):
            standalone.load(str(out))
    manifest = _export(stage_dirs[1:], out, [0.3])  # the next export cleans up and succeeds
    assert standalone.load(str(out)).manifest == manifest
    assert not (out / ".export-partial").exists() and not (out / "stage2.jaxexport").exists()


# ------------------------------------------------------------------------------- unfinished runs


@pytest.fixture(scope="module")
def unfinished_dirs(stage_dirs, tmp_path_factory):
    """Copies of the student run as a kill after its step-20 checkpoint leaves it: without results.json
    and its step-40 checkpoint; and one with results.json but only the step-20 checkpoint left."""
    root = tmp_path_factory.mktemp("unfinished")
    out = {}
    for name, keep_results in (("killed", False), ("rolled_back", True)):
        d = root / name
        shutil.copytree(stage_dirs[1], d)
        shutil.rmtree(d / "checkpoints" / "40")
        if not keep_results:
            (d / "results.json").unlink()
        out[name] = str(d)
    return out


@pytest.mark.parametrize(
    "run, reason",
    [
        ("killed", r"no results\.json: training has not finished \(checkpoint step 20 of 40\)"),
        ("rolled_back", "its latest checkpoint is step 20 of 40"),
    ],
)
def test_unfinished_run_is_refused_unless_allowed(stage_dirs, unfinished_dirs, tmp_path, capsys, run, reason):
    from titans.export import __main__ as export_main

    dirs = [unfinished_dirs[run], stage_dirs[2]]
    with pytest.raises(export.UnfinishedRunError, match=reason):
        _export(dirs, tmp_path / "lib", [0.3])
    argv = [f"--stages={','.join(dirs)}", "--val_split=train[80%:]", "--batch_size=64", f"--out={tmp_path / 'cli'}"]
    with pytest.raises(SystemExit) as e:
        export_main.main(argv)
    assert e.value.code == 2 and "--allow_unfinished" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() and not (tmp_path / "lib").exists()  # nothing written
    manifest = export.export_cascade(
        dirs, "msp", [0.3], "train[80%:]", str(tmp_path / "ok"), batch_size=64, allow_unfinished=True
    )
    loaded = standalone.load(str(tmp_path / "ok")).manifest
    assert loaded == manifest and loaded["allow_unfinished"] is True
    assert [(s["step"], s["total_steps"], s["finished"]) for s in loaded["stages"]] == [(20, 40, False), (80, 80, True)]


@pytest.mark.slow
def test_export_into_a_bucket(stage_dirs, test_images, tmp_path):
    """--out=gs://...: the export is written through etils.epath (staging, lock, moves, manifest last);
    copied down, it loads with every checksum verified and answers as a local export does."""
    from gcs import emulator, environment

    from titans import paths

    with emulator(str(tmp_path / "gcs")) as (env, bucket), environment(env):
        out = f"gs://{bucket}/exports/cascade"
        manifest = _export(stage_dirs[-2:], out, [0.3])
        remote = paths.resolve(out)
        names = sorted(p.name for p in remote.iterdir())
        assert {"manifest.json", "stage0.jaxexport", "stage1.jaxexport", "titans_cascade.py"} <= set(names)
        assert ".export-partial" not in names
        local = tmp_path / "copy"
        local.mkdir()
        for name in ("manifest.json", "stage0.jaxexport", "stage1.jaxexport"):
            (local / name).write_bytes((remote / name).read_bytes())
    assert standalone.load(str(local)).manifest == manifest
    x, _ = test_images
    _export(stage_dirs[-2:], tmp_path / "local", [0.3])
    np.testing.assert_array_equal(
        standalone.load(str(local)).predict(x)["classes"],
        standalone.load(str(tmp_path / "local")).predict(x)["classes"],
    )
