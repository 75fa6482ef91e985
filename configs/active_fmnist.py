"""Robust active distillation on Fashion-MNIST (offline, CPU): accuracy vs teacher queries per strategy.

    TFDS_DATA_DIR=/tmp/tfds_dev python -m titans.active.main \
        --config=configs/active_fmnist.py:teacher=good,seed=0 --workdir=workdirs/active_fmnist/good/seed0

Data: train[90%:] (6,000 images, unseen by both teachers) is cut, with `seed`, into 200 labelled
images, a labelled validation split of 1,000 (used only to estimate the teacher's mistakes m for
the robust selection) and an unlabelled pool of 4,800. Each strategy (random, margin, entropy,
kcenter, robust) buys `budget` teacher soft labels a round for `rounds` rounds; after each round a
fresh MLP student (784-256-10, Adam, 400 steps of 64) is trained on the 200 labels (cross-entropy)
plus every soft label bought (KL to the teacher, T=1) and tested on the 10,000 test images.

Teachers (arg `teacher`):
  good       the CNN of configs/titans_fmnist.py trained on train[:90%] (about 91.4% test), read from
             workdirs/titans_fmnist/seed{seed}/teacher (override with teacher_dir=PATH);
  imperfect  the same CNN trained here (WORKDIR/teacher) on train[:5%] (3,000 images) for 300 steps
             with 30% of its labels moved to a wrong class (about 80% test accuracy); like the good
             teacher, it is wrong about twice as often on the points that margin selection buys
             as on random ones (teacher_error_bought in active.json).

arg: comma-separated key=value: teacher (good | imperfect), seed (0), strategies separated by '+'
(default all five), rounds (4), budget (250), noise (0.3), teacher_dir (the good teacher's run; for
teacher=imperfect, where its teacher lives or is trained), m (how the
robust selection estimates the teacher's mistakes: overall, informative, or zero for the m = 0 ablation),
labelled (200) and validation (1000): how many of the split's images are labelled / held for m; the rest
is the pool. The strong-teacher study (docs/results/active_fmnist_strong.md) runs teacher=good with the
ResNet-20 of configs/fmnist_strong_teacher.py as teacher_dir, validation=500, rounds=10, budget=500:
budgets up to 5,000 of a 5,300-image pool.
Output: WORKDIR/active.json (accuracy vs queries per strategy), WORKDIR/active.png; rerunning the
command resumes after the last finished round.
Runtime: about 3 minutes a seed on 2 idle CPU cores (up to 8 when they are shared), +1-2 minutes to
train the imperfect teacher. Expected (docs/results/active_fmnist.md): the student goes from about 74%
(200 labels) to 80-84% with 1,000 bought soft labels; see that file for which strategy wins with which
teacher.
"""

import os

import ml_collections

from titans.active.config import defaults
from titans.config import load_config_file
from titans.config_builders import parse_config_arg

_HERE = os.path.dirname(__file__)
_ARGS = dict(
    teacher="good",
    seed="0",
    strategies="random,margin,entropy,kcenter,robust",
    rounds="4",
    budget="250",
    noise="0.3",
    teacher_dir="",
    m="overall",
    labelled="200",
    validation="1000",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # Strategies are separated by '+' inside the arg (commas separate the arguments).
    a = parse_config_arg(arg, _ARGS, "active_fmnist.py")
    seed = int(a["seed"])
    c = defaults()
    c.name = f"active_fmnist_{a['teacher']}"
    c.seed = seed
    c.dataset.name = "fashion_mnist"
    c.dataset.split = "train[90%:]"
    c.dataset.eval_split = "test"
    c.active.strategies = a["strategies"].replace("+", ",")
    c.active.num_labelled = int(a["labelled"])
    c.active.num_validation = int(a["validation"])
    c.active.rounds = int(a["rounds"])
    c.active.budget_per_round = int(a["budget"])
    c.active.predict_batch_size = 1000
    c.active.m_estimate = a["m"]

    c.student.model.name = "mlp"
    c.student.model.kwargs = ml_collections.ConfigDict(dict(hidden=(256,)))
    c.student.batch_size = 64
    c.student.eval_batch_size = 1000
    c.student.total_steps = 400
    c.student.optimizer.name = "adam"
    c.student.optimizer.learning_rate = 1e-3
    c.student.distill.loss = "kd"
    c.student.distill.temperature = 1.0

    if a["teacher"] == "good":
        c.teacher.workdir = a["teacher_dir"] or f"workdirs/titans_fmnist/seed{seed}/teacher"
    elif a["teacher"] == "imperfect":
        t = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":3")
        t.name = "imperfect_teacher"
        t.seed = seed
        t.dataset.train_split = "train[:5%]"
        t.total_epochs = 0.0
        t.total_steps = 300
        t.schedule.warmup_steps = 30
        t.checkpoint.every_steps = 300
        # teacher_dir: share one imperfect teacher between runs (e.g. the m ablation reuses the main run's).
        c.teacher.workdir = a["teacher_dir"] or "{workdir}/teacher"
        c.teacher.train = t
        c.teacher.label_noise = float(a["noise"])
    else:
        raise ValueError(f"teacher={a['teacher']!r}: expected 'good' or 'imperfect'.")
    return c
