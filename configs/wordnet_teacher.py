"""The text teacher: a Transformer encoder (4 layers x 256 wide x 4 heads, pre-LayerNorm) on WordNet
supersenses (45 classes, docs/text.md), trained from scratch.

    titans-train --config=configs/wordnet_teacher.py --workdir=workdirs/wordnet_teacher

arg: epochs (default 6). AdamW, lr 1e-3 with a 1-epoch warm-up then cosine, weight decay 0.05, batch 128,
dropout 0.1; train on `train`, evaluate on `validation` (the test split is for the studies).
Runtime: about 250 training examples a second on 2 CPU cores with batches grouped by length (6-7 minutes an
epoch, 4 minutes per evaluation of the validation split), so about 45 minutes for the 6 epochs; minutes on one GPU
(bfloat16 compute with dtype "auto"). Resumable: rerun the same command.
Target: the TF-IDF + logistic-regression reference plus 3 points of test accuracy (docs/results/wordnet_teacher.md).
Result: docs/results/wordnet_teacher.md (the test accuracy against the reference, seed 0).
"""

import ml_collections

from titans.config import base_config


def get_config(arg: str = "6") -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "wordnet_teacher"
    c.dataset.name = "wordnet"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.group_by_length = 64  # batches of similar length: 5x the examples a second of random batches
    c.model.name = "transformer"
    c.model.kwargs = ml_collections.ConfigDict(dict(dropout=0.1))
    c.dtype = "auto"
    c.batch_size = 128
    c.eval_batch_size = 512
    c.total_epochs = float(arg)
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    c.log_every_steps = 100
    c.eval_every_steps = 100_000  # the validation split at the end only (4 minutes on 2 cores)
    c.checkpoint.every_steps = 500
    return c
