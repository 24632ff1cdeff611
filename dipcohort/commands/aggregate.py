"""`dipcohort aggregate STORE`: cohort statistics and a compact copy, into the store's `aggregate` group."""
from __future__ import annotations

import argparse
import json
import time

from pipeline.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="per task × solver statistics of a results store (Dask)",
                              description=__doc__.splitlines()[0])
    p.add_argument("store", help="results store written by `dipcohort run`")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: all CPUs)")
    p.add_argument("--scheduler", choices=("threads", "processes", "synchronous"), default=None,
                   help="Dask scheduler (default: processes from 2,000 jobs on, threads below)")
    p.add_argument("--dask", metavar="SPEC", default=None,
                   help="run on a Dask cluster: tcp://HOST:PORT (a running scheduler), local:N (a LocalCluster of "
                        "N processes) or slurm[:N] (N Slurm jobs via dask-jobqueue); the workers must see the store")
    p.add_argument("--full", action="store_true",
                   help="rebuild the compact copy from scratch (default: copy only jobs that ran since)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.aggregate import aggregate
    from pipeline.report import print_table, table_rows, wide_console
    from pipeline.store import StoreError

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.dask is not None and (args.scheduler or args.workers):
        raise UsageError("--dask runs on the cluster's workers: give it without --scheduler / --workers")
    t0 = time.perf_counter()
    try:
        if args.dask is None:
            ds = aggregate(args.store, workers=args.workers, scheduler=args.scheduler, full=args.full)
        else:
            ds = _on_cluster(args.store, args.dask, args.full)
    except StoreError as err:
        raise UsageError(str(err)) from None
    counted = int(ds.n_done.sum() + ds.n_diverged.sum())
    print(f"wrote {args.store}/aggregate in {time.perf_counter() - t0:.1f} s: statistics of {counted} of "
          f"{int(ds.n_jobs.sum())} jobs (done and diverged) in {ds.sizes['group']} task × solver groups over "
          f"{ds.sizes['step']} steps; compact copy: {_compaction(json.loads(ds.attrs['compaction']))}")
    unfinished = int(ds.n_unfinished.sum())
    if unfinished:
        print(f"note: {unfinished} jobs are pending or running; aggregate again when they finish")
    columns = ("Task", "Solver", "Jobs", "Final PSNR", "Final SSIM", "Onset step")
    print_table(table_rows(ds), wide_console(), columns=columns)
    return 0


def _compaction(info: dict) -> str:
    if info["mode"] == "full":
        return f"all {info['job_blocks']} blocks of jobs copied"
    return f"{info['job_blocks_copied']} of {info['job_blocks']} blocks of jobs copied again (jobs ran since)"


def _on_cluster(store: str, spec: str, full: bool):
    from pipeline import dask_cluster
    from pipeline.aggregate import aggregate
    from pipeline.store import open_store

    dask_cluster.parse(spec)            # a bad --dask is refused before anything starts
    open_store(store)
    with dask_cluster.connect(spec, store) as client:
        workers = len(client.scheduler_info().get("workers", {}))
        link = dask_cluster.dashboard_link(client)
        link = f"; dashboard {link}" if link else ""
        print(f"Dask cluster {client.scheduler.address}: {workers} workers{link}", flush=True)
        return aggregate(store, client=client, full=full)
