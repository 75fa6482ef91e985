"""Command line: `python -m titans.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=V ...]`.

Only parses flags; everything else is `titans.experiment.run_experiment(config, workdir)`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from titans import config as config_lib
from titans import experiment, logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results (resumed if present).")
flags.mark_flags_as_required(["config", "workdir"])


def _precheck_overrides(argv: list[str]) -> None:
    """Names an unknown `--config.X=...` field and its close matches before absl's traceback would."""
    cfg_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not cfg_arg or not overrides:
        return
    try:
        config = config_lib.load_config_file(cfg_arg)
    except Exception:  # a broken config file: let absl report it in full
        return
    for name in overrides:
        try:
            config_lib.check_override(config, name)
        except config_lib.ConfigError as e:
            sys.exit(f"error: {e}")


def main(argv):
    del argv
    logs.setup_cli_logging()
    try:
        config = config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    out = experiment.run_experiment(config, _WORKDIR.value)
    if out.get("preempted") or not logs.is_writer():
        return
    table = experiment.final_summary(out, config.get("name", "run"))
    if table:
        print("\n" + table, flush=True)


def cli():
    _precheck_overrides(sys.argv[1:])
    logs.run_cli(lambda: app.run(main))


if __name__ == "__main__":
    cli()
