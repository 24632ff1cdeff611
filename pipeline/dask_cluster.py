"""Dask clusters for `dipcohort aggregate --dask SPEC`.

    tcp://HOST:PORT   an existing dask.distributed scheduler (any address with '://')
    local:N           a LocalCluster of N worker processes (one thread each) on this machine
    slurm[:N]         a dask-jobqueue SLURMCluster: N Slurm jobs (default 2), one worker each

The workers open the store by its path, so they must see the same file system as this process
(one machine, or a shared file system on a cluster). SLURMCluster workers run this Python
(`sys.executable`, so the same virtual environment), write their logs to `<STORE>.work/dask-slurm/`
beside the store, and are cancelled when the aggregation ends. Slurm settings come from
dask-jobqueue's own configuration (`~/.config/dask/jobqueue.yaml`, `jobqueue.slurm.*`) where a
site keeps them; otherwise the defaults below: the default partition, 1 core and 2 GiB per
worker, 30 min of walltime.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import UsageError

CONNECT_TIMEOUT_S = 10            # an address that does not answer within this is an error, not a hang
SLURM_WORKERS = 2
SLURM_START_TIMEOUT_S = 120       # queued Slurm jobs: how long to wait for their workers
SLURM_DEFAULTS = {"cores": 1, "processes": 1, "memory": "2GiB", "walltime": "00:30:00"}

SPEC_HELP = "tcp://HOST:PORT (a running scheduler), local:N (N local worker processes) or slurm[:N] (N Slurm jobs)"


def parse(spec: str) -> tuple[str, str | int]:
    """('address', address) | ('local', N) | ('slurm', N); UsageError naming --dask otherwise."""
    spec = spec.strip()
    if "://" in spec:
        return "address", spec
    kind, _, count = spec.partition(":")
    if kind in ("local", "slurm"):
        if not count and kind == "slurm":
            return "slurm", SLURM_WORKERS
        if count.isdigit() and int(count) >= 1:
            return kind, int(count)
        raise UsageError(f"--dask {spec!r}: {kind}:N needs a number of workers N >= 1 (e.g. {kind}:2)")
    raise UsageError(f"--dask {spec!r}: expected {SPEC_HELP}")


@contextmanager
def connect(spec: str, store: str | Path) -> Iterator:
    """A dask.distributed Client for `spec` (see the module docstring), closed with its cluster."""
    kind, value = parse(spec)
    from distributed import Client

    if kind == "address":
        try:
            client = Client(value, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as err:
            raise UsageError(f"--dask {value}: no Dask scheduler answers there within {CONNECT_TIMEOUT_S} s "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        with client:
            yield client
        return
    with _cluster(kind, int(value), store) as cluster, Client(cluster) as client:
        if kind == "slurm":
            _wait_for_workers(client, int(value))
        yield client


@contextmanager
def _cluster(kind: str, n: int, store: str | Path):
    if kind == "local":
        from distributed import LocalCluster

        # processes, one thread each: zarr's per-chunk work is Python (see pipeline.aggregate)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            yield cluster
        return
    with slurm_cluster(store) as cluster:
        cluster.scale(jobs=n)
        yield cluster


@contextmanager
def slurm_cluster(store: str | Path):
    """A SLURMCluster whose workers run this Python, logging beside the store."""
    import shutil

    if not shutil.which("sbatch"):
        raise UsageError("--dask slurm: no Slurm here (sbatch not found on PATH)")
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UsageError("--dask slurm needs dask-jobqueue: pip install 'dipcohort[slurm]'") from None
    import dask

    from pipeline.store import work_dir

    logs = work_dir(store) / "dask-slurm"
    logs.mkdir(parents=True, exist_ok=True)
    site = dask.config.get("jobqueue.slurm", default={}) or {}
    options = {k: v for k, v in SLURM_DEFAULTS.items() if site.get(k) is None}
    cluster = SLURMCluster(python=sys.executable, log_directory=str(logs), job_name="dipcohort-aggregate",
                           scheduler_options={"dashboard_address": ":0"}, **options)
    try:
        yield cluster
    finally:
        cluster.close()


def _wait_for_workers(client, n: int) -> None:
    try:
        client.wait_for_workers(n, timeout=SLURM_START_TIMEOUT_S)
    except TimeoutError:
        have = len(client.scheduler_info().get("workers", {}))
        raise UsageError(f"--dask slurm: {have} of {n} Dask workers started within {SLURM_START_TIMEOUT_S} s "
                         f"(their Slurm jobs are still queued or failed: see squeue and the logs in the store's "
                         f".work/dask-slurm/)") from None


def dashboard_link(client) -> str | None:
    """The cluster's dashboard address, None when it has none (a scheduler started without bokeh)."""
    try:
        return client.dashboard_link or None
    except (KeyError, AttributeError):
        return None


def active_client():
    """The dask.distributed client made current in this process (`Client(...)`), else None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None
