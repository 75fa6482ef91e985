"""Random-access sources: `get_source(name, split)` over TFDS ArrayRecord data, without TF.

Every dataset is read with `builder.as_data_source` (ArrayRecord). `digits`, `wordnet` (from Debian's
`wordnet-base` files, `text.py`) and, when the raw IDX files are on disk, `fashion_mnist` are prepared on
first use by our own builders (`builders.py`, `text.py`); the others must have been prepared beforehand with
`python -m titans.data.prepare NAME --data_dir=DIR` (which needs TensorFlow), and a missing
one raises `DatasetNotFoundError` naming that command.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import types
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from titans.data import builders, speech, text
from titans.data.info import DATASETS


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not prepared (as ArrayRecord) in the data_dir searched."""


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_command(name: str, data_dir: str) -> str:
    return f"python -m titans.data.prepare {name} --data_dir={data_dir}"


class Source:
    """A TFDS data source reduced to {'image': uint8 HWC array, 'label': int} examples.

    `__getitems__` fetches a whole batch in one call to the underlying ArrayRecord reader,
    which is several times faster than one `__getitem__` per example.
    """

    def __init__(
        self, data_source, *, name: str, split: str, data_dir: str | None = None, image_key="image", label_key="label"
    ):
        self._ds = data_source
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self._image_key = image_key
        self._label_key = label_key

    def _convert(self, ex) -> dict:
        return {"image": np.asarray(ex[self._image_key]), "label": int(ex[self._label_key])}

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._convert(self._ds[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        keys = [int(i) for i in indices]
        if not keys:
            return []
        getitems = getattr(self._ds, "__getitems__", None)
        records = getitems(keys) if getitems else [self._ds[k] for k in keys]
        return [self._convert(r) for r in records]

    def __repr__(self) -> str:
        return f"Source(name={self.name!r}, split={self.split!r}, num_examples={len(self)})"


class ArraySource:
    """In-memory source over (images uint8 (N, H, W, C), labels (N,)) with the `Source`
    interface: for synthetic data and tests."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.name = np.asarray(images), np.asarray(labels), name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> dict:
        index = int(index)
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]

    def take(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` as arrays: (uint8 images (n, H, W, C), int32 labels (n,)), one gather each."""
        idx = np.asarray(indices, np.int64)
        return self.images[idx], self.labels[idx].astype(np.int32)


# The split read last by load_in_memory, kept for the next stage of the same process (one split at most).
_resident: dict[tuple, ArraySource] = {}


def load_in_memory(src, chunk: int = 4096) -> ArraySource:
    """Reads a fixed-shape source completely into an `ArraySource` (one sequential pass).

    Worth it for small datasets read for many epochs (Fashion-MNIST: 47 MB, CIFAR: 150 MB),
    where TFDS's per-record deserialisation is the pipeline's main cost (4.4 s for Fashion-MNIST's
    60,000 training images on this project's 2-core machine).

    A TFDS `Source` read last is kept (its arrays read-only) and returned again for the same dataset,
    split and data_dir, so that a pipeline's stages in one process (the quickstart's teacher and student)
    read it once. Only the most recent split is kept; a prepared TFDS split does not change on disk.
    """
    key = (src.name, src.split, src.data_dir, len(src)) if isinstance(src, Source) and src.data_dir else None
    if key is not None and key in _resident:
        return _resident[key]
    arrays = _read_all(src, chunk)
    if key is not None:
        arrays.images.flags.writeable = False
        arrays.labels.flags.writeable = False
        _resident.clear()
        _resident[key] = arrays
    return arrays


def _read_all(src, chunk: int) -> ArraySource:
    n = len(src)
    images, labels = [], []
    for start in range(0, n, chunk):
        examples = src.__getitems__(range(start, min(start + chunk, n)))
        images.append(np.stack([e["image"] for e in examples]))
        labels.append(np.fromiter((e["label"] for e in examples), np.int64, len(examples)))
    return ArraySource(np.concatenate(images), np.concatenate(labels), name=getattr(src, "name", "arrays"))


@contextlib.contextmanager
def _prepare_lock(data_dir: str, builder_name: str):
    """Serialises auto-preparation between processes sharing a data_dir (e.g. several hosts
    started on one machine), so that they do not all write the same dataset at once."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".titans-prepare-{builder_name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _auto_prepared_builder(builder_cls, data_dir: str, manual_dir: str | None = None):
    """Returns `builder_cls` over data_dir, preparing it (ArrayRecord) if it is not yet."""
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with _prepare_lock(data_dir, builder.name):
        # Rebuilt under the lock: another process may have prepared it meanwhile, and a
        # builder only reads dataset_info.json when it is constructed.
        builder = builder_cls(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
            builder.download_and_prepare(download_config=config)
            builder = builder_cls(data_dir=data_dir, file_format="array_record")
    return builder


def _not_found(name: str, tfds_name: str, data_dir: str, split: str, why: str = "") -> DatasetNotFoundError:
    lines = [
        f"Dataset {name!r} (TFDS {tfds_name!r}, split {split!r}) is not prepared as ArrayRecord "
        f"in data_dir {data_dir!r}.{(' ' + why) if why else ''}",
        f"Prepare it with:  {prepare_command(name, data_dir)}",
        "(preparing TFDS's own builders needs TensorFlow: pip install -r requirements-tf.txt)",
    ]
    if name == "imagenet2012":
        lines.append(
            "imagenet2012 cannot be downloaded: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in a directory and add --manual_dir=THAT_DIR "
            f"(default {os.path.join(data_dir, 'downloads', 'manual')})."
        )
    if name == "fashion_mnist":
        lines.append(
            "Or, without TensorFlow: `apt-get install dataset-fashion-mnist` (or point "
            "$TITANS_FMNIST_DIR at the four gzip'd IDX files) and it is prepared on first use."
        )
    return DatasetNotFoundError("\n".join(lines))


def _tfds_data_source(name: str, tfds_name: str, split: str, data_dir: str):
    """`as_data_source` of TFDS's registered builder, with a clear error when it is missing.

    Readiness is judged from the failure rather than checked up front, so that
    `tfds.testing.mock_data` (which fakes `as_data_source` but not the files) works too.
    """
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    try:
        return builder.as_data_source(split=split)
    except Exception as e:
        if not builder.is_prepared():
            raise _not_found(name, tfds_name, data_dir, split) from e
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise _not_found(
                name,
                tfds_name,
                data_dir,
                split,
                why=f"It is prepared there as {sorted(formats)}, which tfds.data_source cannot "
                "read; prepare it as array_record into another data_dir (one data_dir holds one "
                "format).",
            ) from e
        raise


def get_source(name: str, split: str, data_dir: str | None = None) -> Source:
    """Random-access source of `name`'s `split` (TFDS slicing syntax, e.g. 'train[:90%]').

    `data_dir` defaults to `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    data_dir = os.path.expanduser(os.fspath(data_dir or default_data_dir()))
    if name == "digits":
        ds = _auto_prepared_builder(builders.TitansDigits, data_dir).as_data_source(split=split)
    elif name == "fashion_mnist":
        ds = _fashion_mnist(split, data_dir)
    elif name == "speech_commands":
        ds = _speech_commands(split, data_dir)
    elif name == "wordnet":
        return Source(
            _wordnet(data_dir).as_data_source(split=split),
            name=name,
            split=split,
            data_dir=data_dir,
            image_key="tokens",
        )
    else:
        ds = _tfds_data_source(name, name, split, data_dir)
    return Source(ds, name=name, split=split, data_dir=data_dir)


def _wordnet(data_dir: str):
    """The `titans_wordnet` builder over data_dir, prepared from the WordNet files on first use."""
    builder = text.TitansWordnet(data_dir=data_dir, file_format="array_record")
    if not (builder.is_prepared() or text.wordnet_available()):
        raise DatasetNotFoundError(
            f"Dataset 'wordnet' (Titans' builder 'titans_wordnet') is not prepared in data_dir {data_dir!r}. "
            + text.missing_message(text.wordnet_dir())
            + f" It is then prepared on first use, or with: {prepare_command('wordnet', data_dir)}"
        )
    return _auto_prepared_builder(text.TitansWordnet, data_dir, manual_dir=text.wordnet_dir())


def tokenizer_for(data_dir: str | None = None):
    """(tokenizer, SHA-256 of its JSON) of the `wordnet` dataset in data_dir (prepared on first use)."""
    data_dir = os.path.expanduser(os.fspath(data_dir or default_data_dir()))
    return text.read_tokenizer(_wordnet(data_dir).data_path)


def check_tokenizer(recorded_sha: str, data_dir: str | None = None) -> str:
    """The tokenizer's SHA-256 in data_dir; raises `TokenizerMismatchError` unless it is `recorded_sha`."""
    _, current = tokenizer_for(data_dir)
    if current != recorded_sha:
        where = f"data_dir {os.fspath(data_dir or default_data_dir())!r}"
        raise text.TokenizerMismatchError(text.mismatch_message(recorded_sha, current, where))
    return current


def _speech_commands(split: str, data_dir: str):
    builder = speech.TitansSpeechCommands(data_dir=data_dir, file_format="array_record")
    if not (builder.is_prepared() or speech.raw_available()):
        raise DatasetNotFoundError(
            f"Dataset 'speech_commands' (Titans' builder 'titans_speech_commands', split {split!r}) is not "
            f"prepared in data_dir {data_dir!r}, and $TITANS_SPEECH_DIR does not point at the extracted "
            f"speech_commands_v0.02 archive.\nExtract "
            f"http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz and set TITANS_SPEECH_DIR to "
            f"it (no TensorFlow needed); it is then prepared on first use, or with: "
            f"{prepare_command('speech_commands', data_dir)} --manual_dir=THAT_DIR"
        )
    builder = _auto_prepared_builder(speech.TitansSpeechCommands, data_dir, manual_dir=speech.raw_dir() or None)
    return builder.as_data_source(split=split)


def _fashion_mnist(split: str, data_dir: str):
    offline = builders.FashionMnistOffline(data_dir=data_dir, file_format="array_record")
    if offline.is_prepared() or builders.fmnist_raw_available():
        builder = _auto_prepared_builder(builders.FashionMnistOffline, data_dir, manual_dir=builders.fmnist_raw_dir())
        return builder.as_data_source(split=split)
    return _tfds_data_source("fashion_mnist", "fashion_mnist", split, data_dir)


def split_ranges(info, spec: str) -> dict[str, tuple[int, int]]:
    """The example index range [start, stop) that a TFDS split spec (e.g. 'train[90%:]',
    'train[:54000]+test') takes from each named split of `info`, from the split sizes alone."""
    sizes = {
        name: types.SimpleNamespace(num_examples=n, num_shards=1, shard_lengths=[n]) for name, n in info.splits.items()
    }
    out: dict[str, tuple[int, int]] = {}
    for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes):
        n = info.splits[part.splitname]
        start = 0 if part.from_ is None else part.from_
        stop = n if part.to is None else part.to
        lo, hi = out.get(part.splitname, (start, stop))
        out[part.splitname] = (min(lo, start), max(hi, stop))
    return out


def overlap(info, a: str, b: str) -> int:
    """How many examples the split specs `a` and `b` share (0: disjoint)."""
    ra, rb = split_ranges(info, a), split_ranges(info, b)
    return sum(max(0, min(ra[k][1], rb[k][1]) - max(ra[k][0], rb[k][0])) for k in ra.keys() & rb.keys())
