"""`dipcohort status STORE`: counts per status and per solver, stale and damaged jobs, failed jobs with error and log.

`--log JOB` prints that job's log: its sections of a log it shares with other jobs (Slurm: one
file per array task), or its own log file."""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.errors import UsageError
from pipeline.jobs import STATUS_CODES


def register(subparsers) -> None:
    from pipeline.store import STALE_AFTER_S

    p = subparsers.add_parser("status", help="progress of a results store: counts, failed jobs and their logs",
                              description=__doc__.splitlines()[0])
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--all-failed", action="store_true", help="list every failed job (default: the first 20)")
    p.add_argument("--stale-after", type=float, default=STALE_AFTER_S / 60, metavar="MINUTES",
                   help="a running job whose worker sent no heartbeat for this long is shown as stale "
                        f"(default {STALE_AFTER_S / 60:g})")
    p.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                   help="refresh counts, throughput, ETA and the latest failures every SECONDS (default 5) "
                        "until no job is left to run")
    p.add_argument("--log", default=None, metavar="JOB",
                   help="print the log of job JOB (a job id, as listed here and in the ledger) and exit")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.store import open_store

    if not args.stale_after > 0:
        raise UsageError(f"--stale-after must be > 0 minutes, got {args.stale_after:g}")
    root = open_store(args.store)           # StoreError: one line, exit 2
    try:
        if args.log is not None:
            return _print_log(args.store, args.log)
        if args.watch is not None:
            from pipeline.watch import watch

            if not args.watch > 0:
                raise UsageError(f"--watch must be > 0 seconds, got {args.watch}")
            watch(args.store, interval=args.watch)
            return 0
        report(root, args.store, limit=None if args.all_failed else 20, stale_after_s=60 * args.stale_after)
        sys.stdout.flush()
    except BrokenPipeError:                 # `status STORE | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_log(store_path, job_id: str) -> int:
    from pipeline.store import job_log_text
    from pipeline.worker import log_section

    text = log_section(job_log_text(store_path, job_id), job_id)  # an unknown job: StoreError, exit 2
    if not text:
        print(f"job {job_id} has written no log yet", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def report(root, store_path, limit: int | None = 20, stream=None, stale_after_s: float | None = None) -> dict[str, int]:
    """Print counts per status (running split into live and stale), a solver × status table, the
    damaged and the failed jobs; return the counts."""
    from pipeline.store import STALE_AFTER_S, heartbeat_age, ledger_table

    stream = stream or sys.stdout
    table = ledger_table(root, store_path)
    names = list(STATUS_CODES) + (["damaged"] if (table["status"] == "damaged").any() else [])
    counts = table["status"].value_counts().to_dict()
    running = table["status"] == "running"
    stale = running & (heartbeat_age(table["heartbeat"].to_numpy()) > (stale_after_s or STALE_AFTER_S))
    print(f"{store_path}: cohort {root.attrs.get('cohort')!r}, {len(table)} jobs", file=stream)
    parts = [f"{n} {counts.get(n, 0)}" + (f" (stale {int(stale.sum())})" if n == "running" and stale.any() else "")
             for n in names]
    print("  " + ", ".join(parts), file=stream)
    if stale.any():
        print(f"  stale: running jobs with no heartbeat for over {(stale_after_s or STALE_AFTER_S) / 60:g} min "
              f"(their worker or driver has probably died; the next `dipcohort run` reruns them)", file=stream)
    print("", file=stream)
    per = table.groupby(["solver", "status"]).size().unstack(fill_value=0)
    width = max(len("solver"), *(len(s) for s in per.index))
    print(f"{'solver':<{width}}  " + "  ".join(f"{n:>8}" for n in names), file=stream)
    for solver, row in per.iterrows():
        print(f"{solver:<{width}}  " + "  ".join(f"{int(row.get(n, 0)):>8}" for n in names), file=stream)
    _damaged(table[table["damaged"] != ""], store_path, stream)
    _failed(table[table["status"] == "failed"], limit, stream)
    return {n: int(counts.get(n, 0)) for n in names}


def _damaged(damaged, store_path, stream) -> None:
    if not len(damaged):
        return
    print(f"\ndamaged ledger entries ({len(damaged)}); `dipcohort verify {store_path} --repair` marks their jobs "
          f"for rerun:", file=stream)
    for _, row in damaged.iterrows():
        print(f"  {row['job_id']}  {row['scan_id']}/{row['solver']}/seed{row['seed']}: {row['damaged']}", file=stream)


def _failed(failed, limit: int | None, stream) -> None:
    if not len(failed):
        return
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
