"""`dipcohort` command line: one module per subcommand under `pipeline.commands`.

Each command module defines `register(subparsers)` (adds its parser, sets `func`) and its
`func(args) -> int`. Bad arguments exit with code 2 and a message naming what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("recon", "run", "status", "aggregate", "report", "demo")


class UsageError(Exception):
    """Invalid user input (arguments, manifest, scan file): printed and exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dipcohort", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pipeline.commands.{name}":
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
    # `python -m pipeline.cli`: run the imported module's main so that commands' UsageError
    # (pipeline.cli.UsageError) is the class caught here, not a copy in __main__
    from pipeline.cli import main as _main

    sys.exit(_main())
