"""Local backend: jobs run one after another in this process (`--workers 1`, the default).

The process pool for `--workers N` (one GPU or a fixed number of torch threads per worker)
is added here by the schedulers' owner; the sequential path stays the reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress
from schedulers.base import Backend, run_one


class LocalBackend(Backend):
    name = "local"

    def __init__(self, device: str | None = None, workers: int = 1, **options: Any):
        super().__init__(device=device, **options)
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)

    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress) -> None:
        self.run_sequential(jobs, store_path, progress)

    def run_sequential(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress) -> None:
        for job in jobs:
            progress.job_started(job)
            progress.job_finished(job, run_one(job, store_path, device=self.device))


BACKEND = LocalBackend
