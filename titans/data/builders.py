"""TFDS builders for the datasets Titans prepares itself, offline and without TensorFlow.

Both builders write ArrayRecord files (readable by `tfds.data_source`) and store images as
`tfds.features.Tensor` rather than `tfds.features.Image`, because encoding PNGs at prepare
time would need TensorFlow.

- `titans_digits`: scikit-learn's `load_digits` (ships inside the wheel), 8x8x1, rescaled to
  uint8 0..255, split train/test with a fixed permutation.
- `fashion_mnist_offline`: Fashion-MNIST from the gzip'd IDX files that Debian's
  `dataset-fashion-mnist` package installs. TFDS's own `fashion_mnist` cannot be used with
  those files: its prepare needs TF, and Debian re-compressed the files so their checksums
  differ from upstream.

The text benchmark's builder, `titans_wordnet` (WordNet synsets from Debian's `wordnet-base` files, with
its trained tokenizer), is in `text.py`.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NUM_TRAIN = 1437
DIGITS_PERMUTATION_SEED = 0

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fmnist_raw_dir() -> str:
    """Where the raw Fashion-MNIST IDX files are looked for: `$TITANS_FMNIST_DIR` or Debian's."""
    return os.environ.get("TITANS_FMNIST_DIR") or FMNIST_DEFAULT_DIR


def fmnist_raw_available(raw_dir: str | None = None) -> bool:
    raw_dir = raw_dir or fmnist_raw_dir()
    return all(os.path.isfile(os.path.join(raw_dir, f)) for pair in FMNIST_FILES.values() for f in pair)


def read_idx(path: str) -> np.ndarray:
    """Reads a (possibly gzip'd) IDX file into a numpy array (only the uint8 type occurs here)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (images uint8 (N, 8, 8, 1), labels int64 (N,)) of the fixed train/test split."""
    # scikit-learn costs about a second to import and only this builder needs it.
    from sklearn.datasets import load_digits  # noqa: PLC0415

    d = load_digits()
    # Pixels are integers 0..16; 255/16 maps them onto the full uint8 range exactly at the ends.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_PERMUTATION_SEED).permutation(len(labels))
    idx = perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]
    return images[idx], labels[idx]


def _examples(images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": int(label)}


class TitansDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits as 8x8x1 uint8 images; deterministic 1437/360 train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn load_digits, rescaled from 0..16 to 0..255.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep generation order so the split is exactly the fixed permutation above.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        yield from _examples(*digits_arrays(split))


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (28x28x1 uint8, 60000/10000) read from local gzip'd IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the four gzip'd IDX files (train-images-idx3-ubyte.gz, ...) in manual_dir, e.g. "
        "`apt-get install dataset-fashion-mnist` puts them in " + FMNIST_DEFAULT_DIR
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST from local IDX files, in the files' order.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the IDX files' order, so example i is record i of the raw files.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        raw_dir = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(raw_dir, split) for split in FMNIST_FILES}

    def _generate_examples(self, raw_dir, split):
        image_file, label_file = FMNIST_FILES[split]
        images = read_idx(os.path.join(raw_dir, image_file))[..., None]
        labels = read_idx(os.path.join(raw_dir, label_file))
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        yield from _examples(images, labels)
