"""Local backend: jobs run one after another in this process (`--workers 1`, the default).

`--workers N` runs a pool of N worker processes (spawn: forking a process that holds torch
threads or a CUDA context is unsafe). Each worker gets its own GPU, round-robin over the visible
devices; on CPU each job runs with its `resources.cpus` torch threads, set by the job function,
as in the sequential path, on Ray and on Slurm, so every backend gives the same numbers. The
driver hands out one job at a time per worker, so it always knows which job a worker runs: a
worker process that dies is replaced and its job retried (up to `max_retries` times), then
recorded as failed. Workers die with the driver (Linux PR_SET_PDEATHSIG), so a killed driver
leaves no orphan writing into the store; they ignore SIGINT / SIGTERM (a Ctrl-C reaches the
whole process group): the driver tells running jobs to stop, and they stop at a step boundary.
The sequential path stays the reference.
"""
from __future__ import annotations

import os
import signal
import threading
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress
from schedulers.base import Backend, JobFn, run_one
from schedulers.ledger import Snapshot, ended_since, record_lost, snapshot

DEFAULT_MAX_RETRIES = 2  # a job whose worker process dies 3 times is recorded as failed


class LocalBackend(Backend):
    name = "local"

    def __init__(self, device: str | None = None, workers: int = 1, max_retries: int = DEFAULT_MAX_RETRIES,
                 **options: Any):
        super().__init__(device=device, **options)
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.max_retries = int(max_retries)

    def preflight(self, jobs: Sequence[Job]) -> None:
        from pipeline.errors import UsageError

        try:
            worker_devices(1, self.device)
        except ValueError as err:
            raise UsageError(f"--device {self.device}: {err}") from None

    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress, job_fn: JobFn) -> None:
        if self.workers > 1 and len(jobs) > 1:
            _Pool(self, min(self.workers, len(jobs)), str(Path(store_path).resolve()), progress, job_fn).run(jobs)
        else:
            self.run_sequential(jobs, store_path, progress, job_fn)

    def run_sequential(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress, job_fn: JobFn) -> None:
        for job in jobs:
            if self.stopping.is_set():
                return
            progress.job_started(job)
            progress.job_finished(job, run_one(job_fn, job, store_path, device=self.device))


# ---------------------------------------------------------------------------------------------
# process pool
# ---------------------------------------------------------------------------------------------
def worker_devices(n: int, device: str | None) -> list[str]:
    """Device of each of n workers: round-robin over visible GPUs unless one device is named."""
    import torch

    if device not in (None, "cuda"):
        return [device] * n  # 'cpu' or one named GPU ('cuda:1') for every worker
    count = torch.cuda.device_count()
    if count == 0:
        if device == "cuda":
            raise ValueError("device 'cuda' requested but torch sees no GPU")
        return ["cpu"] * n
    return [f"cuda:{slot % count}" for slot in range(n)]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the driver dies (no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def _children_ignore_stop_signals():
    """Spawn with SIGINT and SIGTERM ignored: a Ctrl-C to the terminal's process group also reaches
    a worker still importing, which would die printing a KeyboardInterrupt traceback. An ignored
    signal stays ignored through exec (and Python then installs no handler of its own), while the
    signal mask does not survive multiprocessing's spawn. Blocked here meanwhile: one that comes
    in these milliseconds waits, and reaches the driver's handler once it is back."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield   # signal handlers can only be set from the main thread (a pool run from a thread: tests)
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _pool_worker(device: str, store_path: str, conn: Any, job_fn: JobFn) -> None:
    """A pool process: run the jobs the driver sends over `conn` until it sends None."""
    _die_with_parent()
    for sig in STOP_SIGNALS:  # the driver decides; its jobs stop at a step boundary
        signal.signal(sig, signal.SIG_IGN)
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    while (job := conn.recv()) is not None:
        conn.send(run_one(job_fn, job, store_path, device=device))


class _Pool:
    """N spawned processes, one job at a time each over its own pipe (no lock shared between
    workers, so a killed worker cannot block the others); a dead process is replaced and its
    job retried."""

    def __init__(self, backend: LocalBackend, n: int, store_path: str, progress: Progress, job_fn: JobFn):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.backend = backend
        self.store_path = store_path
        self.progress = progress
        self.job_fn = job_fn
        self.devices = worker_devices(n, backend.device)
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.running: dict[int, Job] = {}
        self.before: dict[int, Snapshot] = {}  # ledger entry of each slot's job when it was handed out
        self.pending: deque[Job] = deque()
        self.crashes: Counter[str] = Counter()

    def run(self, jobs: Sequence[Job]) -> None:
        from multiprocessing.connection import wait

        self.pending.extend(jobs)
        try:
            for slot in range(len(self.devices)):
                self._start(slot)
                self._assign(slot)
            while self.running:
                busy = list(self.running)
                ready = set(wait([self.conns[s] for s in busy] + [self.procs[s].sentinel for s in busy]))
                for slot in list(self.running):
                    if self.conns[slot] in ready:
                        try:
                            status = self.conns[slot].recv()
                        except (EOFError, ConnectionResetError):  # died after the job was handed out:
                            self._lost(slot)                           # a reset if it never read the job
                            continue
                        self.progress.job_finished(self.running.pop(slot), status)
                        self._assign(slot)
                    elif self.procs[slot].sentinel in ready:
                        self._lost(slot)
        finally:
            self._stop()

    def _start(self, slot: int) -> None:
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=_pool_worker, name=f"dipcohort-worker-{slot}", daemon=True,
                                args=(self.devices[slot], self.store_path, there, self.job_fn))
        with _children_ignore_stop_signals():
            proc.start()
        there.close()  # the child holds its end; EOF on ours then means the child is gone
        self.procs[slot], self.conns[slot] = proc, here

    def _assign(self, slot: int) -> None:
        if self.pending and not self.backend.stopping.is_set():
            job = self.pending.popleft()
            self.before[slot] = _snapshot(self.store_path, job)
            self.running[slot] = job
            self.progress.job_started(job)
            try:
                self.conns[slot].send(job)
            except OSError:  # the worker is already gone: the wait loop sees it and retries the job
                pass
        else:
            try:
                self.conns[slot].send(None)  # nothing left: the worker exits
            except OSError:
                pass

    def _lost(self, slot: int) -> None:
        """The worker died running a job: retry the job in a fresh process, or record it failed."""
        proc, job = self.procs[slot], self.running.pop(slot)
        proc.join()
        self.crashes[job.job_id] += 1
        status = ended_since(self.before[slot], _snapshot(self.store_path, job), job)
        if status:  # it recorded its outcome; only the message to the driver was lost
            self.progress.job_finished(job, status)
        elif self.backend.stopping.is_set():  # stopping: the driver records it interrupted
            self.progress.job_finished(job, "interrupted")
            return
        elif self.crashes[job.job_id] <= self.backend.max_retries:
            self.progress.running -= 1  # counted again when handed out anew
            self.pending.appendleft(job)
        else:
            record_lost(job, self.store_path, f"worker process died {self.crashes[job.job_id]} time(s) running "
                                              f"this job (last exit code {proc.exitcode})")
            self.progress.job_finished(job, "failed")
        self._start(slot)
        self._assign(slot)

    def _stop(self) -> None:
        for slot, proc in self.procs.items():
            if slot in self.running and proc.is_alive():  # interrupted mid-job (Ctrl-C, driver error)
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            self.conns[slot].close()


def _snapshot(store_path: str, job: Job) -> Snapshot:
    try:
        return snapshot(store_path, [job])
    except Exception:  # noqa: BLE001 - unreadable ledger: counts as not started
        return Snapshot({})


BACKEND = LocalBackend
