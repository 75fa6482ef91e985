"""Trains one run, or a pipeline of runs, from a config file.

    titans-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

(= `python -m titans.main`.) Parses the flags, applies the CPU process settings (`titans.host`), then runs
`titans.experiment.run_experiment(config, workdir)`.
"""

from __future__ import annotations

import sys

from titans import cli as cli_lib
from titans import host


def parser() -> cli_lib.ArgumentParser:
    p = cli_lib.parser("titans-train", __doc__)
    cli_lib.config_arguments(
        p,
        "experiment config file and its argument, e.g. configs/quickstart.py:0.3",
        "directory for checkpoints, metrics and results (resumed if present)",
    )
    return p


def main(args) -> None:
    # Deferred so that `cli()` re-executes the process under jemalloc (titans.host) before JAX is imported.
    from titans import config as config_lib  # noqa: PLC0415  (deferred: JAX after the jemalloc re-execution)
    from titans import experiment, logs  # noqa: PLC0415  (deferred: JAX after the jemalloc re-execution)

    cli_lib.setup_logging()
    try:  # the flags: an unknown field is named with its close matches; exit 2
        base = config_lib.load_config_file(args.config) if args.overrides else None
        for name in cli_lib.override_fields(args.overrides):
            config_lib.check_override(base, name)
        config = cli_lib.load_config(args.config, args.overrides)
    except (config_lib.ConfigError, ValueError) as e:
        parser().error(str(e))
    try:  # the config's values: exit 1
        config = config_lib.validate(config)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    out = experiment.run_experiment(config, args.workdir)
    if out.get("preempted") or not logs.is_writer():
        return
    table = experiment.final_summary(out, config.get("name", "run"))
    if table:
        print("\n" + table, flush=True)


def cli(argv: list[str] | None = None) -> None:
    args = cli_lib.parse_with_overrides(parser(), argv)  # --help and a bad flag exit here, the process untouched
    host.apply(jemalloc=True)
    cli_lib.run(lambda: main(args))


if __name__ == "__main__":
    cli(sys.argv[1:])
