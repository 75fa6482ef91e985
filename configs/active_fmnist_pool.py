"""Robust active distillation where it should show: a large pool and a teacher whose mistakes sit on the
points an uncertainty selection buys (Fashion-MNIST, offline, CPU).

    export TFDS_DATA_DIR=/tmp/tfds
    A=workdirs/active_fmnist_pool
    for s in 0 1 2; do
      python -m titans.active.main --config=configs/active_fmnist_pool.py:teacher=confused,seed=$s \
          --workdir=$A/confused/seed$s
      python -m titans.active.main --config=configs/active_fmnist_pool.py:teacher=confused,seed=$s,m=informative,strategies=robust,teacher_dir=$A/confused/seed$s/teacher \
          --workdir=$A/confused_minformative/seed$s
      python -m titans.active.main --config=configs/active_fmnist_pool.py:teacher=clean,seed=$s \
          --workdir=$A/clean/seed$s
    done
    python -m titans.active.report --runs "confused=$A/confused/seed*" --runs "clean=$A/clean/seed*"

Data: train[50%:] (30,000 images, unseen by the teacher) is cut, with `seed`, into 200 labelled images, a
labelled validation split of 1,000 (used only to estimate the teacher's mistakes m for the robust
selection) and an unlabelled pool of 28,800: 14 times the final budget of 2,000 (4 rounds of 500), so a
strategy's choice matters up to the last round (in configs/active_fmnist.py the budget buys most of the pool).
Each strategy (random, margin, entropy, kcenter, robust) trains, after each round, a fresh MLP student
(784-256-10, Adam, 400 steps of 64) on the 200 labels (cross-entropy) plus every bought soft label (KL to
the teacher, T=1), tested on the 10,000 test images.

Teachers (arg `teacher`), both the CNN of configs/fmnist_teacher.py (3 epochs) trained here
(WORKDIR/teacher, or teacher_dir) on train[:50%], disjoint from the pool:
  confused  with `noise` (0.35) of the labels of shirt, pullover and coat (`classes`, 6+2+4) moved to the
            next class of that list (shirt -> pullover -> coat -> shirt; teacher.noise_classes). The most
            confusable classes get a systematically shifted teacher: wrong mostly on their ambiguous images,
            which are also where the student is least sure, so margin and entropy buy its mistakes;
  clean     the same teacher without label noise (the control).

arg: comma-separated key=value: teacher (confused | clean), seed (0), strategies separated by '+' (default
all five), rounds (4), budget (500), noise (0.35), classes (6+2+4), teacher_dir (a teacher to reuse or
train there), m (overall | informative | zero), labelled (200), validation (1000).
Output: WORKDIR/active.json (accuracy vs queries per strategy, the full config, the code revision),
WORKDIR/active.png; rerunning the command resumes after the last finished round.
Runtime (estimated, not yet measured): about 2 minutes to train a teacher and 5-8 minutes a seed for the
five strategies on the 2-core CPU. Results: pending (no run made yet). What the study tests: with the
confused teacher, the teacher's error on what margin buys (teacher_error_bought) should be several times
its error on the validation split, and robust selection (m from the validation split, and m=informative)
should beat margin at the same budget; with the clean teacher the two should be close.
"""

import os

import ml_collections

from titans.config import load_config_file
from titans.config_builders import parse_config_arg

_HERE = os.path.dirname(__file__)
_ARGS = dict(
    teacher="confused",
    seed="0",
    strategies="random+margin+entropy+kcenter+robust",
    rounds="4",
    budget="500",
    noise="0.35",
    classes="6+2+4",
    teacher_dir="",
    m="overall",
    labelled="200",
    validation="1000",
)
POOL_SPLIT = "train[50%:]"
TEACHER_SPLIT = "train[:50%]"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(arg, _ARGS, "active_fmnist_pool.py")
    if a["teacher"] not in ("confused", "clean"):
        raise ValueError(f"teacher={a['teacher']!r}: expected 'confused' or 'clean'.")
    seed = int(a["seed"])
    shared = ",".join(f"{k}={a[k]}" for k in ("seed", "strategies", "rounds", "budget", "m", "labelled", "validation"))
    c = load_config_file(os.path.join(_HERE, "active_fmnist.py") + f":teacher=good,teacher_dir=unused,{shared}")
    c.name = f"active_fmnist_pool_{a['teacher']}"
    c.dataset.split = POOL_SPLIT

    t = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":3")
    t.name = f"{a['teacher']}_teacher"
    t.seed = seed
    t.dataset.train_split = TEACHER_SPLIT
    c.teacher.workdir = a["teacher_dir"] or "{workdir}/teacher"
    c.teacher.train = t
    if a["teacher"] == "confused":
        c.teacher.label_noise = float(a["noise"])
        c.teacher.noise_classes = a["classes"].replace("+", ",")
    return c
