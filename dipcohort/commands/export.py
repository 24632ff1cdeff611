"""`dipcohort export STORE --format FMT --out DIR`: reconstructions as NIfTI, DICOM, PNG, TIFF or NPY files."""
from __future__ import annotations

import argparse

from pipeline.export import FORMATS, IMAGES


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write reconstructions as nifti / dicom / png / tiff / npy files",
                              description=__doc__.splitlines()[0])
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--format", required=True, choices=FORMATS, help="file format (one file per job)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--scans", nargs="+", default=None, metavar="SCAN_ID", help="only these scans (default: all)")
    p.add_argument("--solvers", nargs="+", default=None, metavar="SOLVER", help="only these solvers (default: all)")
    p.add_argument("--image", default="final", choices=IMAGES,
                   help="which image: final (what the method returns), early_stopped (ES-WMV) or ema")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import UsageError
    from pipeline.export import export
    from pipeline.store import StoreError

    try:
        paths = export(args.store, args.out, args.format, scans=args.scans, solvers=args.solvers, image=args.image)
    except StoreError as err:
        raise UsageError(str(err)) from None
    print(f"{len(paths)} file(s) written to {args.out}")
    return 0
