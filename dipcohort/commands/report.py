"""`dipcohort report STORE --out DIR`: the Table-2-style table, PSNR/SSIM curves and a montage."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="table, curves and montage of a results store",
                              description=__doc__.splitlines()[0])
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--out", required=True, help="directory for table.csv, table.md and the PNG plots")
    p.add_argument("--scans", nargs="+", metavar="ID", help="scans shown in the montage (default: 2 per task)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dipcohort.commands.run import check_out
    from pipeline.report import report
    from pipeline.store import StoreError

    check_out(args.out)
    if not Path(args.store).is_dir():
        raise UsageError(f"{args.store}: no such results store (expected the --out directory of `dipcohort run`)")
    try:
        paths = report(args.store, args.out, scans=args.scans)
    except (StoreError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    print(f"wrote {paths['table_csv']}, {paths['table_md'].name}, {paths['montage'].name} and "
          f"{', '.join(p.name for p in paths['curves'])}")
    return 0
