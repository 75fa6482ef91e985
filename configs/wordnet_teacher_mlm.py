"""The text teacher with a masked-LM stage: the Transformer of configs/wordnet_teacher.py first pre-trained to
recover masked tokens of the training glosses (their labels unread), then fine-tuned on the supersenses.

    titans-train --config=configs/wordnet_teacher_mlm.py --workdir=workdirs/wordnet_teacher_mlm

arg: "P,F" epochs of pre-training and of fine-tuning (default "3,3"). Stages, in WORKDIR/<stage>:
- `pretrain` (`mlm.enabled`, titans/models/mlm.py): 15% of each row's tokens chosen (80% masked, 10% random,
  10% kept) and predicted through a vocabulary head; AdamW lr 1e-3, 0.5-epoch warm-up, cosine; its result is
  the masked tokens' accuracy on the validation split.
- `teacher`: the same model (4 x 256 x 4 heads, dropout 0.1) started from the pre-trained encoder
  (`init_from="@pretrain"`; a fresh classifier), AdamW lr 5e-4, 0.3-epoch warm-up, cosine; evaluated on
  `validation` (the test split is for the studies).
Both read only the `train` split. Runtime on 2 CPU cores: about 9 minutes an epoch of either stage (under an hour in all). Resumable: rerun the same
command. The teacher's test accuracy against the TF-IDF reference: `titans-results text-teacher
--teacher_workdir=WORKDIR/teacher ...` (docs/results/wordnet_teacher.md).
"""

import os

import ml_collections

from titans.config import load_config_file


def _stage(name: str, epochs: float, lr: float, warmup: float) -> ml_collections.ConfigDict:
    """configs/wordnet_teacher.py's run with its own name, epochs, learning rate and warm-up."""
    c = load_config_file(os.path.join(os.path.dirname(__file__), "wordnet_teacher.py") + f":{epochs}")
    c.name = name
    c.optimizer.learning_rate = lr
    c.schedule.warmup_epochs = warmup
    return c


def get_config(arg: str = "3,3") -> ml_collections.ConfigDict:
    pre, fine = (float(x) for x in arg.split(","))
    pretrain = _stage("wordnet_mlm", pre, 1e-3, 0.5)
    pretrain.mlm.enabled = True
    teacher = _stage("wordnet_teacher_mlm", fine, 5e-4, 0.3)
    teacher.init_from = "@pretrain"
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict({"pretrain": pretrain, "teacher": teacher})
    c.stage_order = ("pretrain", "teacher")
    return c
