"""`dipcohort status STORE`: counts per status and per solver, failed jobs with error and log."""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import UsageError
from pipeline.jobs import STATUS_CODES


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="progress of a results store: counts, failed jobs and their logs",
                              description=__doc__.splitlines()[0])
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--all-failed", action="store_true", help="list every failed job (default: the first 20)")
    p.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                   help="refresh counts, throughput, ETA and the latest failures every SECONDS (default 5) "
                        "until no job is left to run")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.store import StoreError, open_store

    try:
        root = open_store(args.store)
    except StoreError as err:
        raise UsageError(str(err)) from None
    if args.watch is not None:
        from pipeline.watch import watch

        if not args.watch > 0:
            raise UsageError(f"--watch must be > 0 seconds, got {args.watch}")
        watch(args.store, interval=args.watch)
        return 0
    report(root, args.store, limit=None if args.all_failed else 20)
    return 0


def report(root, store_path, limit: int | None = 20, stream=None) -> dict[str, int]:
    """Print counts per status, a solver × status table and the failed jobs; return the counts."""
    from pipeline.store import ledger_table

    stream = stream or sys.stdout
    table = ledger_table(root)
    names = [n for n in STATUS_CODES]
    counts = table["status"].value_counts().to_dict()
    print(f"{store_path}: cohort {root.attrs.get('cohort')!r}, {len(table)} jobs", file=stream)
    print("  " + ", ".join(f"{n} {counts.get(n, 0)}" for n in names), file=stream)
    print("", file=stream)
    per = table.groupby(["solver", "status"]).size().unstack(fill_value=0)
    width = max(len("solver"), *(len(s) for s in per.index))
    print(f"{'solver':<{width}}  " + "  ".join(f"{n:>8}" for n in names), file=stream)
    for solver, row in per.iterrows():
        print(f"{solver:<{width}}  " + "  ".join(f"{int(row.get(n, 0)):>8}" for n in names), file=stream)
    failed = table[table["status"] == "failed"]
    if len(failed):
        print(f"\nfailed jobs ({len(failed)}):", file=stream)
        shown = failed if limit is None else failed.head(limit)
        for _, row in shown.iterrows():
            first = (row["error"] or "").strip().splitlines()[:1]
            print(f"  {row['job_id']}  {row['scan_id']}/{row['solver']}/seed{row['seed']}  attempts {row['attempts']}",
                  file=stream)
            print(f"    error: {first[0] if first else '(no message)'}", file=stream)
            print(f"    log:   {row['log_path']}", file=stream)
        if limit is not None and len(failed) > limit:
            print(f"  ... {len(failed) - limit} more (--all-failed lists them all)", file=stream)
    return {n: int(counts.get(n, 0)) for n in names}
