"""The offline text benchmark: WordNet supersenses, a trained WordPiece tokenizer, length buckets.

Each WordNet synset is one example: its lemmas and gloss as text, its lexicographer file ("supersense",
45 classes: noun.animal, verb.motion, adj.all, ...) as label. The synsets come from Debian's
`wordnet-base` files (`/usr/share/wordnet/data.{noun,verb,adj,adv}`, or `$TITANS_WORDNET_DIR`); the
builder `titans_wordnet` writes them as ArrayRecord, read through `tfds.data_source` like the images.

- text: the lemmas (underscores as spaces, adjective markers such as "(a)" dropped), comma-separated,
  then " : " and the gloss.
- split: by a hash of the synset id ("n:00001740", the data file's part of speech and the offset): 80 %
  train, 10 % validation, 10 % test; the same files give the same split on every machine (`split_of`).
  Within a split the synsets are in the order of that hash, so a slice such as `train[:2000]` is a
  uniform sample.
- tokens: a lower-cased WordPiece tokenizer (Hugging Face `tokenizers`, 8,192 ids, 0 = [PAD]) whose
  vocabulary is learnt from the train split's texts only by deterministic byte-pair merges
  (`learn_vocabulary`) and numbered in a canonical order, so the same files give a byte-identical
  `tokenizer.json`. It is saved in the prepared dataset's directory and named by the
  SHA-256 of that JSON (`tokenizer_sha256`); a checkpoint records it (`titans.checkpoint.meta_for`).
  An example stores its ids truncated to `MAX_TOKENS` and padded with 0 (`tokens`), the number kept
  (`length`) and the number before truncation (`num_tokens`).
- batches: `bucket_length` picks the smallest of `BUCKETS` that holds a batch's longest example; the
  loaders cut the token arrays to it (titans/data/loaders.py).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

WORDNET_DEFAULT_DIR = "/usr/share/wordnet"
POS_FILES = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))
NUM_SYNSETS = 117659
MAX_TOKENS = 128
BUCKETS = (16, 32, 64, 128)
VOCAB_SIZE = 8192
PAD, UNK = "[PAD]", "[UNK]"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "validation", "test")

# WordNet's lexicographer files in the order of their numbers (WordNet 3.0's `lexnames` file).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet data files are not where they were looked for."""


class TokenizerMismatchError(ValueError):
    """A run recorded another tokenizer than the one its data_dir holds."""


def wordnet_dir() -> str:
    """Where the WordNet `data.*` files are looked for: `$TITANS_WORDNET_DIR` or Debian's."""
    return os.environ.get("TITANS_WORDNET_DIR") or WORDNET_DEFAULT_DIR


def wordnet_available(raw_dir: str | None = None) -> bool:
    raw_dir = raw_dir or wordnet_dir()
    return all(os.path.isfile(os.path.join(raw_dir, f"data.{name}")) for name, _ in POS_FILES)


def missing_message(raw_dir: str) -> str:
    return (
        f"The WordNet files data.noun, data.verb, data.adj and data.adv are not all in {raw_dir!r}. "
        f"Install them with `apt-get install wordnet-base` (into {WORDNET_DEFAULT_DIR}), or point "
        f"$TITANS_WORDNET_DIR at a directory holding WordNet 3.0's data files."
    )


def label_names(raw_dir: str | None = None) -> tuple[str, ...]:
    """The 45 lexicographer file names by number: from `lexnames` beside the data files if present."""
    path = os.path.join(raw_dir or wordnet_dir(), "lexnames")
    if not os.path.isfile(path):
        return LEXNAMES
    with open(path, encoding="latin-1") as f:
        rows = sorted((int(r[0]), r[1]) for r in (line.split() for line in f) if r)
    if [k for k, _ in rows] != list(range(len(LEXNAMES))):
        raise ValueError(f"{path}: expected lexicographer files numbered 0..{len(LEXNAMES) - 1}")
    return tuple(name for _, name in rows)


@dataclasses.dataclass(frozen=True)
class Synset:
    synset_id: str  # "<pos>:<offset>", pos one of n v a r (the data file), offset as in the file
    label: int  # lexicographer file number
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def text(self) -> str:
        return ", ".join(self.lemmas) + " : " + self.gloss


def parse_line(line: str, pos: str) -> Synset | None:
    """One line of a `data.<pos>` file; None for the license header (lines starting with two spaces)."""
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition("|")
    fields = head.split()
    if not sep or len(fields) < 6:
        raise ValueError(f"not a WordNet synset line: {line[:80]!r}")
    offset, lex_filenum, count = fields[0], int(fields[1]), int(fields[3], 16)
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise ValueError(f"synset {pos}:{offset}: lexicographer file {lex_filenum} not in 0..{len(LEXNAMES) - 1}")
    words = fields[4 : 4 + 2 * count : 2]
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(f"{pos}:{offset}", lex_filenum, lemmas, gloss.strip())


def read_synsets(raw_dir: str | None = None) -> list[Synset]:
    """Every synset of the four data files, in file order (noun, verb, adj, adv)."""
    raw_dir = raw_dir or wordnet_dir()
    if not wordnet_available(raw_dir):
        raise WordNetNotFoundError(missing_message(raw_dir))
    out = []
    for name, pos in POS_FILES:
        with open(os.path.join(raw_dir, f"data.{name}"), encoding="latin-1") as f:
            for line in f:
                synset = parse_line(line, pos)
                if synset is not None:
                    out.append(synset)
    return out


def _digest(synset_id: str) -> bytes:
    return hashlib.sha256(synset_id.encode()).digest()


def split_of(synset_id: str) -> str:
    """train (80 %), validation (10 %) or test (10 %), from the SHA-256 of the synset id."""
    bucket = int.from_bytes(_digest(synset_id)[:8], "big") % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def by_split(synsets: list[Synset]) -> dict[str, list[Synset]]:
    """Split -> its synsets, ordered by the SHA-256 of their ids: any slice of a split (`train[:2000]`)
    is then a sample of all parts of speech and classes, not the first nouns of the files."""
    out = {s: [] for s in SPLITS}
    for synset in sorted(synsets, key=lambda s: _digest(s.synset_id)):
        out[split_of(synset.synset_id)].append(synset)
    return out


def class_counts(raw_dir: str | None = None) -> dict[str, np.ndarray]:
    """Split -> examples per class (int64 (45,)), straight from the raw files."""
    return {
        split: np.bincount([s.label for s in synsets], minlength=len(LEXNAMES))
        for split, synsets in by_split(read_synsets(raw_dir)).items()
    }


def class_count_table(raw_dir: str | None = None) -> str:
    """The Markdown table of examples per class and split (docs/text.md holds it; a test compares)."""
    counts, names = class_counts(raw_dir), label_names(raw_dir)
    lines = ["| label | class | " + " | ".join(SPLITS) + " |", "|---:|---|" + "---:|" * len(SPLITS)]
    for k, name in enumerate(names):
        lines.append(f"| {k} | {name} | " + " | ".join(str(counts[s][k]) for s in SPLITS) + " |")
    lines.append("| | total | " + " | ".join(str(int(counts[s].sum())) for s in SPLITS) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tokenizer


def _empty_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab or {PAD: 0, UNK: 1}, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=True, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def word_counts(texts: list[str]) -> collections.Counter:
    """How often each word occurs in `texts`, as the tokenizer's normaliser and pre-tokeniser cut them."""
    tok = _empty_tokenizer()
    norm, pre = tok.normalizer, tok.pre_tokenizer
    return collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))


def _merge_pair(seqs, freq, where, counts, pair, new) -> set:
    """Merges `pair` into `new` in every word that holds it, updating the pair counts around each merge;
    returns the pairs whose counts changed."""
    a, b = pair
    changed = set()
    for i in where.pop(pair):
        seq, f, out, j = seqs[i], freq[i], [], 0
        while j < len(seq):
            if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                around = [((out[-1], a), (out[-1], new))] if out else []
                if j + 2 < len(seq):
                    around.append(((b, seq[j + 2]), (new, seq[j + 2])))
                for old, merged in around:
                    counts[old] -= f
                    counts[merged] += f
                    where[merged].add(i)
                    changed.update((old, merged))
                out.append(new)
                j += 2
            else:
                out.append(seq[j])
                j += 1
        seqs[i] = out
    counts.pop(pair, None)
    changed.discard(pair)
    return changed


def learn_vocabulary(counts_by_word: dict[str, int], vocab_size: int) -> list[str]:
    """WordPiece's vocabulary by byte-pair merges over the words (first character as is, the others with
    "##"), the most frequent pair first and, among equally frequent pairs, the one of the smallest symbol
    ids (the alphabet's ids in sorted order, merged symbols' in order of creation): deterministic, unlike
    the `tokenizers` trainer, whose tie-breaks depend on hash-map order and vary between runs."""
    words = sorted(counts_by_word)
    names = sorted({w[0] for w in words} | {"##" + c for w in words for c in w[1:]})
    ids = {name: i for i, name in enumerate(names)}
    seqs = [[ids[w[0]], *(ids["##" + c] for c in w[1:])] for w in words]
    freq = [counts_by_word[w] for w in words]
    counts, where = collections.defaultdict(int), collections.defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    vocab = [PAD, UNK, *names]
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:  # an outdated entry: the pair's count changed since
            continue
        name = names[pair[0]] + names[pair[1]][2:]
        if name not in ids:  # the same string may arise from two different pairs
            ids[name] = len(names)
            names.append(name)
            vocab.append(name)
        for p in _merge_pair(seqs, freq, where, counts, pair, ids[name]):
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return vocab


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A lower-cased WordPiece tokenizer of `vocab_size` ids learnt from `texts`; [PAD] = 0, [UNK] = 1.

    The vocabulary comes from `learn_vocabulary` (deterministic) and is numbered in a canonical order (the
    special tokens, then the rest sorted), so the same texts always give the same `tokenizer.json`.
    WordPiece encodes by longest match in the vocabulary, whatever its order.
    """
    vocab = learn_vocabulary(word_counts(texts), vocab_size)
    tok = _empty_tokenizer({t: i for i, t in enumerate([PAD, UNK, *sorted(set(vocab) - {PAD, UNK})])})
    tok.add_special_tokens([PAD, UNK])
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_tokenizer(dataset_dir) -> tuple[Tokenizer, str]:
    """(tokenizer, SHA-256 of its JSON) saved in a prepared `titans_wordnet` directory."""
    path = epath.Path(dataset_dir) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the wordnet dataset there was not prepared by Titans.")
    text = path.read_text()
    return Tokenizer.from_str(text), sha256_of(text)


def mismatch_message(recorded: str, current: str, where: str) -> str:
    return (
        f"Tokenizer mismatch: the run recorded tokenizer sha256 {recorded}, but {where} holds tokenizer "
        f"{current}. Token ids would mean other words. Use the data_dir the run was trained with (or "
        f"prepare the dataset from the same WordNet files), or start a new run."
    )


def encode(tok: Tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids (N, max_tokens), zero-padded and truncated; int32 lengths before truncation (N,))."""
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    ids = np.zeros((len(texts), max_tokens), np.int32)
    full = np.zeros(len(texts), np.int32)
    for i, e in enumerate(encodings):
        kept = e.ids[:max_tokens]
        ids[i, : len(kept)] = kept
        full[i] = len(e.ids)
    if np.any((ids == 0) & (np.arange(max_tokens) < np.minimum(full, max_tokens)[:, None])):
        raise ValueError("a text was encoded with the padding id 0 (it holds the literal [PAD])")
    return ids, full


# ------------------------------------------------------------------------------------------ batches


def token_lengths(tokens) -> np.ndarray:
    """Each row's number of token ids (int ids, 0 = padding, at the end)."""
    return (np.asarray(tokens) != 0).sum(axis=-1)


def bucket_length(tokens: np.ndarray, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds the longest row of `tokens` (int ids, 0 = padding, at the end)."""
    longest = int(token_lengths(tokens).max(initial=0))
    for b in buckets:
        if longest <= b:
            return b
    raise ValueError(f"an example of {longest} tokens is longer than the largest bucket {buckets[-1]}")


# ------------------------------------------------------------------------------------------ builder


class TitansWordnet(tfds.core.GeneratorBasedBuilder):
    """WordNet 3.0 synsets -> lexicographer file (45 supersenses); 80/10/10 by synset-id hash."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put WordNet 3.0's data.noun, data.verb, data.adj and data.adv in manual_dir: "
        f"`apt-get install wordnet-base` puts them in {WORDNET_DEFAULT_DIR}"
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="WordNet synsets (lemmas : gloss) labelled with their lexicographer file.",
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(MAX_TOKENS,), dtype=np.int32),
                    "length": tfds.features.Scalar(dtype=np.int32),
                    "num_tokens": tfds.features.Scalar(dtype=np.int32),
                    "label": tfds.features.ClassLabel(names=label_names()),
                    "synset_id": tfds.features.Text(),
                    "text": tfds.features.Text(),
                }
            ),
            supervised_keys=("tokens", "label"),
            # Keep the order of `by_split` (by the synset id's hash), the same on every machine.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        raw_dir = os.fspath(dl_manager.manual_dir)
        splits = by_split(read_synsets(raw_dir))
        if sum(map(len, splits.values())) != NUM_SYNSETS:
            raise ValueError(f"{raw_dir}: {sum(map(len, splits.values()))} synsets, WordNet 3.0 has {NUM_SYNSETS}")
        tok = train_tokenizer([s.text for s in splits["train"]])
        if tok.get_vocab_size() != VOCAB_SIZE:
            raise ValueError(f"the tokenizer has {tok.get_vocab_size()} ids, not {VOCAB_SIZE}")
        (self.data_path / TOKENIZER_FILE).write_text(tokenizer_json(tok))
        return {split: self._generate_examples(tok, synsets) for split, synsets in splits.items()}

    def _generate_examples(self, tok, synsets):
        ids, full = encode(tok, [s.text for s in synsets])
        for i, s in enumerate(synsets):
            example = {
                "tokens": ids[i],
                "length": min(int(full[i]), MAX_TOKENS),
                "num_tokens": int(full[i]),
                "label": s.label,
                "synset_id": s.synset_id,
                "text": s.text,
            }
            yield i, example
