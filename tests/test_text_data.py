"""The offline text benchmark (titans/data/text.py): WordNet supersenses prepared through TFDS from Debian's
`wordnet-base` files, the trained tokenizer and its hash, token batches in length buckets, the smoke run."""

import json
import os
import pathlib
import re
import subprocess
import sys
import unittest.mock

import numpy as np
import pytest
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data, models, runs
from titans.config import load_config_file
from titans.data import text
from titans.data import tfidf_reference as tfidf
from titans.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not text.wordnet_available(), reason="needs `apt-get install wordnet-base`")


@pytest.fixture(scope="module")
def wordnet(data_dir):
    """The prepared builder in the session's data_dir (prepared once, on first use, by get_source)."""
    data.get_source("wordnet", "train", data_dir=data_dir)
    return text.TitansWordnet(data_dir=data_dir, file_format="array_record")


@pytest.fixture(scope="module")
def records(wordnet):
    """Split -> every stored field of every example, as read back from the ArrayRecord files."""
    out = {}
    for split in text.SPLITS:
        ds = wordnet.as_data_source(split=split)
        rows = ds.__getitems__(list(range(len(ds))))
        out[split] = {k: [r[k] for r in rows] for k in rows[0]}
        out[split]["synset_id"] = [s.decode() if isinstance(s, bytes) else s for s in out[split]["synset_id"]]
        out[split]["text"] = [s.decode() if isinstance(s, bytes) else s for s in out[split]["text"]]
    return out


# ------------------------------------------------------------------------------------------ parsing


ADJ_LINE = (
    "00002312 00 s 02 abaxial(a) 0 dorsal 4 002 ;c 06037666 n 0000 ! 00002527 a 0101 | facing away "
    'from the axis of an organ or organism; "the abaxial surface of a leaf"  \n'
)


def test_a_synset_line_becomes_lemmas_colon_gloss_labelled_by_its_lexicographer_file():
    s = text.parse_line(ADJ_LINE, "a")
    assert s.synset_id == "a:00002312"
    assert s.label == 0 and text.label_names()[0] == "adj.all"  # a satellite ('s') is adj.all like 'a'
    assert (
        s.text == 'abaxial, dorsal : facing away from the axis of an organ or organism; "the abaxial surface of a leaf"'
    )
    assert text.parse_line("  1 This software and database is being provided\n", "a") is None  # license header
    many = text.parse_line("02084071 05 n 0b dog 0 domestic_dog 0 " + "x 0 " * 9 + "000 | a member of the genus", "n")
    assert many.lemmas[:2] == ("dog", "domestic dog") and len(many.lemmas) == 11  # w_cnt is hexadecimal
    with pytest.raises(ValueError, match="lexicographer file 45"):
        text.parse_line("00000001 45 n 01 x 0 000 | gloss", "n")


def test_label_names_come_from_lexnames_beside_the_files_when_present(tmp_path):
    assert len(text.label_names(str(tmp_path))) == 45
    names = [f"name{k}" for k in range(45)]
    (tmp_path / "lexnames").write_text("".join(f"{k:02d}\t{n}\t1\n" for k, n in reversed(list(enumerate(names)))))
    assert text.label_names(str(tmp_path)) == tuple(names)


# ---------------------------------------------------------------------------------- prepared dataset


def test_the_builder_yields_every_synset_once_in_the_documented_splits(records):
    info = data.dataset_info("wordnet")
    sizes = {split: len(records[split]["label"]) for split in text.SPLITS}
    assert sizes == info.splits
    assert sum(sizes.values()) == text.NUM_SYNSETS == 117659
    ids = {split: set(records[split]["synset_id"]) for split in text.SPLITS}
    assert all(len(ids[s]) == sizes[s] for s in text.SPLITS)
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    raw = text.read_synsets()
    assert set().union(*ids.values()) == {s.synset_id for s in raw}
    # Each example is its synset: its split is the hash's, its text and label those of the files.
    by_id = {s.synset_id: s for s in raw}
    for split in text.SPLITS:
        r = records[split]
        assert all(text.split_of(i) == split for i in r["synset_id"])
        assert [by_id[i].text for i in r["synset_id"]] == r["text"]
        assert [by_id[i].label for i in r["synset_id"]] == [int(x) for x in r["label"]]
    counts = {s: np.bincount(np.asarray(records[s]["label"]), minlength=45) for s in text.SPLITS}
    assert {s: c.tolist() for s, c in counts.items()} == {s: c.tolist() for s, c in text.class_counts().items()}


def test_the_split_is_a_fixed_hash_of_the_synset_id_and_each_split_is_in_hash_order(records):
    # Fixed on every machine: these ids fall where they fell when docs/text.md was written.
    ids = ("n:00001740", "n:00023100", "n:00005930", "v:00001740", "a:00001740")
    assert [text.split_of(i) for i in ids] == ["train", "validation", "test", "validation", "train"]
    counts = dict.fromkeys(text.SPLITS, 0)
    for s in text.read_synsets():
        counts[text.split_of(s.synset_id)] += 1
    assert [counts[s] / text.NUM_SYNSETS for s in text.SPLITS] == pytest.approx([0.8, 0.1, 0.1], abs=0.005)
    splits = text.by_split(text.read_synsets())
    for split in text.SPLITS:
        ids = [s.synset_id for s in splits[split]]
        assert ids == records[split]["synset_id"]  # the prepared order is by_split's
        digests = [text._digest(i) for i in ids]
        assert digests == sorted(digests)  # so that train[:2000] samples every part of speech
    assert {i[0] for i in records["train"]["synset_id"][:2000]} == set("nvar")


def test_docs_class_count_table_is_the_generated_one():
    page = (ROOT / "docs" / "text.md").read_text()
    assert text.class_count_table() in page


def test_tokens_lengths_and_padding_are_stored_as_documented(records, wordnet):
    tok, _ = text.read_tokenizer(wordnet.data_path)
    r = records["validation"]
    tokens, length, full = np.stack(r["tokens"]), np.asarray(r["length"]), np.asarray(r["num_tokens"])
    assert (
        tokens.dtype == np.int32 and tokens.shape[1] == text.MAX_TOKENS == data.dataset_info("wordnet").image_shape[0]
    )
    assert np.array_equal(length, np.minimum(full, text.MAX_TOKENS)) and (full > text.MAX_TOKENS).any()
    positions = np.arange(text.MAX_TOKENS)
    assert np.all((tokens != 0) == (positions < length[:, None]))  # real ids first, then 0 = [PAD]
    for i in range(0, len(length), 997):
        ids = tok.encode(r["text"][i], add_special_tokens=False).ids
        assert tokens[i, : length[i]].tolist() == ids[: text.MAX_TOKENS] and full[i] == len(ids)


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.slow
def test_the_tokenizer_is_trained_on_train_only_lower_cased_with_the_info_vocab_size(wordnet, records):
    tok, sha = data.tokenizer_for(wordnet.data_dir_root)
    assert tok.get_vocab_size() == data.dataset_info("wordnet").vocab_size == text.VOCAB_SIZE
    assert tok.token_to_id(text.PAD) == 0 and tok.token_to_id(text.UNK) == 1
    assert tok.encode("Dog", add_special_tokens=False).ids == tok.encode("dog", add_special_tokens=False).ids
    assert sha == text.sha256_of((wordnet.data_path / text.TOKENIZER_FILE).read_text())
    # Trained on the train split's texts: retraining on them gives this very file.
    again = text.train_tokenizer(records["train"]["text"])
    assert text.tokenizer_json(again) == (wordnet.data_path / text.TOKENIZER_FILE).read_text()


def test_training_the_tokenizer_twice_gives_byte_identical_json():
    texts = [s.text for s in text.by_split(text.read_synsets())["train"][:5000]]
    # (The trainer's own numbering of these texts' vocabulary differs between two trainings.)
    first, second = (text.tokenizer_json(text.train_tokenizer(texts, vocab_size=1000)) for _ in range(2))
    assert first == second and text.sha256_of(first) == text.sha256_of(second)


@pytest.fixture(scope="module")
def other_tokenizer_dir(wordnet, tmp_path_factory) -> str:
    """A data_dir holding the same prepared records but another tokenizer.json."""
    tmp_path = tmp_path_factory.mktemp("other_tokenizer")
    other = tmp_path / "other" / wordnet.data_path.relative_to(wordnet.data_dir_root)
    other.mkdir(parents=True)
    for f in wordnet.data_path.iterdir():
        if f.name != text.TOKENIZER_FILE:
            (other / f.name).symlink_to(f)
    changed = json.loads((wordnet.data_path / text.TOKENIZER_FILE).read_text())
    changed["model"]["max_input_chars_per_word"] = 99
    (other / text.TOKENIZER_FILE).write_text(json.dumps(changed))
    return str(tmp_path / "other")


def test_check_tokenizer_refuses_another_tokenizer_and_the_meta_holds_its_hash(data_dir, other_tokenizer_dir):
    _, sha = data.tokenizer_for(data_dir)
    assert data.check_tokenizer(sha, data_dir) == sha
    other = other_tokenizer_dir
    with pytest.raises(data.TokenizerMismatchError, match=f"recorded tokenizer sha256 {sha}.*{re.escape(other)}"):
        data.check_tokenizer(sha, other)
    # The checkpoint meta of a text run holds the hash (a run over another one is refused: the smoke test).
    config = _smoke_config(data_dir)
    info = data.dataset_info("wordnet")
    assert ckpt_lib.meta_for(config, info)["fields"]["tokenizer.sha256"] == sha
    config.dataset.data_dir = other
    assert ckpt_lib.meta_for(config, info)["fields"]["tokenizer.sha256"] != sha
    assert "tokenizer.sha256" not in ckpt_lib.meta_for(config, data.dataset_info("digits"))["fields"]


# ------------------------------------------------------------------------------------------ batches


def _bucket(n: int) -> int:
    return next(b for b in (16, 32, 64, 128) if n <= b)


def _stored_lengths(wordnet, split: str) -> np.ndarray:
    ds = wordnet.as_data_source(split=split)
    return np.asarray([r["length"] for r in ds.__getitems__(list(range(len(ds))))])


def test_a_train_batch_has_the_bucket_of_its_global_batch_longest_example_on_every_process(data_dir, wordnet):
    src = data.get_source("wordnet", "train[:600]", data_dir=data_dir)
    info = data.dataset_info("wordnet")
    lengths = _stored_lengths(wordnet, "train[:600]")
    whole = data.TrainLoader(src, info, global_batch_size=4, seed=3, prefetch=0)
    halves = [
        data.TrainLoader(src, info, global_batch_size=4, seed=3, process_index=p, process_count=2, prefetch=0)
        for p in (0, 1)
    ]
    seen, local_shorter = set(), 0
    for step in range(40):
        idx = whole.global_indices(step)
        batch, parts = next(whole), [next(h) for h in halves]
        want = _bucket(lengths[idx].max())
        assert batch["image"].shape == (4, want) and batch["image"].dtype == np.int32
        assert [p["image"].shape for p in parts] == [(2, want)] * 2
        assert np.array_equal(np.concatenate([p["image"] for p in parts]), batch["image"])
        full = np.stack([src[i]["image"] for i in idx])
        assert np.array_equal(batch["image"], full[:, :want]) and not full[:, want:].any()
        seen.add(want)
        local_shorter += any(_bucket(lengths[idx[2 * p : 2 * p + 2]].max()) < want for p in (0, 1))
    assert len(seen) >= 3 and local_shorter > 0  # buckets vary, and the global one was not the local one


def test_the_text_train_loader_resumes_from_its_state_with_the_same_batches(data_dir):
    src = data.load_in_memory(data.get_source("wordnet", "train[:600]", data_dir=data_dir))
    info = data.dataset_info("wordnet")
    a = data.TrainLoader(src, info, global_batch_size=8, seed=1, with_index=True)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    expected = [next(a) for _ in range(3)]
    b = data.TrainLoader(src, info, global_batch_size=8, seed=1, with_index=True)
    b.set_state(state)
    for want in expected:
        got = next(b)
        assert all(np.array_equal(got[k], want[k]) for k in ("image", "label", "index"))


def test_grouping_by_length_keeps_each_epoch_a_permutation_and_shrinks_the_buckets(data_dir, wordnet):
    """`group_by_length`: every epoch still uses each kept row exactly once (the same rows as without grouping),
    batches hold rows of similar length so their buckets shrink, the order depends on the seed and epoch, a
    resumed loader continues it, and two processes' rows concatenate to the global batch."""
    src = data.load_in_memory(data.get_source("wordnet", "train[:2048]", data_dir=data_dir))
    info = data.dataset_info("wordnet")
    lengths = _stored_lengths(wordnet, "train[:2048]")

    def loader(group, seed=1, **kw):
        return data.TrainLoader(src, info, global_batch_size=32, seed=seed, group_by_length=group, prefetch=0, **kw)

    plain, grouped = loader(0), loader(16)
    steps = plain.steps_per_epoch  # 64
    for epoch in range(2):
        a = [plain.global_indices(epoch * steps + k) for k in range(steps)]
        b = [grouped.global_indices(epoch * steps + k) for k in range(steps)]
        assert sorted(np.concatenate(b).tolist()) == sorted(np.concatenate(a).tolist())  # same rows, once each
        assert len(set(np.concatenate(b).tolist())) == steps * 32
    spread = [np.ptp(lengths[grouped.global_indices(k)]) for k in range(steps)]
    plain_spread = [np.ptp(lengths[plain.global_indices(k)]) for k in range(steps)]
    assert np.mean(spread) < 0.25 * np.mean(plain_spread), (np.mean(spread), np.mean(plain_spread))
    widths = [next(grouped)["image"].shape[1] for _ in range(steps)]
    plain_widths = [next(plain)["image"].shape[1] for _ in range(steps)]
    assert np.mean(widths) < 0.75 * np.mean(plain_widths), (np.mean(widths), np.mean(plain_widths))
    # The batches are in a random order, not shortest first, and the order changes with the epoch and seed.
    first = [lengths[grouped.global_indices(k)].max() for k in range(steps)]
    assert first != sorted(first)
    assert not np.array_equal(grouped.global_indices(0), grouped.global_indices(steps))
    assert not np.array_equal(grouped.global_indices(0), loader(16, seed=2).global_indices(0))
    # Resumed mid-epoch 1, and split over two processes: the same rows.
    state = grouped.get_state()
    want = [grouped.global_indices(state["step"] + k) for k in range(3)]
    resumed = loader(16, with_index=True)
    resumed.set_state(state)
    halves = [loader(16, process_index=p, process_count=2, with_index=True) for p in (0, 1)]
    for h in halves:
        h.set_state(state)
    for k in range(3):
        assert np.array_equal(next(resumed)["index"], want[k])
        assert np.array_equal(np.concatenate([next(h)["index"] for h in halves]), want[k])


def test_grouping_by_length_is_refused_for_images():
    src = data.ArraySource(np.zeros((64, 28, 28, 1), np.uint8), np.zeros(64, np.int32))
    with pytest.raises(ValueError, match="group_by_length applies to text datasets"):
        data.TrainLoader(src, data.dataset_info("fashion_mnist"), global_batch_size=8, group_by_length=4)


def test_eval_batches_are_cut_to_the_bucket_of_the_global_batch(data_dir, wordnet):
    src = data.get_source("wordnet", "test[:100]", data_dir=data_dir)
    info = data.dataset_info("wordnet")
    lengths = _stored_lengths(wordnet, "test[:100]")
    whole = list(data.eval_batches(src, info, global_batch_size=8))
    halves = [list(data.eval_batches(src, info, global_batch_size=8, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(whole) == 13 and sum(int(b["mask"].sum()) for b in whole) == 100
    for k, batch in enumerate(whole):
        want = _bucket(lengths[8 * k : 8 * k + 8].max())
        assert batch["image"].shape == (8, want)
        assert [h[k]["image"].shape for h in halves] == [(4, want)] * 2
        assert np.array_equal(np.concatenate([h[k]["image"] for h in halves]), batch["image"])
    assert not whole[-1]["image"][4:].any() and whole[-1]["mask"].tolist() == [True] * 4 + [False] * 4


def test_eval_batches_by_length_read_every_row_once_at_shorter_buckets_and_evaluate_alike(data_dir, wordnet):
    """`by_length`: the same rows and labels, each once, sorted by length, so the buckets shrink; the trainer's
    evaluation (sums only) reads a text split this way and gives the accuracy of the split's order."""
    from titans.train import steps

    src = data.get_source("wordnet", "test[:300]", data_dir=data_dir)
    info = data.dataset_info("wordnet")
    lengths = _stored_lengths(wordnet, "test[:300]")
    plain = list(data.eval_batches(src, info, global_batch_size=32))
    sorted_ = list(data.eval_batches(src, info, global_batch_size=32, by_length=True))
    assert len(plain) == len(sorted_) and sum(int(b["mask"].sum()) for b in sorted_) == 300

    def rows(batches):
        return sorted(
            (tuple(np.trim_zeros(r, "b")), int(y)) for b in batches for r, y, m in zip(*b.values(), strict=True) if m
        )

    assert rows(sorted_) == rows(plain)
    got_lengths = [int(n) for b in sorted_ for n, m in zip((b["image"] != 0).sum(1), b["mask"], strict=True) if m]
    assert got_lengths == sorted(lengths.tolist())
    assert sum(b["image"].shape[1] for b in sorted_) < 0.75 * sum(b["image"].shape[1] for b in plain)

    # The trainer's evaluation asks for it.
    class Seen(Exception):
        pass

    def spy(*args, **kwargs):
        raise Seen(kwargs)

    with unittest.mock.patch.object(steps.data_lib, "eval_batches", spy), pytest.raises(Seen) as seen:
        steps.evaluate(None, None, None, None, src, info, batch_size=32, mesh=None)
    assert seen.value.args[0]["by_length"] is True


def test_bucket_length():
    assert text.bucket_length(np.zeros((3, 128), np.int32)) == 16
    rows = np.zeros((2, 128), np.int32)
    rows[1, :33] = 5
    assert text.bucket_length(rows) == 64 and text.bucket_length(rows[:1]) == 16
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        text.bucket_length(np.ones((1, 129), np.int32))


# ------------------------------------------------------------------------------------------ missing files


def test_missing_wordnet_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_WORDNET_DIR", str(tmp_path / "none"))
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install wordnet-base"):
        data.get_source("wordnet", "train", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(text.WordNetNotFoundError, match="apt-get install wordnet-base"):
        text.read_synsets()


@pytest.mark.slow
def test_the_tfidf_reference_command_exits_2_naming_the_package_without_the_files(tmp_path):
    env = {**os.environ, "TITANS_WORDNET_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "titans.data.tfidf_reference"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "apt-get install wordnet-base" in proc.stderr
    s = text.parse_line(ADJ_LINE, "a")
    assert tfidf.reference_text(s) == "abaxial : " + s.gloss


# ------------------------------------------------------------------------------------------ training


def _smoke_config(data_dir):
    config = load_config_file(str(ROOT / "configs" / "wordnet_smoke.py"))
    config.dataset.data_dir = data_dir
    return config


@pytest.mark.slow
def test_the_smoke_config_trains_and_its_run_is_refused_under_another_tokenizer(
    data_dir, other_tokenizer_dir, tmp_path
):
    workdir = tmp_path / "run"
    result = train_and_evaluate(_smoke_config(data_dir), str(workdir))
    assert result["num_examples"] == 1000 and result["dataset"] == "wordnet"
    assert result["accuracy"] > 0.25  # about 0.40; the largest class (noun.act) is 12% of validation
    # The finished run loads back (its tokenizer checked) and its tokens reach the model unnormalised.
    model, _, info, _ = runs.load_model(str(workdir))
    batch = next(iter(data.eval_batches(data.get_source("wordnet", "validation[:8]", data_dir=data_dir), info, 8)))
    assert np.array_equal(np.asarray(model.normalize(batch["image"])), batch["image"])
    np.testing.assert_allclose(model.logits(batch["image"]), model.module()(batch["image"]), rtol=1e-6)
    # The same run read over a data_dir with another tokenizer is refused, naming the tokenizer.
    config = json.loads((workdir / "config.json").read_text())
    config["dataset"]["data_dir"] = other_tokenizer_dir
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="tokenizer.sha256: checkpoint has"):
        runs.load_model(str(workdir))


_TRACED_WIDTHS = []


def _traced_logits(model, tokens):
    _TRACED_WIDTHS.append(tokens.shape[1])  # runs once per compiled shape
    return model(tokens)


def test_a_text_split_predicts_in_length_order_at_its_buckets_and_in_row_order(data_dir):
    """`runs.split_arrays` gives a text split as one (N, 128) array; `runs.predict` runs it sorted by length
    with each batch cut to its bucket (a program per bucket, not one at 128) and returns the rows' outputs
    in the split's order, equal to the model on each full-width row."""
    info = data.dataset_info("wordnet")
    tokens, labels = runs.split_arrays(data.get_source("wordnet", "validation[:300]", data_dir=data_dir), info)
    assert tokens.shape == (300, 128) and tokens.dtype == np.int32 and len(labels) == 300
    model_cfg = config_lib.base_config().model
    model_cfg.name = "text_cnn"
    model = models.build_model(model_cfg, info, seed=0)
    model.eval()
    _TRACED_WIDTHS.clear()
    got = runs.predict(_traced_logits, model, tokens, batch_size=64)
    assert min(_TRACED_WIDTHS) <= 32 and len(set(_TRACED_WIDTHS)) >= 2, _TRACED_WIDTHS
    want = np.concatenate([np.asarray(model(tokens[a : a + 100])) for a in range(0, 300, 100)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_teacher_config_validates_and_builds_a_transformer():
    """configs/wordnet_teacher.py is a valid run config whose model is the Transformer encoder, built with the
    dataset's vocabulary and its 128 positions (no data needed)."""
    config = config_lib.validate(load_config_file(str(ROOT / "configs" / "wordnet_teacher.py")))
    info = data.dataset_info("wordnet")
    model = nnx.eval_shape(lambda: models.build_model(config.model, info, seed=0))
    assert config.model.name == "transformer" and models.modality(config.model.name) == "text"
    assert models.param_count(model) > 1_000_000
