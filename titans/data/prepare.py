"""Prepares a dataset as ArrayRecord in a TFDS data_dir:  python -m titans.data.prepare NAME --data_dir=DIR

`digits`, `speech_commands` (from the extracted WAV archive, titans/data/speech.py), `wordnet` (from
Debian's wordnet-base files or --manual_dir, titans/data/text.py), and `fashion_mnist` when Debian's IDX files (or `$TITANS_FMNIST_DIR`) are present,
use Titans' own builders and need no TensorFlow (they are also prepared automatically on
first use). Everything else runs TFDS's own builder,
`tfds.builder(name, data_dir=..., file_format='array_record').download_and_prepare()`, which
reads its downloads through TensorFlow: `pip install -r requirements-tf.txt` first.
imagenet2012 cannot be downloaded: pass --manual_dir holding ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (default DATA_DIR/downloads/manual).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import tensorflow_datasets as tfds

from titans import cli as cli_lib
from titans.data import builders, speech, text
from titans.data.info import DATASETS
from titans.data.sources import _auto_prepared_builder, default_data_dir


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Prepares `name` in `data_dir`; returns the directory the dataset was written to."""
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    if name == "digits":
        return os.fspath(_auto_prepared_builder(builders.TitansDigits, data_dir).data_dir)
    if name == "fashion_mnist" and builders.fmnist_raw_available(manual_dir):
        raw = manual_dir or builders.fmnist_raw_dir()
        builder = _auto_prepared_builder(builders.FashionMnistOffline, data_dir, manual_dir=raw)
        return os.fspath(builder.data_dir)

    if name == "wordnet":
        raw = manual_dir or text.wordnet_dir()
        if not text.wordnet_available(raw):
            raise SystemExit(text.missing_message(raw))
        return os.fspath(_auto_prepared_builder(text.TitansWordnet, data_dir, manual_dir=raw).data_dir)

    if name == "speech_commands":
        raw = manual_dir or speech.raw_dir()
        if not speech.raw_available(raw):
            raise SystemExit(
                "speech_commands: pass --manual_dir (or set $TITANS_SPEECH_DIR) to the extracted "
                "speech_commands_v0.02 archive (validation_list.txt, testing_list.txt, word folders)."
            )
        return os.fspath(_auto_prepared_builder(speech.TitansSpeechCommands, data_dir, manual_dir=raw).data_dir)

    if importlib.util.find_spec("tensorflow") is None:
        raise SystemExit(
            f"Preparing {name!r} runs TFDS's own builder, which needs TensorFlow: pip install -r requirements-tf.txt"
        )
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    return os.fspath(builder.data_dir)


def main(argv=None) -> None:
    parser = cli_lib.parser("titans-prepare", __doc__)
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--manual_dir", default=None, help="imagenet2012's tar files; fashion_mnist's IDX files")
    args = parser.parse_args(argv)
    path = prepare(args.name, args.data_dir, args.manual_dir)
    print(f"{args.name}: prepared as ArrayRecord in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
