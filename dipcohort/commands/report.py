"""`dipcohort report STORE --out DIR`: the Table-2-style table, PSNR/SSIM curves, a montage and index.html."""
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
    p.add_argument("--page-jobs", type=int, default=None, metavar="N",
                   help="most jobs the page's image viewer holds (default 400; thumbnails of 128 px)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dipcohort.commands.run import check_out
    from pipeline.report import report
    from pipeline.store import StoreError

    check_out(args.out)
    if not Path(args.store).is_dir():
        raise UsageError(f"{args.store}: no such results store (expected the --out directory of `dipcohort run`)")
    if args.page_jobs is not None and args.page_jobs < 0:
        raise UsageError(f"--page-jobs must be >= 0, got {args.page_jobs}")
    try:
        paths = report(args.store, args.out, scans=args.scans, page_jobs=args.page_jobs)
    except (StoreError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    print(f"wrote {paths['table_csv']}, {paths['table_md'].name}, {paths['montage'].name}, "
          f"{', '.join(p.name for p in paths['curves'])} and {paths['page'].name}")
    return 0
