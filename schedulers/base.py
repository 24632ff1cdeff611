"""Backend contract: run a list of jobs against a store with the job function it is handed.

A backend knows jobs and the callable the driver hands it (`job_fn(job, store_path, device=...)
-> status`, the worker's `run_job`), nothing about solvers. The job function records its own
outcome in the store's ledger and returns the final status; it does not raise for a bad job,
so a backend only has to guard against the unexpected (a crash of the call itself). It sets the
job's torch threads itself (from `job.resources.cpus`), so a backend that changes a job's CPUs
passes them in the job (`with_cpus`), never by setting threads of its own.

Stopping: the driver calls `request_stop()` (Ctrl-C, SIGTERM); a backend then hands out no
more jobs and returns once the running ones have stopped at a step boundary (the job function
returns 'interrupted'). A backend whose jobs run on without the driver (Slurm) sets `detached`.
A backend rejects options it does not know, and `preflight(jobs)` checks, before the driver
writes anything, that it can run these jobs here (its commands, cluster, GPUs).
"""
from __future__ import annotations

import math
import threading
import traceback
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress

JobFn = Callable[..., str]  # job_fn(job, store_path, device=None) -> 'done' | 'failed' | ...


class Backend(ABC):
    """Base of `schedulers.{local,ray,slurm}`. Options are keyword arguments from flags / `-o`.

    device: 'cpu', 'cuda', 'cuda:1' or None (worker default: CUDA when available).
    """

    name: str = ""
    detached: bool = False  # True: jobs go on running when the driver stops (Slurm)

    def __init__(self, device: str | None = None, **unknown: Any):
        if unknown:
            raise ValueError(f"the {self.name} backend has no option(s) {', '.join(sorted(unknown))} (-o KEY=VALUE); "
                             f"its options: {', '.join(self.option_names())}")
        self.device = device
        self.stopping = threading.Event()

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options its constructor takes (for messages)."""
        import inspect

        names = []
        for klass in cls.__mro__:
            if klass is object or "__init__" not in vars(klass):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                named = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                if named and p.name != "self" and p.name not in names:
                    names.append(p.name)
        return sorted(names)

    def preflight(self, jobs: Sequence[Job]) -> None:
        """Raise pipeline.errors.UsageError if these jobs cannot run here (default: nothing to check)."""

    def request_stop(self) -> None:
        """Hand out no more jobs (the running ones stop at a step boundary, told by the driver)."""
        self.stopping.set()

    @abstractmethod
    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress, job_fn: JobFn) -> None:
        """Run every job with `job_fn` (progress.job_started / job_finished for each); return when all ended."""


def run_one(job_fn: JobFn, job: Job, store_path: str | Path, device: str | None = None,
            where: dict[str, str] | None = None) -> str:
    """Call the job function; an error escaping it (it should not) counts as 'failed', never stops the cohort.

    where: the ledger's placement fields (`node`, `ray_node_id`) when the backend knows better than the host."""
    try:
        if where:
            return job_fn(job, store_path, device=device, where=where)
        return job_fn(job, store_path, device=device)
    except Exception:  # noqa: BLE001 - isolation of jobs is the point
        traceback.print_exc()
        return "failed"


def with_cpus(job: Job, cpus: float | None) -> Job:
    """The job with `cpus` CPUs (its torch threads: whole numbers, at least 1); None keeps the manifest's."""
    if cpus is None:
        return job
    return replace(job, resources=replace(job.resources, cpus=max(1, math.ceil(float(cpus)))))
