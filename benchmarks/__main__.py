"""python -m benchmarks list | run NAME [flags] | report [--check]  (`--help` on each)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import harness, report


def run_parser(sub, bench: harness.Benchmark) -> None:
    p = sub.add_parser(
        bench.name,
        help=bench.doc.split("\n")[0],
        description=bench.doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds kept (each times every side once), >= 1")
    p.add_argument(
        "--max_steal",
        type=float,
        default=harness.MAX_STEAL_S,
        help="a round in which the hypervisor took more CPU seconds than this is kept in the record but left out "
        "of the ratios and replaced; negative: keep every round",
    )
    p.add_argument("--results_dir", default=harness.RESULTS, help="where the record goes: DIR/NAME/DEVICE.json")
    for a in bench.args:
        if a.type is bool:
            p.add_argument(f"--{a.name}", action="store_true", help=a.help)
        else:
            p.add_argument(f"--{a.name}", type=a.type, default=a.default, choices=a.choices, help=a.help)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=harness.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, help="what to do")
    sub.add_parser("list", help="the registered benchmarks, one a line")
    run = sub.add_parser("run", help="run one benchmark and write its record")
    names = run.add_subparsers(dest="name", required=True, metavar="NAME", help="the benchmark (`list` names them)")
    for bench in harness.load_all().values():
        run_parser(names, bench)
    rep = sub.add_parser("report", help="regenerate docs/benchmarks.md from the records")
    rep.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page differs")
    rep.add_argument("--results_dir", default=harness.RESULTS, help="the records' folder")
    rep.add_argument("--page", default=report.PAGE, help="the page to write or check")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    if args.command == "list":
        for name, bench in harness.load_all().items():
            print(f"{name}: {bench.doc.split(chr(10))[0]}")
        return 0
    if args.command == "report":
        return report.main(args.check, args.results_dir, args.page)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    record, path = harness.run(args.name, args, argv[2:])
    print(report.record_section(record)[0])
    print("\n".join(report.record_section(record)[2:]))
    print(f"\nwrote {path}")
    return 0 if not record["verdict"].startswith("not a result") else 3


if __name__ == "__main__":
    sys.exit(main())
