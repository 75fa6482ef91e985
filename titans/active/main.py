"""Runs active distillation: every strategy of an active config's loop, resuming finished rounds.

    titans-active --config=configs/active_NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

(= `python -m titans.active.main`.) Writes WORKDIR/active.json and WORKDIR/active.png.
"""

from __future__ import annotations

import sys

from titans import cli as cli_lib
from titans import host


def parser() -> cli_lib.ArgumentParser:
    p = cli_lib.parser("titans-active", __doc__)
    cli_lib.config_arguments(
        p,
        "active config file and its argument, e.g. configs/active_fmnist.py",
        "directory for rounds, results and the plot (resumed if present)",
    )
    return p


def main(args) -> None:
    # Deferred so that `cli()` re-executes the process under jemalloc (titans.host) before JAX is imported.
    from titans import config as config_lib  # noqa: PLC0415  (deferred: JAX after the jemalloc re-execution)
    from titans.active import config as active_config  # noqa: PLC0415  (deferred: JAX after the jemalloc re-execution)
    from titans.active import loop  # noqa: PLC0415  (deferred: JAX after the jemalloc re-execution)

    cli_lib.setup_logging()
    try:
        config = cli_lib.load_config(args.config, args.overrides)
    except ValueError as e:
        parser().error(str(e))
    try:
        config = active_config.validate(config)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    out = loop.run_active(config, args.workdir)
    for name, r in out["strategies"].items():
        print(f"{name:>8}: " + "  ".join(f"{q}:{a:.4f}" for q, a in zip(r["queries"], r["accuracy"])), flush=True)


def cli(argv: list[str] | None = None) -> None:
    args = cli_lib.parse_with_overrides(parser(), argv)  # --help and a bad flag exit here, the process untouched
    host.apply(jemalloc=True)
    cli_lib.run(lambda: main(args))


if __name__ == "__main__":
    cli(sys.argv[1:])
