"""Google Speech Commands (12 classes) as quantised log-mel "images", prepared without TensorFlow.

TFDS's `speech_commands` stores its clips as an `Audio` feature, which TFDS cannot even describe
without TensorFlow (its constructor calls `tf.dtypes`), so neither its prepare step nor reading
its files back works in Titans' TF-free runtime. Instead `titans_speech_commands` (below) reads the
public archive's WAV files with Python's `wave` module and stores, per clip, its log-mel
spectrogram quantised to uint8, shape (49 frames, 40 mel bands, 1), like the 8-bit features of
keyword-spotting models on microcontrollers. The pipelines then treat it as any uint8 image
dataset. The 12 classes are TFDS's: ten words, `_silence_` (1 s cuts of the background-noise
clips) and `_unknown_` (every other word); splits follow the archive's validation_list.txt and
testing_list.txt (the rest is train).

Raw data: the extracted `speech_commands_v0.02.tar.gz` (folders per word, `_background_noise_`,
the two lists), found in `$TITANS_SPEECH_DIR` or passed as manual_dir.
"""

from __future__ import annotations

import os
import wave

import numpy as np
import tensorflow_datasets as tfds

WORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
LABELS = WORDS + ("_silence_", "_unknown_")
SAMPLE_RATE = 16000
NUM_FRAMES, NUM_BANDS = 49, 40
FRAME, HOP, NFFT = 480, 320, 512  # 30 ms windows every 20 ms
DB_LOW, DB_HIGH = -100.0, 40.0  # dB range mapped onto 0..255
SILENCE_PER_CLIP = 60  # 1 s cuts taken from each background-noise clip (split by hash below)


def raw_dir() -> str:
    return os.environ.get("TITANS_SPEECH_DIR", "")


def raw_available(path: str | None = None) -> bool:
    path = path or raw_dir()
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "validation_list.txt"))
        and os.path.isfile(os.path.join(path, "testing_list.txt"))
    )


def _mel_filterbank() -> np.ndarray:
    """(NFFT // 2 + 1, NUM_BANDS) triangular HTK-mel filters over 20..7600 Hz."""

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(20.0), mel(7600.0), NUM_BANDS + 2))
    freqs = np.linspace(0, SAMPLE_RATE / 2, NFFT // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32)


_FILTERS = None


def log_mel_uint8(audio: np.ndarray) -> np.ndarray:
    """A clip (int16 samples, any length; padded or cut to 1 s) -> uint8 (49, 40, 1) log-mel."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = _mel_filterbank()
    x = np.asarray(audio, np.float32).reshape(-1) / 32768.0
    x = np.pad(x[:SAMPLE_RATE], (0, max(0, SAMPLE_RATE - len(x))))
    idx = np.arange(FRAME)[None, :] + HOP * np.arange(NUM_FRAMES)[:, None]
    frames = x[idx] * np.hanning(FRAME).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2
    db = 10.0 * np.log10(power @ _FILTERS + 1e-10)
    q = np.round((db - DB_LOW) * (255.0 / (DB_HIGH - DB_LOW)))
    return np.clip(q, 0, 255).astype(np.uint8)[..., None]


def read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")


def _split_of(relpath: str, val: set, test: set) -> str:
    return "test" if relpath in test else "validation" if relpath in val else "train"


def clips(root: str):
    """(relative path, label index, split) of every word clip, sorted by path."""
    with open(os.path.join(root, "validation_list.txt")) as f:
        val = {line.strip() for line in f if line.strip()}
    with open(os.path.join(root, "testing_list.txt")) as f:
        test = {line.strip() for line in f if line.strip()}
    out = []
    for word in sorted(os.listdir(root)):
        folder = os.path.join(root, word)
        if word.startswith("_") or not os.path.isdir(folder):
            continue
        label = LABELS.index(word) if word in WORDS else LABELS.index("_unknown_")
        for name in sorted(os.listdir(folder)):
            if name.endswith(".wav"):
                rel = f"{word}/{name}"
                out.append((rel, label, _split_of(rel, val, test)))
    return out


def silence_cuts(root: str):
    """(clip path, start sample, split) 1 s cuts of the background noise; split fixed by position."""
    folder = os.path.join(root, "_background_noise_")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".wav"):
            continue
        n = len(read_wav(os.path.join(folder, name)))
        starts = np.linspace(0, max(0, n - SAMPLE_RATE), SILENCE_PER_CLIP).astype(int)
        for i, s in enumerate(starts):
            split = "test" if i % 10 == 9 else "validation" if i % 10 == 8 else "train"
            out.append((os.path.join("_background_noise_", name), int(s), split))
    return out


class TitansSpeechCommands(tfds.core.GeneratorBasedBuilder):
    """Speech Commands v0.02, 12 classes, as uint8 (49, 40, 1) log-mel spectrograms."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract speech_commands_v0.02.tar.gz (http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz) "
        "into a directory and pass it as manual_dir or set $TITANS_SPEECH_DIR."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Speech Commands v0.02 (12 classes) as quantised log-mel spectrograms.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(NUM_FRAMES, NUM_BANDS, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(LABELS)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in ("train", "validation", "test")}

    def _generate_examples(self, root, split):
        for rel, label, s in clips(root):
            if s == split:
                yield rel, {"image": log_mel_uint8(read_wav(os.path.join(root, rel))), "label": label}
        for rel, start, s in silence_cuts(root):
            if s == split:
                audio = read_wav(os.path.join(root, rel))[start : start + SAMPLE_RATE]
                yield f"{rel}@{start}", {"image": log_mel_uint8(audio), "label": LABELS.index("_silence_")}
