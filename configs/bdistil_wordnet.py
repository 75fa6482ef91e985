"""B-DISTIL on text: an anytime ensemble of text students (bags of embeddings, 1-D CNNs, small Transformers)
distilled from the Transformer teacher of configs/wordnet_teacher.py on WordNet supersenses (docs/text.md).

    # once (shared with configs/titans_wordnet.py): the teacher, then its outputs on the members' split
    titans-train --config=configs/wordnet_teacher.py --workdir=workdirs/wordnet/teacher
    titans-cache --teacher_workdir=workdirs/wordnet/teacher --dataset=wordnet --split=train \
        --out=workdirs/wordnet/cache
    # per seed
    titans-train --config=configs/bdistil_wordnet.py:seed=0 --workdir=workdirs/bdistil_wordnet/seed0

Rows: members train on `train` (94,080 synsets; the teacher trained on them too, and the cache holds its
logits there, so no member step runs the teacher); FIND-WL's edge is measured on validation[:50%] (rows no
member and not the teacher trained on); validation[50%:] weighs resched's average; results on `test`
(11,760). Members see token ids in length buckets (16/32/64/128) and batches grouped by length.

Candidates, tried smallest first (XLA FLOPs at 32 tokens, as a share of the teacher's 208 MFLOPs), with their
own epoch budgets:
  bag        text_bag, embedding 64, MLP 64             0.021 MFLOPs   0.01%   6 epochs
  bag_wide   text_bag, embedding 128, MLP 256           0.10           0.05%   6
  cnn_small  text_cnn, embedding 32, 64 channels        0.67           0.3%    4
  cnn        text_cnn, embedding 64, 128 channels       2.6            1.3%    4
  tx_small   transformer_small, 2 x 64 x 2 heads        7.1            3.4%    4
  tx_mid     transformer, 2 x 128 x 4 heads            27             13%      4
no_resched adds a 4 x 128 Transformer (54 MFLOPs, 26%). Reported FLOPs are the mean over the test rows at
each row's length bucket (ensemble.json's flops_buckets). Member training: AdamW, lr 1e-3, 100 warm-up steps
then cosine, weight decay 0.01, batch 128, KD (T = 4, alpha = 0.9) on the summed logits, 4 rounds. The
connection: member w >= 2 reads member w-1's pooled hidden state (`features`: the masked-pooled vector its
classifier reads, so padding never reaches it) through a 32-wide projection, concatenated with its own.

arg: comma-separated key=value: seed (0), gamma (0.01), weights (example | example_class), rounds (4), epochs
("" = each candidate's own; a number = that budget for every member), sizes ("" = every candidate; else
'+'-separated names, e.g. bag+cnn), variants (bdistil+bdistil_noconn+resched+no_resched), layer (features;
any activation of the members: a per-token one is averaged over real tokens), teacher_dir
(workdirs/wordnet/teacher), cache_dir (workdirs/wordnet/cache; "" = the teacher runs in every member step),
train_split (train), edge_split (validation[:50%]; "" = the edge on the members' training rows), val_split
(validation[50%:]), test_split (test); the splits let a test run it at small sizes
(tests/test_text_ensemble.py).
Expected runtime, an ESTIMATE (not run here at full size): hours on 2 CPU cores (every FIND-WL try is a full
member run over 94,080 rows; the Transformer candidates dominate); under an hour a seed on one GPU. At the
test's sizes (train[:2000], two rounds of the bag, bdistil only) about a minute on 2 busy cores.
Results: not run yet.
"""

import os

import ml_collections

from titans.config import base_config
from titans.config_builders import parse_config_arg
from titans.ensemble.config import VARIANTS, defaults, model_entry

# name -> (model, kwargs, epochs), smallest first (FIND-WL sorts by measured FLOPs anyway).
CANDIDATES = {
    "bag": ("text_bag", dict(embed_dim=64, hidden=(64,)), 6),
    "bag_wide": ("text_bag", dict(embed_dim=128, hidden=(256,)), 6),
    "cnn_small": ("text_cnn", dict(embed_dim=32, channels=(64,), dense=64), 4),
    "cnn": ("text_cnn", {}, 4),
    "tx_small": ("transformer_small", {}, 4),
    "tx_mid": ("transformer", dict(depth=2, width=128, heads=4), 4),
}
NO_RESCHED = {**CANDIDATES, "tx_deep": ("transformer", dict(depth=4, width=128, heads=4), 4)}

_ARGS = dict(
    seed="0",
    gamma="0.01",
    weights="example",
    rounds="4",
    epochs="",
    sizes="",
    variants="+".join(VARIANTS),
    layer="features",
    teacher_dir="workdirs/wordnet/teacher",
    cache_dir="workdirs/wordnet/cache",
    train_split="train",
    edge_split="validation[:50%]",
    val_split="validation[50%:]",
    test_split="test",
)


def _member(seed: int, a: dict) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "member"
    c.seed = seed
    c.dataset.name = "wordnet"
    c.dataset.train_split = a["train_split"]
    c.dataset.eval_split = a["val_split"]
    c.dataset.group_by_length = 64
    c.dtype = "auto"
    c.batch_size = 128
    c.eval_batch_size = 512
    c.total_epochs = 4.0  # every candidate sets its own
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.log_every_steps = 100
    c.distill.teacher_workdir = a["teacher_dir"]
    c.distill.loss = "kd"
    c.distill.temperature = 4.0
    c.distill.alpha = 0.9
    if a["cache_dir"]:  # the teacher's logits over train_split: members train at student-only cost
        c.distill.teacher_mode = "cache"
        c.distill.cache.dir = a["cache_dir"]
    return c


def _entries(table: dict, names: list[str], epochs: str) -> ml_collections.ConfigDict:
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"Unknown sizes {unknown} for bdistil_wordnet.py; expected some of {sorted(table)}.")
    return ml_collections.ConfigDict(
        {n: model_entry(table[n][0], epochs=float(epochs or table[n][2]), **table[n][1]) for n in names}
    )


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(arg, _ARGS, "bdistil_wordnet.py")
    a["teacher_dir"] = os.path.abspath(a["teacher_dir"])
    a["cache_dir"] = os.path.abspath(a["cache_dir"]) if a["cache_dir"] else ""
    sizes = [s for s in a["sizes"].split("+") if s] or list(CANDIDATES)
    e = defaults()
    e.member = _member(int(a["seed"]), a)
    e.candidates = _entries(CANDIDATES, sizes, a["epochs"])
    e.no_resched = _entries(NO_RESCHED, [*sizes, *(["tx_deep"] if not a["sizes"] else [])], a["epochs"])
    e.rounds = int(a["rounds"])
    e.weights = a["weights"]
    e.gamma = float(a["gamma"])
    e.edge_split = a["edge_split"]
    e.variants = tuple(v for v in a["variants"].split("+") if v)
    e.connect.layer = a["layer"]
    e.connect.join = "concat"
    e.connect.width = 32
    e.val_split = a["val_split"]
    e.test_split = a["test_split"]
    e.predict_batch_size = 512
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    c.stage_order = ()  # the shared teacher run is `teacher_dir`
    c.ensemble = e
    return c
