"""dipcohort: untrained-network reconstruction (DIP, aSeqDIP, ...) over cohorts of scans.

One module per subcommand under `dipcohort.commands`.

Each command module defines `register(subparsers)` (adds its parser, sets `func`) and its
`func(args) -> int`. Bad arguments exit with code 2 and a message naming what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import UsageError

COMMANDS = ("recon", "run", "status", "verify", "aggregate", "report", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dipcohort", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dipcohort.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"dipcohort.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"dipcohort {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
