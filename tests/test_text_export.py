"""A text cascade's export and serving: the stages take int32 token ids with a symbolic batch and token
length, the export carries its tokenizer (checksummed, refused when damaged) and refuses stages trained over
another one; the standalone loader takes strings, tokenized and cut to buckets as Titans' dataset and
loaders do, and answers as the in-process cascade; titans-serve takes {"texts": [...]} and refuses
malformed text requests with a 400 naming the fault."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from titans import data, export, models, parallel, paths, runs
from titans.cascade import apply as cascade_apply
from titans.cascade import evaluate, gates
from titans.cascade.runner import CascadeRunner
from titans.config import load_config_file
from titans.data import text
from titans.export import standalone
from titans.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent
VAL = "validation[:1000]"  # the threshold split: no stage trains on it (they train on train[:2000])
TEST = "test[:400]"

pytestmark = pytest.mark.skipif(not text.wordnet_available(), reason="needs `apt-get install wordnet-base`")


def _config(data_dir, embed: int, hidden: tuple, steps: int):
    c = load_config_file(str(ROOT / "configs" / "wordnet_smoke.py"))
    c.dataset.data_dir = data_dir
    c.model.kwargs.embed_dim, c.model.kwargs.hidden = embed, hidden
    c.total_steps, c.checkpoint.every_steps = steps, steps
    return c


@pytest.fixture(scope="module")
def stage_dirs(data_dir, tmp_path_factory):
    """A small bag-of-embeddings student and a wider one as teacher, both on the smoke config's data."""
    root = tmp_path_factory.mktemp("text_export")
    for name, embed, hidden, steps in (("student", 8, (8,), 30), ("teacher", 32, (32,), 60)):
        train_and_evaluate(_config(data_dir, embed, hidden, steps), str(root / name))
    return [str(root / "student"), str(root / "teacher")]


@pytest.fixture(scope="module")
def exported(stage_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_sealed") / "export"
    manifest = export.export_cascade(stage_dirs, "msp", [0.3], VAL, str(out), batch_size=64)
    return out, manifest


@pytest.fixture(scope="module")
def test_rows(data_dir):
    """(texts, stored token ids (N, 128), labels) of the test rows, as the prepared dataset holds them."""
    data.get_source("wordnet", TEST, data_dir=data_dir)  # prepared
    src = text.TitansWordnet(data_dir=data_dir, file_format="array_record").as_data_source(split=TEST)
    rows = src.__getitems__(list(range(len(src))))
    texts = [r["text"].decode() if isinstance(r["text"], bytes) else r["text"] for r in rows]
    return texts, np.stack([r["tokens"] for r in rows]), np.asarray([r["label"] for r in rows])


# ------------------------------------------------------------------------------------------ export


def test_the_export_holds_the_tokenizer_and_int32_stages_of_symbolic_length(exported, data_dir, stage_dirs):
    out, manifest = exported
    tokenizer_file = text.TitansWordnet(data_dir=data_dir, file_format="array_record").data_path / "tokenizer.json"
    _, sha = data.tokenizer_for(data_dir)
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert manifest["tokenizer"]["sha256"] == sha == standalone.sha256((out / "tokenizer.json").read_bytes())
    assert (manifest["version"], manifest["modality"], manifest["input_dtype"]) == (3, "text", "int32")
    assert (manifest["max_tokens"], manifest["token_buckets"], manifest["vocab_size"]) == (128, [16, 32, 64, 128], 8192)
    assert manifest["class_names"][5] == "noun.animal" and len(manifest["class_names"]) == 45
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for stage in manifest["stages"]:
        exp = jax.export.deserialize(bytearray((out / stage["file"]).read_bytes()))
        assert str(exp.in_avals[0]) == "int32[b,l]"
    # Each stage's FLOPs: XLA's count averaged over the threshold rows at their buckets, as titans-cascade has it.
    info = data.dataset_info("wordnet")
    val_x, _ = runs.split_arrays(data.get_source("wordnet", VAL, data_dir=data_dir), info)
    for stage, stage_dir in zip(manifest["stages"], stage_dirs, strict=True):
        model, *_ = runs.load_model(stage_dir)
        assert stage["flops_per_example"] == pytest.approx(evaluate.flops_of(model, info, val_x), rel=1e-9)
        assert stage["flops_per_example"] < model.flops_per_example((128,))


@pytest.mark.parametrize("name", ["text_bag", "text_cnn", "transformer_small"])
def test_every_text_model_exports_with_a_symbolic_token_length(name):
    """One program per stage serves every token length up to 128 (the Transformer's positions are sliced to
    the length), with the in-process logits; a longer input is refused by the program itself."""
    info = data.dataset_info("wordnet")
    module = models.build_model(ml_collections.ConfigDict({"name": name, "kwargs": {}}), info, seed=0)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    stage = evaluate.NormalizedModel.of(runs.FrozenModel(graphdef, params, rest), info)
    gate = gates.get_gate("msp", num_classes=info.num_classes)
    program = jax.export.deserialize(bytearray(export.export_stage(stage, gate, info, last=False)))
    tokens = np.random.default_rng(0).integers(2, 8192, size=(3, 64), dtype=np.int32)
    tokens[0, 5:], tokens[1, 20:] = 0, 0
    for length in (16, 64):
        logits, scores = program.call(tokens[:, :length])
        want = np.asarray(stage.apply(tokens[:, :length]))
        np.testing.assert_allclose(logits, want[:, :45], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(scores, np.asarray(jax.vmap(gate)(want)), atol=1e-5)
    with pytest.raises(ValueError):
        program.call(np.ones((1, 129), np.int32))


def test_the_exported_cascade_answers_strings_as_the_in_process_cascade(stage_dirs, exported, test_rows):
    """The loader tokenizes the test strings into the dataset's own token ids, and its answers (classes,
    answering stage) equal the in-process CascadeRunner's on those rows at the export's thresholds, and
    titans-cascade's accuracy and answered fractions on the same split."""
    out, manifest = exported
    texts, tokens, labels = test_rows
    cascade = standalone.load(str(out))
    assert isinstance(cascade, standalone.TextCascade)
    np.testing.assert_array_equal(cascade.encode(texts), tokens)  # same ids, truncation and padding
    got = cascade.predict_texts(texts)
    loaded, info = cascade_apply.load_stages(stage_dirs, [0.3])
    stages = [evaluate.NormalizedModel.of(m, info) for m, *_ in loaded]
    gate = gates.get_gate("msp", num_classes=info.num_classes)
    mesh = parallel.make_mesh()
    for i, stage in enumerate(stages):
        want = runs.predict(evaluate.stage_logits, stage, tokens, mesh=mesh, batch_size=64)
        logits, scores = cascade.stage_outputs(i, tokens)
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
        if i == 0:
            np.testing.assert_allclose(scores, np.asarray(jax.vmap(gate)(want)), atol=1e-5)
            near = np.abs(scores - manifest["thresholds"][0]) < 1e-5  # a rounding away from the other side
    runner = CascadeRunner(stages, [gate], manifest["thresholds"], mesh=mesh)
    preds, answered_by, _ = evaluate.run_runner(runner, tokens, 64)
    assert near.sum() <= 1
    np.testing.assert_array_equal(got["answered_by"][~near], answered_by[~near])
    np.testing.assert_array_equal(got["classes"][~near], preds[~near])
    assert 0.5 < np.mean(answered_by == 0) < 0.9  # the student answered most, the teacher the rest
    summary = cascade_apply.run_cascade(stage_dirs, "msp", [0.3], VAL, TEST, 64)  # titans-cascade
    np.testing.assert_allclose(summary["thresholds"], manifest["thresholds"], rtol=1e-6)
    assert abs(summary["accuracy"] - np.mean(got["classes"] == labels)) <= near.sum() / len(labels)
    np.testing.assert_allclose(
        summary["answered_fraction"], [np.mean(got["answered_by"] == i) for i in range(2)], atol=near.sum() / 400
    )


LOADER = """
import json, sys
sys.modules["titans"] = None  # any attempt to import titans now fails
sys.path.insert(0, sys.argv[1])
import numpy as np
import titans_cascade
out = titans_cascade.load(sys.argv[1]).predict_texts(json.load(open(sys.argv[2])))
np.save(sys.argv[3], np.stack([out["classes"], out["answered_by"]]))
"""


def test_the_loader_takes_strings_without_titans(exported, test_rows, tmp_path):
    out, _ = exported
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    texts = test_rows[0][:50]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(moved), str(tmp_path / "texts.json"), str(tmp_path / "y.npy")],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    classes, answered_by = np.load(tmp_path / "y.npy")
    want = standalone.load(str(out)).predict_texts(texts)
    np.testing.assert_array_equal(classes, want["classes"])
    np.testing.assert_array_equal(answered_by, want["answered_by"])


def test_the_export_command_writes_a_text_export(stage_dirs, test_rows, tmp_path):
    """titans-export as docs/serving.md runs it on two text runs: exit 0, and the export takes strings."""
    proc = subprocess.run(
        [sys.executable, "-m", "titans.export", f"--stages={','.join(stage_dirs)}", "--rates=0.3"]
        + [f"--val_split={VAL}", "--batch_size=64", f"--out={tmp_path / 'cli'}"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert 0.0 < json.loads(proc.stdout.strip().splitlines()[-1])["val_answered_fraction"][0] < 1.0
    out = standalone.load(str(tmp_path / "cli")).predict_texts(test_rows[0][:5])
    assert out["probabilities"].shape == (5, 45)


def _backend_compiles(fn) -> int:
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


def test_chunks_are_cut_to_the_token_bucket_of_their_longest_row(exported, test_rows):
    """Each chunk reaches a stage cut to the bucket Titans' loaders would give it (`text.bucket_length`),
    with the logits of the uncut rows; a stage compiles once per (batch bucket, token bucket) and never after
    warm_up."""
    out, _ = exported
    _, tokens, _ = test_rows
    lengths = (tokens != 0).sum(1)
    order = np.argsort(lengths)
    chunks = [tokens[order[:5]], tokens[order[-3:]], tokens[order[100:140]], tokens[:1]]  # short .. long
    cascade = standalone.load(str(out), buckets=(1, 8, 64))
    shapes, real = [], cascade._stages[1].call
    cascade._stages[1] = type("Spy", (), {"call": lambda self, x: shapes.append(x.shape) or real(x)})()
    for chunk in chunks:
        got, _ = cascade.stage_outputs(1, chunk)
        np.testing.assert_allclose(got, np.asarray(real(chunk)), atol=1e-5, rtol=1e-5)  # the uncut rows
    assert [s[1] for s in shapes] == [text.bucket_length(c) for c in chunks]
    assert [s[0] for s in shapes] == [8, 8, 64, 1]
    assert min(s[1] for s in shapes) < 128  # short chunks ran short
    warm = standalone.load(str(out), buckets=(1, 8))
    warm.warm_up()
    many = [tokens[order[i : i + n]] for i, n in ((0, 3), (390, 5), (200, 1), (50, 8))]
    assert _backend_compiles(lambda: [warm.stage_outputs(i, x) for x in many for i in range(2)]) == 0


def test_token_ids_and_texts_are_checked(exported):
    cascade = standalone.load(str(exported[0]))
    for bad, message in [
        (np.ones((2, 129), np.int32), "L from 1 to 128"),
        (np.ones((2, 16), np.float32), "integer token ids"),
        (np.ones((2, 4, 4), np.int32), "integer token ids"),
        (np.full((1, 16), 8192), r"must be in \[0, 8192\)"),
        (np.full((1, 16), -1), r"must be in \[0, 8192\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            cascade.predict(bad)
    with pytest.raises(TypeError, match="not one string"):
        cascade.predict_texts("dog : a domestic animal")
    with pytest.raises(TypeError, match="text 1 is a int"):
        cascade.predict_texts(["dog", 3])
    with pytest.raises(ValueError, match="text 0 holds the padding token"):
        cascade.predict_texts(["a [PAD] in the middle"])
    with pytest.raises(ValueError, match="text 0 is not valid Unicode"):
        cascade.predict_texts(["\ud800"])
    out = cascade.predict_texts(["", "dog : " + "a very long gloss " * 100])  # empty; truncated to 128 ids
    assert out["probabilities"].shape == (2, 45)
    empty = cascade.predict(np.asarray([[0] * 16]))
    assert empty["classes"] == out["classes"][:1] and np.array_equal(empty["probabilities"], out["probabilities"][:1])


# ------------------------------------------------------------------------------------- integrity


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _same_length_edit(path):
    """Another valid tokenizer of the same size: one vocabulary entry renamed (a letter changed)."""
    raw = path.read_text()
    at = raw.index('"dog"')
    path.write_text(raw[:at] + '"dof"' + raw[at + 5 :])


TAMPER = {
    "flipped byte": (lambda d: _flip_byte(d / "tokenizer.json"), r"tokenizer\.json has SHA-256 [0-9a-f]{64}"),
    "renamed token": (lambda d: _same_length_edit(d / "tokenizer.json"), r"tokenizer\.json has SHA-256"),
    "truncated": (
        lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:100]),
        r"tokenizer\.json is 100 bytes; the exporter wrote \d+ bytes for the tokenizer",
    ),
    "missing": (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json is missing \(the tokenizer of the export"),
    "edited checksum": (
        lambda d: _edit_manifest(d, tokenizer={**_manifest(d)["tokenizer"], "sha256": "0" * 64}),
        "field 'tokenizer' differs",
    ),
}


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _edit_manifest(d, **fields):
    (d / "manifest.json").write_text(json.dumps({**_manifest(d), **fields}))


@pytest.mark.parametrize("damage", list(TAMPER))
def test_a_tampered_tokenizer_is_refused_before_use(exported, tmp_path, damage):
    d = tmp_path / "copy"
    shutil.copytree(exported[0], d)
    standalone.load(str(d))
    do, message = TAMPER[damage]
    do(d)
    with pytest.raises(standalone.ExportIntegrityError, match=message):
        standalone.load(str(d))


def test_the_text_fields_are_sealed_and_a_text_export_is_version_3(exported, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(exported[0], d)
    original = (d / "manifest.json").read_text()
    for field in ("modality", "max_tokens", "token_buckets", "vocab_size", "tokenizer", "input_dtype"):
        _edit_manifest(d, **{field: "edited"})
        with pytest.raises(standalone.ExportIntegrityError, match=f"field '{field}' differs"):
            standalone.load(str(d))
        (d / "manifest.json").write_text(original)
    # An older loader reads version 2 only, so it refuses a text export instead of feeding it images.
    (d / "manifest.json").write_text(json.dumps(standalone.seal({**json.loads(original), "version": 2})))
    with pytest.raises(standalone.ExportError, match="holds image stages, but its manifest says modality 'text'"):
        standalone.load(str(d))
    (d / "manifest.json").write_text(original)
    with pytest.raises(standalone.ExportError, match="is a text export, not one of image stages"):
        standalone.Cascade(str(d))


@pytest.fixture(scope="module")
def other_tokenizer_run(data_dir, tmp_path_factory):
    """A run trained over a data_dir holding the same records but another tokenizer.json (it records that
    tokenizer's hash): the run loads, but its ids mean other words under the export's tokenizer."""
    wordnet = text.TitansWordnet(data_dir=data_dir, file_format="array_record")
    data.get_source("wordnet", "train[:8]", data_dir=data_dir)  # prepared
    root = tmp_path_factory.mktemp("other_tokenizer")
    other = root / "data" / wordnet.data_path.relative_to(wordnet.data_dir_root)
    other.mkdir(parents=True)
    for f in wordnet.data_path.iterdir():
        if f.name != text.TOKENIZER_FILE:
            (other / f.name).symlink_to(f)
    changed = json.loads((wordnet.data_path / text.TOKENIZER_FILE).read_text())
    changed["model"]["max_input_chars_per_word"] = 99
    (other / text.TOKENIZER_FILE).write_text(json.dumps(changed))
    c = _config(str(root / "data"), 8, (8,), 4)
    c.dataset.eval_split, c.log_every_steps = "validation[:64]", 2
    train_and_evaluate(c, str(root / "run"))
    return str(root / "run"), data.tokenizer_for(str(root / "data"))[1]


def test_a_stage_trained_over_another_tokenizer_is_refused(stage_dirs, other_tokenizer_run, data_dir, tmp_path):
    run, other_sha = other_tokenizer_run
    sha = data.tokenizer_for(data_dir)[1]
    assert other_sha != sha
    runs.load_model(run)  # the run itself is sound: its own data_dir holds the tokenizer it recorded
    with pytest.raises(
        data.TokenizerMismatchError, match=f"stage 0's run {re.escape(run)} recorded tokenizer sha256 {other_sha}"
    ):
        export.export_cascade([run, stage_dirs[1]], "msp", [0.3], VAL, str(tmp_path / "out"), batch_size=64)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_image_export_over_a_text_export_leaves_no_tokenizer(tmp_path):
    out = paths.resolve(str(tmp_path / "out"))
    out.mkdir()
    export.write_export(out, {"stage0.jaxexport": b"a", "tokenizer.json": b"{}"}, {"n": 1})
    export.write_export(out, {"stage0.jaxexport": b"b"}, {"n": 2})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "stage0.jaxexport"]


# ------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def serve_lib():
    return pytest.importorskip("titans.serve", reason="needs ray[serve] (the `serve` extra)")


JSON_TYPE, NPY_TYPE = "application/json", "application/x-npy"
TEXT_REQUESTS = [
    (b"not json", JSON_TYPE, "the body is not JSON"),
    (b'["a"]', JSON_TYPE, 'expected a JSON object {"texts": [...]}'),
    (b'{"text": ["a"]}', JSON_TYPE, 'expected a JSON object with a "texts" field'),
    (b'{"images": ["a"]}', JSON_TYPE, "this service serves a text cascade"),
    (b'{"texts": []}', JSON_TYPE, "a request holds 1 to 4 texts; got 0"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', JSON_TYPE, "a request holds 1 to 4 texts; got 5"),
    (b'{"texts": "a dog"}', JSON_TYPE, '"texts" must be a list of strings; got a string'),
    (b'{"texts": {"a": "b"}}', JSON_TYPE, '"texts" must be a list of strings; got an object'),
    (b'{"texts": ["a", 7]}', JSON_TYPE, "got the number 7"),
    (b'{"texts": ["a", 1e400]}', JSON_TYPE, "got the number 1e400"),
    (b'{"texts": [NaN]}', JSON_TYPE, "got the number NaN"),
    (b'{"texts": ["a", null]}', JSON_TYPE, "text 1 is null"),
    (b'{"texts": [true]}', JSON_TYPE, "text 0 is a boolean"),
    (b'{"texts": [["a"]]}', JSON_TYPE, "nested 3 levels deep"),
    (b'{"texts": [{"a": "b"}]}', JSON_TYPE, "nested 3 levels deep"),
    (b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON_TYPE, "nested 50001 levels deep"),
    (b'{"texts": ["' + b"x" * 101 + b'"]}', JSON_TYPE, "text 0 has 101 characters; this service takes at most 100"),
    (b'{"texts": ["\\ud800"]}', JSON_TYPE, "text 0 is not valid Unicode"),
    (b'{"texts": ["a"]}', NPY_TYPE, "this service serves a text cascade"),
    (b'{"texts": ["a"]}', "text/plain", "Content-Type must be application/json"),
]


@pytest.mark.parametrize("body, content_type, message", TEXT_REQUESTS)
def test_every_malformed_text_request_is_a_bad_request_naming_the_fault(serve_lib, body, content_type, message):
    with pytest.raises(serve_lib.BadRequest) as e:
        serve_lib.parse_texts(body, 4, 100, content_type)
    assert message in str(e.value) and e.value.status == 400


def test_texts_are_counted_before_the_json_is_parsed_and_brackets_in_strings_do_not_count(serve_lib, monkeypatch):
    tricky = ["a [b] {c}", 'say "[" and "{"', "a backslash \\", "[[[[", '\\"[']
    body = json.dumps({"texts": tricky[:4]}).encode()
    assert serve_lib.parse_texts(body, 4, 100) == tricky[:4]
    monkeypatch.setattr(serve_lib.json, "loads", lambda *a, **k: pytest.fail("parsed before it was counted"))
    with pytest.raises(serve_lib.BadRequest, match="1 to 4 texts; got 5"):
        serve_lib.parse_texts(json.dumps({"texts": tricky}).encode(), 4, 100)
    with pytest.raises(serve_lib.BadRequest, match="nested 3 levels"):
        serve_lib.parse_texts(json.dumps({"texts": [tricky]}).encode(), 4, 100)


def test_the_text_limit_is_a_flag_and_must_be_positive(serve_lib, capsys):
    from titans.serve import __main__ as serve_main

    assert serve_main.parse_args(["--export=x", "--max_text_chars", "300"]).max_text_chars == 300
    assert serve_main.parse_args(["--export=x"]).max_text_chars == serve_lib.MAX_TEXT_CHARS
    with pytest.raises(SystemExit) as e:
        serve_main.parse_args(["--export=x", "--max_text_chars", "0"])
    assert e.value.code == 2 and "--max_text_chars must be positive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be positive"):
        serve_lib.build_app("x", max_text_chars=0)


def test_the_400_the_serving_page_prints_for_a_text_request_is_the_services_answer(serve_lib):
    page = (ROOT / "docs" / "serving.md").read_text()
    m = re.search(r"-d '(\{\"texts\": \[\"a\", 7\]\})'\n# (\{.*\})\s+\(HTTP 400", page)
    assert m, "docs/serving.md no longer shows the 400 of its text example"
    with pytest.raises(serve_lib.BadRequest) as e:
        serve_lib.parse_texts(m.group(1).encode(), 256, 4096)
    response = serve_lib.error_response(e.value)
    assert (response.status_code, response.body.decode()) == (400, m.group(2))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(exported, serve_lib):
    from titans.serve import __main__ as serve_main

    port = _free_port()
    serve_main.start(
        str(exported[0]), port=port, num_cpus=2, max_body_bytes=1 << 16, max_images=64, max_text_chars=1000
    )
    yield f"http://127.0.0.1:{port}/"
    serve_main.stop()


def _post(url, body: bytes, content_type="application/json"):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_served_text_answers_equal_the_exported_cascade_and_bad_requests_get_a_400(served, exported, test_rows):
    """titans-serve on a text export: {"texts": [...]} gets the loader's answers; malformed text requests get a
    400 naming the fault (a body over the limit a 413), and the service stays up."""
    texts = test_rows[0][:40]
    status, out = _post(served, json.dumps({"texts": texts}).encode())
    assert status == 200, out
    want = standalone.load(str(exported[0])).predict_texts(texts)
    np.testing.assert_array_equal(out["classes"], want["classes"])
    np.testing.assert_array_equal(out["answered_by"], want["answered_by"])
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], atol=2e-6)
    assert set(out["answered_by"]) == {0, 1} and out["class_names"][5] == "noun.animal"
    for body, content_type, message in [
        (json.dumps({"texts": ["a", 1]}).encode(), JSON_TYPE, "got the number 1"),
        (b'{"texts": []}', JSON_TYPE, "1 to 64 texts; got 0"),
        (json.dumps({"texts": [["a"]]}).encode(), JSON_TYPE, "nested 3 levels deep"),
        (json.dumps({"images": ["a"]}).encode(), JSON_TYPE, '"texts" field'),
        (json.dumps({"texts": ["a"] * 65}).encode(), JSON_TYPE, "1 to 64 texts; got 65"),
        (json.dumps({"texts": ["x" * 1001]}).encode(), JSON_TYPE, "at most 1000 a text"),
        (json.dumps({"texts": ["a [PAD] b"]}).encode(), JSON_TYPE, "holds the padding token"),
        (json.dumps({"texts": ["a"]}).encode(), NPY_TYPE, "serves a text cascade"),
        (json.dumps({"texts": ["x" * 1000] * 70}).encode(), JSON_TYPE, "this service takes at most 65536"),
    ]:
        status, answer = _post(served, body, content_type)
        assert status == (413 if "65536" in message else 400) and message in answer["error"], answer
    status, out = _post(served, json.dumps({"texts": texts[:2]}).encode())
    assert status == 200 and out["classes"] == want["classes"][:2].tolist()
