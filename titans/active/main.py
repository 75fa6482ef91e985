"""Command line: `python -m titans.active.main --config=configs/active_NAME.py[:ARG] --workdir=DIR`.

Runs every strategy of the config's active loop (resuming finished rounds) and writes
WORKDIR/active.json and WORKDIR/active.png. `--config.FIELD=V` overrides fields.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from titans import config as config_lib
from titans import logs
from titans.active import config as active_config
from titans.active import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Active config file, e.g. configs/active_fmnist.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for rounds, results and the plot (resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logs.setup_cli_logging()
    try:
        config = active_config.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    out = loop.run_active(config, _WORKDIR.value)
    for name, r in out["strategies"].items():
        print(f"{name:>8}: " + "  ".join(f"{q}:{a:.4f}" for q, a in zip(r["queries"], r["accuracy"])), flush=True)


def cli():
    logs.run_cli(lambda: app.run(main))


if __name__ == "__main__":
    cli()
