"""Backend contract: run a list of jobs against a store and report progress.

A backend knows jobs and `pipeline.worker.run_job`, nothing about solvers. `run_job` records
its own outcome in the store's ledger and returns the final status; it does not raise for a bad
job, so a backend only has to guard against the unexpected (a crash of the call itself).
"""
from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress


class Backend(ABC):
    """Base of `schedulers.{local,ray,slurm}`. Options are keyword arguments from flags/manifest.

    device: 'cpu', 'cuda', 'cuda:1' or None (worker default: CUDA when available).
    """

    name: str = ""

    def __init__(self, device: str | None = None, **options: Any):
        self.device = device
        self.options = options

    @abstractmethod
    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress) -> None:
        """Run every job (progress.job_started / job_finished for each); return when all ended."""


def run_one(job: Job, store_path: str | Path, device: str | None = None, **kwargs: Any) -> str:
    """Call the worker; an error escaping it (it should not) counts as 'failed', never stops the cohort."""
    from pipeline.worker import run_job

    try:
        return run_job(job, store_path, device=device, **kwargs)
    except Exception:  # noqa: BLE001 - isolation of jobs is the point
        traceback.print_exc()
        return "failed"
