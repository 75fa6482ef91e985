"""`titans-export` / `python -m titans.export`: a cascade at an operating point -> an export directory.

    titans-export --stages=W/tiny_standard,W/teacher --gate=msp --rates=0.3 --val_split='train[90%:]' --out=DIR

See titans/export/__init__.py for what the directory holds. Exit codes: 0 written; 2 refused before anything
was written (a usage error, an unfinished stage run without --allow_unfinished, the output directory
locked by another export, whose holder the message names); 1 any other failure.
"""

from __future__ import annotations

import json
import sys

from titans import cli as cli_lib
from titans import host, locks, logs
from titans.export import UnfinishedRunError, export_cascade


def main(argv=None) -> int:
    p = cli_lib.parser("titans-export", __doc__)
    p.add_argument("--stages", required=True, help="run directories, cheapest first, comma-separated")
    p.add_argument("--gate", default="msp", help="gate of every non-final stage: msp, margin, entropy, defer_output")
    p.add_argument(
        "--rates",
        default="0.3",
        help="per non-final stage, the fraction of the validation examples "
        "reaching it to defer (the operating point), comma-separated",
    )
    p.add_argument("--val_split", default="train[90%%:]", help="split on which the thresholds are chosen")
    p.add_argument("--out", required=True, help="the export directory")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument(
        "--allow_unfinished",
        action="store_true",
        help="export stage runs that have not finished training (recorded in the manifest)",
    )
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup_cli_logging()
    try:
        m = export_cascade(
            a.stages.split(","),
            a.gate,
            a.rates.split(","),
            a.val_split,
            a.out,
            a.batch_size,
            allow_unfinished=a.allow_unfinished,
        )
    except (UnfinishedRunError, locks.WorkdirLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: m[k] for k in ("thresholds", "val_accuracy", "val_answered_fraction", "platforms")}))
    return 0


def cli():
    host.apply()
    cli_lib.run(main)


if __name__ == "__main__":
    cli()
