"""Helpers shared by the test modules (tests/ is on sys.path under pytest's default import mode)."""

import os

from titans import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config(data_dir, **overrides):
    """configs/digits.py made small and synchronous; `overrides` maps dotted field names to values."""
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
    c.dataset.data_dir = data_dir
    c.total_steps = 40
    c.log_every_steps = 10
    c.checkpoint.every_steps = 20
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c
