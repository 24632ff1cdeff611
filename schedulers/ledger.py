"""What the backends read and write of the store's ledger (the worker writes the rest).

A backend writes the ledger only for a job whose process died before the worker could record
anything; it reads the ledger to follow jobs it cannot watch directly (Slurm array tasks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.jobs import STATUS_NAMES, Job

ENDED = ("done", "diverged", "failed")  # a job in one of these has recorded its outcome


@dataclass(frozen=True)
class Snapshot:
    """Status code and attempt count of some job rows (only their chunks are read)."""

    rows: dict[int, tuple[int, int]]  # job index -> (status code, attempts)

    def of(self, job: Job) -> tuple[str, int]:
        code, attempts = self.rows.get(job.index, (0, 0))
        return STATUS_NAMES.get(code, "pending"), attempts


def snapshot(store_path: str | Path, jobs: Sequence[Job]) -> Snapshot:
    """The ledger entries of `jobs`, reading one chunk per job and array (cheap for a few jobs)."""
    from pipeline.store import open_store

    if not jobs:
        return Snapshot({})
    g = open_store(store_path)["jobs"]
    rows = np.asarray([job.index for job in jobs])
    status = g["status"].get_orthogonal_selection(rows)
    attempts = g["attempts"].get_orthogonal_selection(rows)
    return Snapshot({int(r): (int(s), int(a)) for r, s, a in zip(rows, status, attempts)})


def ended_since(before: Snapshot, now: Snapshot, job: Job) -> str | None:
    """The job's outcome if a new attempt recorded one after `before` was taken, else None."""
    status, attempts = now.of(job)
    return status if status in ENDED and attempts > before.of(job)[1] else None


def started_since(before: Snapshot, now: Snapshot, job: Job) -> bool:
    return now.of(job)[1] > before.of(job)[1]


def record_lost(job: Job, store_path: str | Path, reason: str) -> None:
    """Mark a job failed in the ledger when its process died before it could record anything."""
    from pipeline.store import JobWriter, log_path

    try:
        JobWriter(store_path, job).finish("failed", math.nan, reason)
        path = log_path(store_path, job.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(f"scheduler: {reason}\n")
    except Exception as err:  # noqa: BLE001 - the ledger stays 'running'; the next run picks the job up
        print(f"could not record the failure of job {job.job_id}: {err}")
