"""Tests of titans.data: sources, TrainLoader order/state/multi-host layout, eval, transforms."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking as tfds_mocking

from titans import data
from titans.data import augment, builders, prepare

FMNIST_RAW = builders.fmnist_raw_dir()
needs_fmnist = pytest.mark.skipif(
    not builders.fmnist_raw_available(), reason=f"no Fashion-MNIST IDX files in {FMNIST_RAW}"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_train(data_dir):
    return data.get_source("digits", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def digits_test(data_dir):
    return data.get_source("digits", "test", data_dir=data_dir)


def _fake_source(n=200, shape=(32, 32, 3), num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return data.ArraySource(images, rng.integers(0, num_classes, size=n))


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@contextlib.contextmanager
def mock_tfds(num_examples):
    """`tfds.testing.mock_data` for `tfds.data_source`, with its `__getitems__` mended.

    tfds 4.9.10's mock installs `__getitems__` as a plain attribute of a MagicMock, so it is
    called without `self` and fails with "_getitems() missing ... 'record_keys'";
    `__getitem__` (a real magic method on the mock) is fine.
    """

    def getitems(record_keys, generator, serialized=False):
        assert not serialized
        return [generator[k] for k in record_keys]

    with (
        tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds_mocking, "_getitems", getitems),
    ):
        yield


# ------------------------------------------------------------------------------ info


def test_dataset_info():
    for name in data.DATASETS:
        info = data.dataset_info(name)
        assert info.name == name
        if info.modality == "text":  # token ids: a vocabulary, no pixel statistics
            assert info.vocab_size > 0 and not info.mean and not info.std and len(info.image_shape) == 1
            continue
        assert len(info.mean) == len(info.std) == info.image_shape[-1]
        assert all(0 < m < 255 and 0 < s < 255 for m, s in zip(info.mean, info.std))
        assert info.augment in ("none", "crop_flip", "imagenet")
    assert data.dataset_info("cifar100").num_classes == 100
    assert data.dataset_info("fashion_mnist").splits == {"train": 60000, "test": 10000}
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.dataset_info("mnist")


# --------------------------------------------------------------------------- sources


def test_digits_prepare_shapes_and_splits(digits_train, digits_test):
    info = data.dataset_info("digits")
    assert (len(digits_train), len(digits_test)) == (1437, 360) == tuple(info.splits.values())
    ex = digits_train[0]
    assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
    assert isinstance(ex["label"], int)
    batch = digits_train.__getitems__(range(len(digits_train)))
    images = np.stack([e["image"] for e in batch])
    labels = np.array([e["label"] for e in batch])
    assert images.min() == 0 and images.max() == 255
    assert set(labels) == set(range(10))
    # Stored in the fixed-permutation order of the builder (no TFDS shuffling).
    want_images, want_labels = builders.digits_arrays("train")
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    # Train and test are disjoint parts of the 1797 examples.
    test_images = np.stack([e["image"] for e in digits_test.__getitems__(range(360))])
    all_images = {im.tobytes() for im in images} | {im.tobytes() for im in test_images}
    assert len(all_images) >= 1797 - 20  # load_digits has a few duplicate images


def test_digits_mean_std_match_info(digits_train):
    images = np.stack([e["image"] for e in digits_train.__getitems__(range(len(digits_train)))])
    info = data.dataset_info("digits")
    np.testing.assert_allclose(images.mean(), info.mean[0], atol=0.01)
    np.testing.assert_allclose(images.std(), info.std[0], atol=0.01)


def test_slicing_syntax(data_dir, digits_train):
    head = data.get_source("digits", "train[:90%]", data_dir=data_dir)
    tail = data.get_source("digits", "train[90%:]", data_dir=data_dir)
    assert len(head) + len(tail) == len(digits_train) and len(tail) == 144
    got = [e["label"] for e in head.__getitems__(range(len(head)))]
    got += [e["label"] for e in tail.__getitems__(range(len(tail)))]
    assert got == [e["label"] for e in digits_train.__getitems__(range(len(digits_train)))]
    np.testing.assert_array_equal(tail[0]["image"], digits_train[len(head)]["image"])
    assert len(data.get_source("digits", "test[:10]", data_dir=data_dir)) == 10


@needs_fmnist
def test_fashion_mnist_offline(data_dir):
    train = data.get_source("fashion_mnist", "train", data_dir=data_dir)
    test = data.get_source("fashion_mnist", "test", data_dir=data_dir)
    assert (len(train), len(test)) == (60000, 10000)
    assert os.path.isdir(os.path.join(data_dir, "fashion_mnist_offline"))
    ex = train[0]
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
    with gzip.open(os.path.join(FMNIST_RAW, "train-labels-idx1-ubyte.gz")) as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(os.path.join(FMNIST_RAW, "train-images-idx3-ubyte.gz")) as f:
        first_image = np.frombuffer(f.read(16 + 784), np.uint8, offset=16).reshape(28, 28, 1)
    assert ex["label"] == raw_labels[0]
    np.testing.assert_array_equal(ex["image"], first_image)
    labels = np.array([e["label"] for s in range(0, 60000, 6000) for e in train.__getitems__(range(s, s + 6000))])
    np.testing.assert_array_equal(labels, raw_labels)
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert {e["label"] for e in test.__getitems__(range(0, 10000, 7))} <= set(range(10))


def test_missing_cifar10_raises(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_source("cifar10", "train", data_dir=str(tmp_path))
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert "cifar10" in msg and str(tmp_path) in msg
    assert f"python -m titans.data.prepare cifar10 --data_dir={tmp_path}" in msg
    with pytest.raises(data.DatasetNotFoundError, match="manual_dir"):
        data.get_source("imagenet2012", "validation", data_dir=str(tmp_path))


def test_prepare_cli(tmp_path):
    prepare.main(["digits", f"--data_dir={tmp_path}"])
    assert len(data.get_source("digits", "test", data_dir=str(tmp_path))) == 360
    if "tensorflow" not in sys.modules and not _tf_installed():
        with pytest.raises(SystemExit, match="requirements-tf.txt"):
            prepare.prepare("cifar10", str(tmp_path))


def _tf_installed():
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


# ----------------------------------------------------------------------- TrainLoader


def test_loader_batches_and_determinism(digits_train):
    info = data.dataset_info("digits")
    a = data.TrainLoader(digits_train, info, global_batch_size=64, seed=3)
    b = data.TrainLoader(digits_train, info, global_batch_size=64, seed=3)
    c = data.TrainLoader(digits_train, info, global_batch_size=64, seed=4)
    batches = _take(a, 3)
    assert batches[0]["image"].shape == (64, 8, 8, 1) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].shape == (64,) and batches[0]["label"].dtype == np.int32
    _assert_batches_equal(batches, _take(b, 3))
    assert not np.array_equal(batches[0]["label"], next(c)["label"])
    # Rows are the examples of global_indices(step), in order.
    idx = a.global_indices(1)
    want = digits_train.__getitems__(idx.tolist())
    np.testing.assert_array_equal(batches[1]["image"], np.stack([e["image"] for e in want]))
    assert batches[1]["label"].tolist() == [e["label"] for e in want]


def test_epochs_reshuffle_and_cover_every_example_once(digits_train):
    info = data.dataset_info("digits")
    loader = data.TrainLoader(digits_train, info, global_batch_size=100, seed=0)
    spe = loader.steps_per_epoch
    assert spe == 14  # 1437 // 100: the last partial batch of each epoch is dropped
    epochs = [np.concatenate([loader.global_indices(e * spe + k) for k in range(spe)]) for e in range(3)]
    for order in epochs:
        assert len(np.unique(order)) == len(order) == 1400
        assert order.min() >= 0 and order.max() < 1437
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # With a batch that divides the split, an epoch is exactly a permutation of it.
    small = data.TrainLoader(
        data.ArraySource(np.zeros((12, 8, 8, 1), np.uint8), np.arange(12)), info, global_batch_size=4, seed=1
    )
    for e in range(3):
        labels = np.concatenate([next(small)["label"] for _ in range(3)])
        assert sorted(labels.tolist()) == list(range(12))


@pytest.mark.parametrize("augment_on", [False, True])
def test_two_processes_split_the_global_batch(augment_on):
    src, info = _fake_source(), data.dataset_info("cifar10")
    kw = dict(global_batch_size=32, seed=7, augment=augment_on)
    single = data.TrainLoader(src, info, **kw)
    halves = [data.TrainLoader(src, info, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(8):  # 6 steps per epoch: crosses an epoch boundary
        whole = next(single)
        parts = [next(h) for h in halves]
        assert parts[0]["image"].shape == (16, 32, 32, 3)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_resume_exactly_from_state(digits_train):
    info = data.dataset_info("digits")
    kw = dict(global_batch_size=128, seed=5)
    reference = _take(data.TrainLoader(digits_train, info, **kw), 16)  # 11 steps per epoch

    loader = data.TrainLoader(digits_train, info, prefetch=3, **kw)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.get_state()))
    assert state["step"] == 7 and state["seed"] == 5
    _take(loader, 2)  # run on (and prefetch) past the saved state

    resumed = data.TrainLoader(digits_train, info, global_batch_size=128, seed=999)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 9), reference[7:16])  # across the epoch boundary

    loader.set_state(state)  # rewinding a loader that has prefetched ahead
    _assert_batches_equal(_take(loader, 2), reference[7:9])

    # Global order does not depend on process count, so a state resumes on 2 processes.
    halves = [data.TrainLoader(digits_train, info, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for h in halves:
        h.set_state(state)
    parts = [_take(h, 5) for h in halves]
    for k in range(5):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["image"], parts[1][k]["image"]]),
            reference[7 + k]["image"],
        )

    with pytest.raises(ValueError, match="global_batch_size"):
        data.TrainLoader(digits_train, info, global_batch_size=64, seed=5).set_state(state)


def test_loader_rejects_bad_layout(digits_train):
    info = data.dataset_info("digits")
    with pytest.raises(ValueError):
        data.TrainLoader(digits_train, info, global_batch_size=30, process_count=4)
    with pytest.raises(ValueError):
        data.TrainLoader(digits_train, info, global_batch_size=2048)


# ------------------------------------------------------------------------- eval_batches


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_each_example_once(digits_test, process_count):
    info = data.dataset_info("digits")
    per_process = [
        list(data.eval_batches(digits_test, info, global_batch_size=64, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert all(len(b) == 6 for b in per_process)  # ceil(360 / 64), the same on every process
    images, labels = [], []
    for step in range(6):
        for p in range(process_count):
            batch = per_process[p][step]
            assert batch["image"].shape == (64 // process_count, 8, 8, 1)
            assert batch["mask"].dtype == bool
            images.append(batch["image"][batch["mask"]])
            labels.append(batch["label"][batch["mask"]])
            assert not batch["image"][~batch["mask"]].any()
    want = digits_test.__getitems__(range(360))
    np.testing.assert_array_equal(np.concatenate(images), np.stack([e["image"] for e in want]))
    assert np.concatenate(labels).tolist() == [e["label"] for e in want]
    assert sum(int(b["mask"].sum()) for bs in per_process for b in bs) == 360


# ------------------------------------------------------------------------- augmentation


def test_crop_flip_moves_pixels_and_keeps_shape():
    x = np.random.default_rng(0).integers(1, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    flip_only = {"dy": np.full(4, 4), "dx": np.full(4, 4), "flip": np.ones(4, bool)}
    np.testing.assert_array_equal(augment.crop_flip(x, flip_only), x[:, :, ::-1])
    shift = {"dy": np.zeros(4, int), "dx": np.full(4, 8), "flip": np.zeros(4, bool)}
    out = augment.crop_flip(x, shift)  # 4 zero rows on top, image shifted down and left
    assert out.shape == x.shape
    assert not out[:, :4].any()
    np.testing.assert_array_equal(out[:, 4:, :28], x[:, :28, 4:])
    assert not out[:, :, 28:].any()

    src, info = _fake_source(), data.dataset_info("cifar10")
    plain = next(data.TrainLoader(src, info, global_batch_size=64, seed=1, augment=False))
    aug = next(data.TrainLoader(src, info, global_batch_size=64, seed=1))
    assert aug["image"].shape == plain["image"].shape == (64, 32, 32, 3)
    np.testing.assert_array_equal(aug["label"], plain["label"])
    changed = (aug["image"] != plain["image"]).any(axis=(1, 2, 3))
    assert changed.mean() > 0.8  # only dy=dx=4 without flip (1/162) leaves an image as is


def test_imagenet_transforms():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=s, dtype=np.uint8)
        for s in [(300, 400, 3), (7, 45, 3), (50, 5, 3), (64, 64), (64, 64, 1)]
    ]
    params = augment.random_resized_crop_params(rng, len(images))
    for i, im in enumerate(images):
        assert augment.imagenet_train_one(im, params, i).shape == (224, 224, 3)
        assert augment.imagenet_eval_one(im).shape == (224, 224, 3)
    flat = np.full((256, 512, 3), 9, np.uint8)
    flat[:, 128:384] = 200  # the centre square survives resize-256 + centre-crop-224
    out = augment.imagenet_eval_one(flat)
    assert (out == 200).all()


# -------------------------------------------------------------- TFDS-built datasets, mocked


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_tfds_mock(tmp_path, name, num_classes):
    info = data.dataset_info(name)
    with mock_tfds(num_examples=96):
        src = data.get_source(name, "train", data_dir=str(tmp_path))
        test = data.get_source(name, "test", data_dir=str(tmp_path))
        assert len(src) == 96
        loader = data.TrainLoader(src, info, global_batch_size=32, seed=0)
        batches = _take(loader, 4)
        evals = list(data.eval_batches(test, info, global_batch_size=40))
    for b in batches:
        assert b["image"].shape == (32, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and b["label"].min() >= 0 and b["label"].max() < num_classes
    assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 96
    assert evals[0]["image"].shape == (40, 32, 32, 3)


def test_imagenet_through_tfds_mock(tmp_path):
    info = data.dataset_info("imagenet2012")
    with mock_tfds(num_examples=24):
        train = data.get_source("imagenet2012", "train", data_dir=str(tmp_path))
        val = data.get_source("imagenet2012", "validation", data_dir=str(tmp_path))
        shapes = {train[i]["image"].shape for i in range(8)}
        assert len(shapes) > 1  # variable-size images, as stored
        batch = next(data.TrainLoader(train, info, global_batch_size=8, seed=0))
        evals = list(data.eval_batches(val, info, global_batch_size=16, process_index=1, process_count=2))
    assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].max() < 1000
    assert [int(b["mask"].sum()) for b in evals] == [8, 0]
    assert evals[0]["image"].shape == (8, 224, 224, 3)


# ---------------------------------------------------------------------------- normalize


def test_normalize_under_jit():
    import jax
    import jax.numpy as jnp

    info = data.dataset_info("cifar10")
    x = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    y = jax.jit(lambda im: data.normalize(im, info))(x)
    want = (x.astype(np.float32) - np.array(info.mean)) / np.array(info.std)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert data.normalize(x, info, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_tensorflow_never_imported():
    assert "tensorflow" not in sys.modules


def test_neighbouring_seeds_do_not_replay_each_other(digits_train):
    # grain seeds epoch e with seed + e; the loader hashes its seed so that seed 1's first
    # epoch is not seed 0's second.
    info = data.dataset_info("digits")
    a = data.TrainLoader(digits_train, info, global_batch_size=100, seed=0)
    b = data.TrainLoader(digits_train, info, global_batch_size=100, seed=1)
    assert not np.array_equal(a.global_indices(a.steps_per_epoch), b.global_indices(0))


def test_in_memory_source_gives_the_same_batches(digits_train):
    info = data.dataset_info("digits")
    mem = data.load_in_memory(digits_train, chunk=500)
    assert len(mem) == len(digits_train) and mem[3]["label"] == digits_train[3]["label"]
    kw = dict(global_batch_size=64, seed=2)
    _assert_batches_equal(
        _take(data.TrainLoader(mem, info, **kw), 3), _take(data.TrainLoader(digits_train, info, **kw), 3)
    )


def test_a_split_read_into_memory_is_read_once_per_process(data_dir, monkeypatch):
    """The quickstart's two stages run in one process: the second gets the first's arrays, not a second
    pass over the records; another split is read anew and replaces it."""
    from titans.data import sources

    monkeypatch.setattr(sources, "_resident", {})
    reads = []
    real = sources._read_all
    monkeypatch.setattr(
        sources, "_read_all", lambda src, chunk: reads.append(getattr(src, "split", "arrays")) or real(src, chunk)
    )
    first = data.load_in_memory(data.get_source("digits", "train[:50%]", data_dir=data_dir))
    again = data.load_in_memory(data.get_source("digits", "train[:50%]", data_dir=data_dir))
    assert again is first and reads == ["train[:50%]"]
    with pytest.raises(ValueError, match="read-only"):  # shared between stages: nobody may write into it
        first.images[0, 0, 0, 0] = 1
    other = data.load_in_memory(data.get_source("digits", "train[50%:]", data_dir=data_dir))
    assert reads == ["train[:50%]", "train[50%:]"] and len(other) + len(first) == len(
        data.get_source("digits", "train", data_dir=data_dir)
    )
    assert list(sources._resident) == [("digits", "train[50%:]", data_dir, len(other))]
    # an array source (no data_dir) is never kept
    data.load_in_memory(data.ArraySource(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64)))
    assert len(reads) == 3 and len(sources._resident) == 1


def test_fashion_mnist_without_raw_files_or_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_FMNIST_DIR", str(tmp_path / "no-idx-files"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_source("fashion_mnist", "train", data_dir=str(tmp_path / "tfds"))
    msg = str(e.value)
    assert "python -m titans.data.prepare fashion_mnist" in msg and "TITANS_FMNIST_DIR" in msg


def test_augmentation_override_reaches_the_loader(digits_train):
    """dataset.augmentation='crop_flip' augments a dataset whose own transform is 'none' (digits):
    the loader's images then differ from the stored ones for the same example indices; without the
    override they are the stored images exactly."""
    info = data.dataset_info("digits")
    assert info.augment == "none"
    stored = np.stack([e["image"] for e in digits_train.__getitems__(range(len(digits_train)))])
    plain = data.TrainLoader(digits_train, info, global_batch_size=64, seed=3, with_index=True)
    flipped = data.TrainLoader(
        digits_train, info, global_batch_size=64, seed=3, with_index=True, augmentation="crop_flip"
    )
    a, b = next(plain), next(flipped)
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], stored[a["index"]])
    assert np.mean(np.any(b["image"] != stored[b["index"]], axis=(1, 2, 3))) > 0.5
    plain.close()
    flipped.close()


@pytest.mark.parametrize(
    "a, b, shared",
    [
        ("train", "train[90%:]", 144),
        ("train[:90%]", "train[90%:]", 0),
        ("train[:80%]", "train[60%:]", 288),
        ("train", "test", 0),
        ("train[:100]+test", "test[:10]", 10),
        ("train[10:20]", "train[15:40]", 5),
    ],
)
def test_split_overlap_known_answers(a, b, shared):
    """Shared examples of two split specs, worked out by hand for digits (1437 train, 360 test; TFDS
    rounds percent boundaries to the closest example: 90% -> 1293, 80% -> 1150, 60% -> 862)."""
    info = data.dataset_info("digits")
    assert data.overlap(info, a, b) == shared == data.overlap(info, b, a)


@pytest.mark.parametrize("augmentation", ["none", "crop_flip"])
def test_in_memory_gather_gives_the_same_batches_with_augmentation(digits_train, augmentation):
    """The trainer's in-memory copy of a split (`ArraySource.take`, one gather a batch) yields exactly the
    batches of the TFDS source it was read from, with and without augmentation, indices included."""
    info = data.dataset_info("digits")
    mem = data.load_in_memory(digits_train)
    kwargs = dict(global_batch_size=32, seed=3, augmentation=augmentation, with_index=True)
    a, b = data.TrainLoader(digits_train, info, **kwargs), data.TrainLoader(mem, info, **kwargs)
    for _ in range(50):  # past an epoch of 1,437 rows
        x, y = next(a), next(b)
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(x[key], y[key])
            assert x[key].dtype == y[key].dtype


def test_trainer_reads_small_splits_into_memory(data_dir, digits_train):
    """dataset.in_memory: "auto" and "always" train from RAM for a small fixed-shape split, "never" from
    TFDS; a bad value names the choices."""
    import types

    from helpers import digits_config

    from titans import config as config_lib
    from titans.train import trainer

    info = data.dataset_info("digits")
    for mode, in_ram in (("auto", True), ("always", True), ("never", False)):
        c = digits_config(data_dir, **{"dataset.in_memory": mode})
        src = trainer._training_source(types.SimpleNamespace(config=c, info=info, train_src=digits_train))
        assert isinstance(src, data.ArraySource) == in_ram and len(src) == len(digits_train)
    c = digits_config(data_dir, **{"dataset.in_memory": "sometimes"})
    with pytest.raises(config_lib.ConfigError, match="in_memory"):
        config_lib.validate(c)
