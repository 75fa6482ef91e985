"""titans-results: collect a run's raw outputs into results/, regenerate docs/results from them."""

from __future__ import annotations

import os
import sys

from titans import cli as cli_lib
from titans.results import studies, text_teacher


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["text-teacher"]:  # its own flags: titans-results text-teacher --help
        return text_teacher.main(argv[1:])
    p = cli_lib.parser("titans-results", __doc__ + "\n\ntitans-results text-teacher --help: the text teacher's record.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy one finished run's raw outputs into results/<study>/<dest>")
    c.add_argument("study", choices=sorted(studies.STUDIES))
    c.add_argument("run_dir")
    c.add_argument("dest", help="e.g. seed0, or good/seed0 for a study with settings")
    r = sub.add_parser("rebuild", help="regenerate docs/results/<study>.md from results/<study>/")
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed page is stale")
    r.add_argument("--only", nargs="*", default=(), choices=sorted(studies.STUDIES))
    r.add_argument("--plots", action="store_true", help="also redraw the figures next to the pages")
    a = p.parse_args(argv)
    if a.command == "collect":
        try:
            written = studies.collect(studies.STUDIES[a.study], a.run_dir, a.dest)
        except studies.CollectError as e:
            print(f"titans-results collect: error: {e}", file=sys.stderr)
            return 2
        for path in written:
            print(f"{path}: {os.path.getsize(path):,} bytes")
        return 0
    changed = studies.rebuild(check=a.check, only=tuple(a.only))
    if a.plots:
        for path in studies.plot_all(only=tuple(a.only)):
            print(f"drew {path}")
    unbacked = studies.unbacked_claims()
    for path, numbers in unbacked.items():
        print(f"{path} states numbers no generated table gives: {', '.join(numbers)}", file=sys.stderr)
    if a.check and changed:
        print("Stale result pages (run `titans-results rebuild` and commit):\n  " + "\n  ".join(changed))
        return 1
    print(("rewrote " if changed else "up to date: no page changed") + ", ".join(changed))
    return 1 if unbacked else 0


if __name__ == "__main__":
    sys.exit(cli())
