"""``python -m bench list | run NAME [args] | report``: the one entry point of the benchmark suite."""

from __future__ import annotations

import argparse
import importlib
import sys

from bench import results, suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every bench: what it answers, how long it runs, its figure and target")
    run = commands.add_parser("run", help="run one bench; the arguments after NAME are its own (NAME --help)")
    run.add_argument("name", choices=list(suite.BENCHES))
    run.add_argument("args", nargs=argparse.REMAINDER)
    commands.add_parser(
        "report", help="regenerate docs/benchmarks.md and README.md's what-to-expect table from bench/results/*.json"
    )
    args = parser.parse_args(argv)
    if args.command == "list":
        print(suite.index_markdown(), end="")
    elif args.command == "run":
        bench = importlib.import_module(suite.BENCHES[args.name].module)
        sys.argv = [f"python -m bench run {args.name}", *args.args]
        bench.main()
    else:
        for path in results.write_docs():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
