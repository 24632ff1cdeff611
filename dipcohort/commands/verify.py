"""`dipcohort verify STORE [--repair]`: read back every finished job against its checksum; name the damaged ones."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check every finished job's data against its checksum",
                              description=__doc__.splitlines()[0],
                              epilog="exit status: 0 when every job checks out (or --repair marked the damaged "
                                     "ones for rerun), 1 when some job's data are missing or damaged, 2 for a "
                                     "store that cannot be opened")
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--repair", action="store_true",
                   help="mark the damaged jobs pending (attempts kept) so the next `dipcohort run` redoes exactly them")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.verify import repair, verify_store

    result = verify_store(args.store)      # StoreError: one line, exit 2
    for d in result.damaged:
        print(f"damaged: job {d.job_id} ({d.label})")
        for problem in d.problems:
            print(f"  {problem}")
    n = len(result.damaged)
    print(f"{args.store}: {result.checked} finished jobs read back, {n} job(s) with missing or damaged data or "
          f"ledger entries")
    if not n:
        return 0
    if not args.repair:
        print(f"run `dipcohort verify {args.store} --repair`, then `dipcohort run` with the same manifest and --out "
              f"to redo them")
        return 1
    repair(args.store, result.damaged)
    print(f"marked {n} job(s) pending; `dipcohort run` with the same manifest and --out redoes exactly them")
    return 0
