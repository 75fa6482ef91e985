"""Load and run an exported Titans cascade with jax and numpy only (no titans package needed).

This file is copied into every export directory as `titans_cascade.py`:

    import titans_cascade                       # from inside the export directory, or put it on sys.path
    cascade = titans_cascade.load("exports/fmnist_cascade")
    out = cascade.predict(images)               # uint8 (N, H, W, C)
    out["classes"], out["probabilities"], out["answered_by"]   # (N,), (N, K), (N,) stage index
    out = cascade.predict_texts(["dog, domestic dog : a member of the genus Canis"])   # a text export

A text export (version 3, `modality` "text") takes int32 token ids (N, L), 0 = padding, L at most its
`max_tokens`: `predict(token_ids)`, or `predict_texts(strings)`, which tokenizes with the export's own
tokenizer.json (Hugging Face `tokenizers`, imported for text exports only; its size and SHA-256 are
checked like a stage file's) exactly as Titans' dataset does: no special tokens, truncated to
`max_tokens`, padded with 0. Each stage has a symbolic token length too (at most `max_tokens`); the
loader cuts every chunk of rows to the smallest of `token_buckets` that holds its longest row, as
Titans' loaders cut a batch, so a stage is compiled once per (batch bucket, token bucket).

The cascade runs its first stage on every image and each later stage only on the images every
earlier stage deferred (gate score > threshold), so the teacher really is skipped where the
students are confident. Each stage is a `jax.export` artifact (StableHLO with a symbolic batch
dimension) that normalises raw uint8 images itself. An artifact made with another JAX version, or
for platforms this machine does not have, is refused with a message naming both.

Integrity. The manifest records every stage file's size and SHA-256, and the SHA-256 of each of its
own fields (the operating point included: gate, rates, thresholds) under `integrity`. `load` checks all
of them before it runs anything, and refuses a missing, truncated, changed or swapped stage file, or an
edited field, with an `ExportIntegrityError` (a ValueError) that names the file or field and what
differs. The checksums catch damage and edits, not a forger: whoever edits a field can recompute its
checksum. A directory without manifest.json is refused too: the exporter writes the manifest last.
This loader reads local files only (`open`), so that it needs nothing beyond jax and numpy: copy an
export out of a bucket before loading it.

Batch sizes. A symbolic batch dimension does not mean one compilation: XLA compiles the stage again
for every new concrete batch size (0.1-0.5 s each for the Fashion-MNIST students and ResNet-20 on
CPU), and a cascade's later stages see a different number of deferred rows on nearly every call.
So the loader runs each stage only at the sizes in `BUCKETS`: a batch is cut into chunks of at most
the largest bucket and each chunk is zero-padded to the next bucket (padding costs at most 1.5x the
compute of the rows, and for 2 rows or fewer nothing). `warm_up()` compiles every bucket ahead, as the
serving replicas do when they start, so no request waits for the compiler.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax import export as jax_export

FORMAT = "titans-cascade-export"
VERSION = 2  # 2: SHA-256 of every stage file and of every manifest field
TEXT_VERSION = 3  # 3: a text export: int32 token ids in, its tokenizer.json (size, SHA-256) beside the stages
MODALITY_OF_VERSION = {VERSION: "image", TEXT_VERSION: "text"}
MANIFEST = "manifest.json"
BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def padded_size(n: int, buckets=BUCKETS) -> int:
    """The bucket a chunk of n rows (1 <= n <= the largest bucket) is padded to: the smallest not below n."""
    return next(b for b in buckets if b >= n)


class ExportError(RuntimeError):
    """An export directory that cannot be used here (format, JAX version, platform, files)."""


class ExportIntegrityError(ExportError, ValueError):
    """A file of the export, or a field of its manifest, is not what the exporter wrote (missing, truncated,
    changed, replaced); the message names the file or field and what differs."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value) -> bytes:
    """The bytes a manifest field's checksum covers: its JSON with sorted keys and no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict) -> dict:
    """`manifest` as JSON types, with `integrity`: the SHA-256 of every other field's canonical JSON."""
    body = json.loads(canonical({k: v for k, v in manifest.items() if k != "integrity"}))
    fields = {k: sha256(canonical(v)) for k, v in body.items()}
    return {**body, "integrity": {"algorithm": "sha256", "fields": fields}}


def _verify_fields(manifest: dict, path: str) -> None:
    """Every field of the manifest has the checksum the exporter recorded; none added or missing."""
    integrity = manifest.get("integrity")
    recorded = integrity.get("fields") if isinstance(integrity, dict) else None
    if not isinstance(recorded, dict):
        raise ExportIntegrityError(
            f"{path} has no integrity record ('integrity.fields'): its fields cannot be checked."
        )
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    problems = []
    for name in sorted(set(body) | set(recorded)):
        if name not in body:
            problems.append(f"field {name!r} is missing")
        elif name not in recorded:
            problems.append(f"field {name!r} was added")
        elif sha256(canonical(body[name])) != recorded[name]:
            problems.append(
                f"field {name!r} differs from what the exporter wrote (SHA-256 {sha256(canonical(body[name]))}, "
                f"recorded {recorded[name]})"
            )
    if problems:
        raise ExportIntegrityError(
            f"{path} was changed after the export: {'; '.join(problems)}. Its operating point (gate, rates, "
            f"thresholds) and file checksums can no longer be trusted: export the cascade again."
        )


def _check(manifest: dict, directory: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{directory} is not a Titans cascade export ({MANIFEST} has no format {FORMAT!r}).")
    version = manifest.get("version")
    if version not in MODALITY_OF_VERSION:
        raise ExportError(
            f"{directory} is a Titans cascade export of version {version}; this loader reads version {VERSION} "
            f"(images, with SHA-256 checksums of every file) and {TEXT_VERSION} (text, with its tokenizer). "
            f"Export it again."
        )
    _verify_fields(manifest, os.path.join(directory, MANIFEST))
    if manifest.get("modality", "image") != MODALITY_OF_VERSION[version]:
        raise ExportError(
            f"{directory}: an export of version {version} holds {MODALITY_OF_VERSION[version]} stages, but its "
            f"manifest says modality {manifest.get('modality')!r}. Export it again."
        )
    if manifest["jax_version"] != jax.__version__:
        raise ExportError(
            f"{directory} was exported with jax {manifest['jax_version']}; this machine has jax {jax.__version__}. "
            f"Serialized StableHLO is only promised to load in the JAX version that wrote it: install "
            f"jax=={manifest['jax_version']}, or export again with this one."
        )
    here = jax.default_backend()
    platform = {"gpu": "cuda"}.get(here, here)
    if platform not in manifest["platforms"]:
        raise ExportError(
            f"{directory} was exported for {manifest['platforms']}, but this machine runs {platform}. Export "
            f"again on (or for) this platform."
        )


def read_manifest(directory: str) -> dict:
    """The manifest of the export in `directory` (a local path), checked: format, version, the checksum
    of every field, JAX version and platform."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise ExportIntegrityError(
            f"{directory} holds no {MANIFEST}: not a Titans cascade export, or one whose writing did not finish "
            f"(the exporter writes {MANIFEST} last). Export it again."
        ) from None
    except ValueError as e:
        raise ExportIntegrityError(f"{path} is not valid JSON ({e}): truncated or damaged. Export again.") from None
    _check(manifest, directory)
    return manifest


def read_file(directory: str, entry: dict, what: str) -> bytes:
    """The bytes of the file `entry` names ({"file", "size", "sha256"}: `what` of the export, e.g. "stage 0"),
    refused unless they have the size and SHA-256 the manifest records."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
        raise ExportIntegrityError(f"{os.path.join(directory, MANIFEST)}: {what}'s file {name!r} is not a file name.")
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ExportIntegrityError(f"{path} is missing ({what} of the export). Export again.") from None
    if len(data) != entry.get("size"):
        raise ExportIntegrityError(
            f"{path} is {len(data)} bytes; the exporter wrote {entry.get('size')} bytes for {what}: the file was "
            f"truncated or replaced (another stage's file copied over it?). Export again."
        )
    if sha256(data) != entry.get("sha256"):
        raise ExportIntegrityError(
            f"{path} has SHA-256 {sha256(data)}; the exporter wrote {entry.get('sha256')} for {what}: the file "
            f"was changed after the export (a damaged byte, or another file of the same size). Export again."
        )
    return data


def read_stage_file(directory: str, i: int, entry: dict) -> bytes:
    """The bytes of stage i's file, refused unless they have the size and SHA-256 the manifest records."""
    return read_file(directory, entry, f"stage {i}")


class Cascade:
    """An exported cascade of image stages, loaded: `predict(images)`. (`load` picks `TextCascade` for a text
    export.)"""

    modality = "image"

    def __init__(self, directory: str, buckets=BUCKETS):
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes; got {buckets}")
        self.directory = os.path.abspath(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest.get("modality", "image") != self.modality:
            raise ExportError(
                f"{self.directory} is a {self.manifest.get('modality', 'image')} export, not one of {self.modality} "
                f"stages: open it with load(), which picks the loader for it."
            )
        self.thresholds = [float(t) for t in self.manifest["thresholds"]]
        self.input_shape = tuple(self.manifest["input_shape"])
        self.input_dtype = np.dtype(self.manifest["input_dtype"])
        self._read_files()

    def _read_files(self) -> None:
        self._stages = []
        for i, stage in enumerate(self.manifest["stages"]):
            data = read_stage_file(self.directory, i, stage)
            try:
                self._stages.append(jax_export.deserialize(bytearray(data)))
            except Exception as e:
                raise ExportError(f"{os.path.join(self.directory, stage['file'])} cannot be deserialised: {e}") from e

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def bucket(self, n: int) -> int:
        """The batch size a chunk of n rows (1 <= n <= the largest bucket) is padded to."""
        return padded_size(n, self.buckets)

    def _warm_up_inputs(self):
        """One input per program a stage runs: zero images at every bucket."""
        for b in self.buckets:
            yield np.zeros((b, *self.input_shape), self.input_dtype)

    def warm_up(self, stages=None) -> None:
        """Compile `stages` (default: all) at every bucket, so that no later call of theirs compiles."""
        for i in range(self.num_stages) if stages is None else stages:
            for x in self._warm_up_inputs():
                self.stage_outputs(i, x)

    def _fit(self, chunk: np.ndarray) -> np.ndarray:
        """A chunk of rows as the stage takes it (images: as they are)."""
        return chunk

    def _call(self, i: int, images: np.ndarray):
        """Stage i's raw outputs, run at bucket sizes only: chunks of at most the largest bucket, each
        zero-padded to the next bucket; the padding rows are cut off again."""
        parts = []
        for start in range(0, len(images), self.buckets[-1]):
            chunk = self._fit(images[start : start + self.buckets[-1]])
            n = len(chunk)
            pad = self.bucket(n) - n
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = self._stages[i].call(chunk)
            parts.append([np.asarray(o)[:n] for o in (out if isinstance(out, (tuple, list)) else (out,))])
        return [np.concatenate(p) for p in zip(*parts)]

    def stage_outputs(self, i: int, images: np.ndarray):
        """Stage i on `images`: (float32 logits (n, K), gate scores (n,) or None for the last stage)."""
        images = np.asarray(images, self.input_dtype)
        if not len(images):
            k = self.manifest["num_classes"]
            return np.zeros((0, k), np.float32), (None if i == self.num_stages - 1 else np.zeros(0, np.float32))
        out = self._call(i, images)
        if i < self.num_stages - 1:
            logits, scores = out
            return logits.astype(np.float32), scores.astype(np.float32)
        return out[0].astype(np.float32), None

    def check_inputs(self, images) -> np.ndarray:
        """`images` as the stages take them, or ValueError saying what is wrong."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected uint8 images of shape (N, {', '.join(map(str, self.input_shape))}), got "
                f"{images.dtype} {images.shape}"
            )
        return images

    def predict(self, images) -> dict:
        """classes (N,), probabilities (N, K), answered_by (N,): the stage that answered each image."""
        images = self.check_inputs(images)
        n = len(images)
        logits = np.zeros((n, self.manifest["num_classes"]), np.float32)
        answered_by = np.full(n, -1, np.int32)
        reach = np.arange(n)
        for i in range(self.num_stages):
            if len(reach) == 0:
                break
            stage_logits, scores = self.stage_outputs(i, images[reach])
            keep = np.ones(len(reach), bool) if scores is None else scores <= self.thresholds[i]
            logits[reach[keep]] = stage_logits[keep]
            answered_by[reach[keep]] = i
            reach = reach[~keep]
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        return {"classes": logits.argmax(-1), "probabilities": probs, "answered_by": answered_by}


def read_tokenizer(directory: str, entry: dict):
    """The export's tokenizer (a `tokenizers.Tokenizer`), after its file's size and SHA-256 are checked."""
    data = read_file(directory, entry, "the tokenizer")
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415  (only text exports need it)
    except ImportError:
        raise ExportError(
            f"{directory} is a text export: its loader needs the Hugging Face `tokenizers` package "
            f"(pip install tokenizers)."
        ) from None
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        raise ExportError(f"{os.path.join(directory, entry['file'])} is not a tokenizer: {e}") from e


class TextCascade(Cascade):
    """An exported cascade of text stages: `predict_texts(strings)`, or `predict(token_ids)` with int32 ids
    (N, L), 0 = padding, L at most `max_tokens`."""

    modality = "text"

    def _read_files(self) -> None:
        m = self.manifest
        self.max_tokens, self.vocab_size = int(m["max_tokens"]), int(m["vocab_size"])
        self.token_buckets = tuple(sorted(int(b) for b in m["token_buckets"]))
        self.tokenizer = read_tokenizer(self.directory, m["tokenizer"])
        super()._read_files()

    def token_bucket(self, n: int) -> int:
        """The token length a chunk whose longest row has n tokens is cut or padded to."""
        return next((b for b in self.token_buckets if b >= n), self.max_tokens)

    def _warm_up_inputs(self):
        """One input per program a stage runs: every batch bucket at every token bucket (rows of id 1, [UNK],
        so that the rows are as long as the bucket)."""
        for length in self.token_buckets:
            for b in self.buckets:
                yield np.ones((b, length), np.int32)

    def _fit(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk cut (or zero-padded) to the token bucket of its longest row, as Titans' loaders cut a batch
        (`titans.data.text.bucket_length`); a row's length is up to its last non-padding id."""
        real = chunk != 0
        lengths = np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
        length = self.token_bucket(int(lengths.max(initial=0)))
        if length <= chunk.shape[1]:
            return chunk[:, :length]
        return np.pad(chunk, ((0, 0), (0, length - chunk.shape[1])))

    def check_inputs(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" or tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_tokens:
            raise ValueError(
                f"expected integer token ids of shape (N, L), L from 1 to {self.max_tokens}, got {tokens.dtype} "
                f"{tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}) (0 = padding); got {tokens.min()} to {tokens.max()}"
            )
        return tokens.astype(np.int32)

    def encode(self, texts) -> np.ndarray:
        """int32 token ids (N, max_tokens) of `texts`, as Titans' dataset stores them (`titans.data.text.encode`):
        the export's tokenizer without special tokens, truncated to `max_tokens`, padded with 0. A text holding
        the padding token "[PAD]" literally is refused, as Titans refuses it."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        wrong = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if wrong is not None:
            raise TypeError(f"texts must be strings; text {wrong} is a {type(texts[wrong]).__name__}")
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"text {i} is not valid Unicode (it holds a lone surrogate)") from None
        ids = np.zeros((len(texts), self.max_tokens), np.int32)
        for i, e in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            kept = e.ids[: self.max_tokens]
            if 0 in kept:
                raise ValueError(f"text {i} holds the padding token (id 0, [PAD]) literally; Titans' texts never do")
            ids[i, : len(kept)] = kept
        return ids

    def predict_texts(self, texts) -> dict:
        """`predict` on the texts' token ids (`encode`)."""
        return self.predict(self.encode(texts))


def load(directory: str, buckets=BUCKETS) -> Cascade:
    """The export in `directory`: a `Cascade` (images) or `TextCascade`, its every checksum checked."""
    text = read_manifest(os.path.abspath(directory)).get("modality") == "text"
    return (TextCascade if text else Cascade)(directory, buckets)
