"""Robust active distillation on text: accuracy vs teacher queries per strategy, a text student buying the
soft labels of the Transformer teacher (configs/wordnet_teacher.py) on WordNet synsets (docs/text.md).

    # once (shared with configs/titans_wordnet.py): the teacher
    titans-train --config=configs/wordnet_teacher.py --workdir=workdirs/wordnet/teacher
    # per seed
    titans-active --config=configs/active_wordnet.py:seed=0 --workdir=workdirs/active_wordnet/seed0

Data: the validation split (11,819 synsets, unseen by the teacher, which trained on `train`) is cut, with
`seed`, into 500 labelled synsets, a labelled validation split of 1,000 (used only to estimate the teacher's
mistakes m for the robust selection) and an unlabelled pool of the other 10,319. Each strategy (random,
margin, entropy, kcenter on the student's pooled `features`, robust) buys `budget` (250) teacher soft labels
a round for `rounds` (4) rounds, so the pool is 10x the final budget of 1,000; after each round a fresh student
is trained on the labels (cross-entropy) plus every soft label bought (KL to the teacher, T = 1) and tested on
the test split (11,760), its correctness on each test row kept for the page's intervals. Pool points, the
teacher's queries and the student's batches are token ids (0 = padding) in length buckets, the student's
batches grouped by length.

Students (arg `student`; Adam, lr 3e-3, 600 steps of 64 a round): cnn (text_cnn; the default), bag (text_bag,
embedding 64, MLP 64), tx_small (transformer_small).

arg: comma-separated key=value: seed (0), student (cnn | bag | tx_small), strategies separated by '+' (default
all five), rounds (4), budget (250), steps (600; student steps a round), m (overall | informative | zero),
labelled (500), validation (1000), split (validation; where labelled, validation and pool points come from),
eval_split (test), teacher_dir (workdirs/wordnet/teacher). The splits and sizes let a test run it small
(tests/test_text_ensemble.py).
Output: WORKDIR/active.json (accuracy vs queries per strategy, per-row test correctness, the full config, the
code revision), WORKDIR/active.png; rerunning the command resumes after the last finished round.
Runtime: about 3 minutes a seed for the five strategies with the cnn student on 2 CPU cores.
Results: docs/results/active_wordnet.md (study `active_wordnet`).
"""

import os

import ml_collections

from titans.active.config import defaults
from titans.config_builders import parse_config_arg

STUDENTS = {
    "bag": ("text_bag", dict(embed_dim=64, hidden=(64,))),
    "cnn": ("text_cnn", {}),
    "tx_small": ("transformer_small", {}),
}
_ARGS = dict(
    seed="0",
    student="cnn",
    strategies="random+margin+entropy+kcenter+robust",
    rounds="4",
    budget="250",
    steps="600",
    m="overall",
    labelled="500",
    validation="1000",
    split="validation",
    eval_split="test",
    teacher_dir="workdirs/wordnet/teacher",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(arg, _ARGS, "active_wordnet.py")
    if a["student"] not in STUDENTS:
        raise ValueError(f"student={a['student']!r}: expected one of {sorted(STUDENTS)}.")
    c = defaults()
    c.name = f"active_wordnet_{a['student']}"
    c.seed = int(a["seed"])
    c.dataset.name = "wordnet"
    c.dataset.split = a["split"]
    c.dataset.eval_split = a["eval_split"]
    c.active.strategies = a["strategies"].replace("+", ",")
    c.active.num_labelled = int(a["labelled"])
    c.active.num_validation = int(a["validation"])
    c.active.rounds = int(a["rounds"])
    c.active.budget_per_round = int(a["budget"])
    c.active.predict_batch_size = 512
    c.active.m_estimate = a["m"]

    model, kwargs = STUDENTS[a["student"]]
    s = c.student
    s.dataset.name = "wordnet"
    s.dataset.group_by_length = 8  # sort windows of 8 batches by length: most batches in a short bucket
    s.model.name = model
    s.model.kwargs = ml_collections.ConfigDict(kwargs)
    s.batch_size = 64
    s.eval_batch_size = 512
    s.total_steps = int(a["steps"])
    s.optimizer.name = "adam"
    s.optimizer.learning_rate = 3e-3
    s.distill.loss = "kd"
    s.distill.temperature = 1.0

    c.teacher.workdir = os.path.abspath(a["teacher_dir"])
    return c
