"""The command line of every Titans console script: one flag style, exit codes, logging.

Every entry point parses its flags with argparse, `--snake_case` names, `--name=value` or `--name value`
(`parser()`): `--help` prints the flags and exits 0; an unknown flag or a bad value prints one line naming it
and exits 2, before anything else runs. The run configs' commands (`titans-train`, `titans-active`) take
`--config=FILE.py[:ARG]` and any number of `--config.FIELD=VALUE` overrides (`config_arguments()`,
`parse_with_overrides()`, `load_config()`), each value parsed by its field's type as ml_collections'
`config_flags` does, in a flag registry of their own: importing a CLI module defines no global flags.

This module imports nothing heavy (no JAX), so that a training command can parse its flags and re-execute
itself under jemalloc (`titans.host.apply`) before it imports JAX.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

OVERRIDE_PREFIX = "--config."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the error on one line: `PROG: error: MESSAGE (PROG --help lists the flags)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


def parser(prog: str, doc: str | None) -> ArgumentParser:
    """A console script's parser: its description is the first paragraph of the module's docstring; no
    abbreviated flags (`--work` is not `--workdir`)."""
    description = (doc or "").strip().split("\n\n")[0]
    return ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def config_arguments(p: argparse.ArgumentParser, config_help: str, workdir_help: str) -> None:
    """`--config=FILE.py[:ARG]` and `--workdir=DIR`, both required; `--config.FIELD=VALUE` described."""
    p.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help=config_help)
    p.add_argument("--workdir", required=True, metavar="DIR", help=workdir_help)
    p.epilog = (
        f"{OVERRIDE_PREFIX}FIELD=VALUE (repeatable) overrides a field of the config, parsed by the field's type, "
        f"e.g. {OVERRIDE_PREFIX}optimizer.learning_rate=0.1 or {OVERRIDE_PREFIX}model.kwargs.channels='(8,16)'."
    )


def parse_with_overrides(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`p`'s flags (`config_arguments`), and `args.overrides`: the `--config.FIELD=VALUE` arguments in their
    order. Any other unknown argument, or a config file that does not exist, is an error (exit 2)."""
    args, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    extra = [a for a in extra if a != "--"]
    bad = [a for a in extra if not a.startswith(OVERRIDE_PREFIX)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    no_value = [a for a in extra if "=" not in a]
    if no_value:
        p.error(f"{no_value[0]}: an override needs a value ({OVERRIDE_PREFIX}FIELD=VALUE)")
    try:
        check_config_file(args.config)
    except ValueError as e:
        p.error(str(e))
    args.overrides = extra
    return args


def override_fields(overrides: list[str]) -> list[str]:
    """The dotted field names of `--config.FIELD=VALUE` arguments."""
    return [a[len(OVERRIDE_PREFIX) :].split("=", 1)[0] for a in overrides]


def check_config_file(spec: str) -> None:
    """Raises ValueError when the file of `--config=FILE.py[:ARG]` does not exist."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise ValueError(f"--config={spec}: no such file {path!r}")


def load_config(spec: str, overrides: list[str]):
    """The ConfigDict of `--config=spec` with `overrides` applied (locked, as absl's config flag left it).
    Raises ValueError naming the file or the override."""
    check_config_file(spec)
    argv = ["titans", f"--config={spec}", *overrides]
    registry = flags.FlagValues()  # not absl's global FLAGS
    holder = config_flags.DEFINE_config_file(
        "config", None, "the config file", flag_values=registry, lock_config=True, sys_argv=argv
    )
    try:
        registry(argv)
        return holder.value
    except (flags.Error, AttributeError, KeyError) as e:
        raise ValueError(f"--config={spec} {' '.join(overrides)}: {e}") from None


def setup_logging() -> None:
    """What a command-line tool shows: Titans' INFO messages (resumed, finished, skipped ...) on
    stderr; orbax's and absl's own INFO chatter hidden."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def run(entry) -> None:
    """Runs a CLI's `entry()` and ends the process with its exit code (None or 0: 0; a string: printed, 1).

    A failure ends the process at once (os._exit after flushing), so that threads a library left
    behind (orbax's background save threads after a failed write wait forever for a signal) cannot
    keep a failed job alive until its scheduler's time limit. A success exits normally."""
    try:
        code = entry()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = int(code or 0)
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
