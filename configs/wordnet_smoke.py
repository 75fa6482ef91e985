"""Smoke test of the text pipeline: a bag of embeddings on 2,000 WordNet synsets, a few dozen steps.

    python -m titans.main --config=configs/wordnet_smoke.py --workdir=workdirs/wordnet_smoke

The dataset (`wordnet`, docs/text.md) is prepared on first use from Debian's `wordnet-base` files (about a
minute, once per data_dir). Token ids reach the model in length buckets of 16/32/64/128.
Runtime: about 10 s on 2 CPU cores after preparation, most of it compilation (one program per bucket).
Expected: about 40% accuracy on validation[:1000] (the largest class, noun.act, is 12%).
"""

import ml_collections

from titans.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = base_config()
    c.name = "wordnet_smoke"
    c.dataset.name = "wordnet"
    c.dataset.train_split = "train[:2000]"
    c.dataset.eval_split = "validation[:1000]"
    c.model.name = "text_bag"
    c.model.kwargs = ml_collections.ConfigDict(dict(embed_dim=32, hidden=(32,)))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = 60
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 0.1
    c.log_every_steps = 20
    c.checkpoint.every_steps = 30
    return c
