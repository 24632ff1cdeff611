"""Ray backend: one Ray task per job, on a running cluster or on a local one sized to this machine.

Each task asks Ray for explicit `num_cpus` and `num_gpus` (fractional GPUs pack several small
reconstructions on one device; torch's per-process memory fraction is set to match). At most
`max_in_flight` tasks exist at a time (default 2 x the cluster's job slots; `--workers N` > 1
runs at most N at once), so a cohort of thousands of jobs never becomes thousands of pending
tasks; a `ray.wait` loop collects results. Connecting to a running cluster (`--ray-address`)
ships the recon, pipeline and schedulers packages with the job (runtime_env py_modules), so the
nodes need the dependencies (torch, zarr, ...) but not this code.

Failures: the worker records exceptions inside a job itself (status 'failed', not retried).
A worker process that dies (killed, node lost) is retried by Ray up to `max_retries` times;
after that, or when Ray's memory monitor kills it, the driver records the job as failed with
the reason. CUDA out-of-memory inside a job is an exception like any other: 'failed' with
torch's message.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress
from schedulers.base import Backend, JobFn, run_one, with_cpus
from schedulers.ledger import record_lost

DEFAULT_MAX_RETRIES = 2  # retries after a worker process died; a job that kills its worker 3x is failed


def _run_task(job_fn: JobFn, job: Job, store_path: str, device: str | None, num_gpus: float) -> str:
    """Body of the Ray task (runs in a Ray worker process, which Ray reuses between tasks).

    The job function sets the job's torch threads (its resources.cpus), as on every backend.
    """
    import torch

    if device is None or str(device).startswith("cuda"):
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted this task: it is cuda:0 in here
        device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    on_gpu = str(device).startswith("cuda")
    if on_gpu and 0 < num_gpus < 1:
        # a fraction of a GPU: keep torch's caching allocator within that share of the memory
        torch.cuda.set_per_process_memory_fraction(num_gpus, torch.device(device).index or 0)
    try:
        return run_one(job_fn, job, store_path, device=device)
    finally:
        if on_gpu:
            torch.cuda.empty_cache()  # the process serves the next task: hand back cached blocks


class RayBackend(Backend):
    name = "ray"

    def __init__(self, device: str | None = None, address: str | None = None, cpus_per_job: float | None = None,
                 gpus_per_job: float | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_in_flight: int | None = None, ship_code: bool = True, workers: int = 1, **options: Any):
        super().__init__(device=device, **options)
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self.max_retries = int(max_retries)
        self.max_in_flight = max_in_flight
        self.ship_code = bool(ship_code)
        self.workers = int(workers)  # > 1: at most this many jobs at once (`--workers`)
        for name, value in (("cpus_per_job", cpus_per_job), ("gpus_per_job", gpus_per_job)):
            if value is not None and float(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    # ---- resources -------------------------------------------------------------------------
    def _resources(self, job: Job) -> tuple[float, float]:
        cpus = float(self.cpus_per_job if self.cpus_per_job is not None else job.resources.cpus)
        gpus = float(self.gpus_per_job if self.gpus_per_job is not None else job.resources.gpus)
        if self.device == "cpu":
            gpus = 0.0
        elif self.device and self.device.startswith("cuda") and gpus <= 0:
            raise ValueError(f"--device {self.device} on Ray needs GPUs per job (--gpus-per-job, e.g. 1 or 0.25): "
                             f"Ray only shows a task the GPUs it granted")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"job {job.job_id}: gpus {gpus} - fractions are only allowed below 1 GPU")
        return max(cpus, 0.0), gpus

    def _slots(self, jobs: Sequence[Job]) -> int:
        """How many jobs the cluster runs at once (by the first job's request)."""
        import ray

        total = ray.cluster_resources()
        cpus, gpus = self._resources(jobs[0])
        slots = math.inf
        if cpus > 0:
            slots = min(slots, total.get("CPU", 0) // cpus)
        if gpus > 0:
            if total.get("GPU", 0) <= 0:
                raise ValueError(f"jobs ask for {gpus:g} GPU each but the Ray cluster has no GPU; "
                                 f"run with --gpus-per-job 0 or connect to a cluster with GPUs (--ray-address)")
            slots = min(slots, total["GPU"] // gpus)
        if slots < 1:
            raise ValueError(f"no node of the Ray cluster can run a job asking for {cpus:g} CPU(s) and "
                             f"{gpus:g} GPU(s) (cluster: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs)")
        return int(slots) if slots != math.inf else 1

    # ---- before anything is written --------------------------------------------------------
    def preflight(self, jobs: Sequence[Job]) -> None:
        """Ray installed, every job's request valid, GPUs present when asked for, the address answering."""
        from pipeline.errors import UsageError

        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--backend ray: ray is not installed (pip install 'dipcohort[ray]')") from None
        try:
            requests = {self._resources(job) for job in jobs}
        except ValueError as err:
            raise UsageError(f"--backend ray: {err}") from None
        gpus = max((g for _, g in requests), default=0.0)
        if self.address:
            check_reachable(self.address)
        elif gpus > 0:
            import torch

            if torch.cuda.device_count() == 0:
                raise UsageError(f"--backend ray: jobs ask for {gpus:g} GPU each (--gpus-per-job or the manifest's "
                                 f"resources.gpus) but this machine has no GPU; use --gpus-per-job 0 or --device "
                                 f"cpu, or --ray-address of a cluster with GPUs")

    # ---- cluster ---------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Connect or start a local cluster; True when this call started Ray (and must shut it down)."""
        import ray

        if ray.is_initialized():
            return False
        # task output goes to each job's log file, not interleaved into the driver's terminal
        if self.address:
            # the cluster's nodes may not have this code: ship the three packages with the job
            env = {"py_modules": _packages()} if self.ship_code else None
            ray.init(address=self.address, log_to_driver=False, logging_level="warning", runtime_env=env)
        else:
            import torch

            from schedulers.local import cpu_count

            # address="local": a new cluster even if `ray start` left one running on this machine
            ray.init(address="local", num_cpus=cpu_count(), num_gpus=torch.cuda.device_count(),
                     include_dashboard=False, log_to_driver=False, logging_level="warning")
        return True

    # ---- run -------------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress, job_fn: JobFn) -> None:
        if not jobs:
            return
        import ray

        started = self._connect()
        try:
            self._run(list(jobs), str(Path(store_path).resolve()), progress, job_fn)
        finally:
            if started:
                ray.shutdown()

    def _run(self, jobs: list[Job], store_path: str, progress: Progress, job_fn: JobFn) -> None:
        import ray

        from pipeline.errors import UsageError

        task = ray.remote(_run_task)
        try:
            limit = self.max_in_flight or (self.workers if self.workers > 1 else 2 * self._slots(jobs))
        except ValueError as err:
            raise UsageError(f"--backend ray: {err}") from None
        queue = iter(jobs)
        in_flight: dict[Any, Job] = {}
        try:
            while True:
                while len(in_flight) < limit and not self.stopping.is_set():
                    job = next(queue, None)
                    if job is None:
                        break
                    cpus, gpus = self._resources(job)
                    ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=self.max_retries,
                                       retry_exceptions=False, name=f"dipcohort:{job.job_id}").remote(
                        job_fn, with_cpus(job, cpus), store_path, self.device, gpus)
                    in_flight[ref] = job
                    progress.job_started(job)
                if not in_flight:
                    break
                # a timeout, so that the driver's signal handlers run while it waits
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = in_flight.pop(ref)
                    progress.job_finished(job, self._outcome(ref, job, store_path))
        except BaseException:
            for ref in in_flight:  # driver interrupted: leave no orphan reconstruction running
                ray.cancel(ref, force=True)
            raise

    def _outcome(self, ref: Any, job: Job, store_path: str) -> str:
        import ray
        from ray import exceptions as rex

        try:
            return ray.get(ref)
        except rex.OutOfMemoryError as err:
            reason = f"killed by Ray's memory monitor (host out of memory): {_first_line(err)}"
        except (rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError, rex.ObjectLostError) as err:
            reason = (f"Ray worker process died {self.max_retries + 1} time(s) running this job "
                      f"({type(err).__name__}): {_first_line(err)}")
        except rex.TaskCancelledError as err:
            if self.stopping.is_set():
                return "interrupted"  # the driver records what the task could not
            reason = f"Ray task cancelled: {_first_line(err)}"
        except rex.RayError as err:  # e.g. the task could not be unpickled or imported on the node
            reason = f"Ray error ({type(err).__name__}): {_last_line(err)}\n{_plain(err)}"
        record_lost(job, store_path, reason)
        return "failed"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing answers at a HOST:PORT Ray address."""
    import socket

    from pipeline.errors import UsageError

    if address == "auto":
        return  # ray finds the cluster this machine started (`ray start`); it says so when none
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--ray-address {address}: expected 'auto' or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UsageError(f"--ray-address {address}: nothing answers there within {timeout_s:g} s ({err}); "
                         f"start the cluster with `ray start --head` or fix the address") from None


def _plain(err: BaseException) -> str:
    """The exception's text without the terminal colour codes Ray puts in it."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()


def _first_line(err: BaseException) -> str:
    text = _plain(err).splitlines()
    return text[0] if text else type(err).__name__


def _last_line(err: BaseException) -> str:
    """The innermost error of a Ray traceback (e.g. 'ModuleNotFoundError: ...')."""
    lines = [line for line in _plain(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _packages() -> list:
    import pipeline
    import recon
    import schedulers

    return [recon, pipeline, schedulers]


# dests of the `dipcohort run` flags this backend reads (giving one of them with another backend is an error)
FLAGS = ("ray_address", "gpus_per_job", "cpus_per_job")


def add_arguments(group) -> None:
    from schedulers.flags import add_resource_arguments

    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="ray: connect to a running cluster ('auto' or HOST:PORT); default: start a local one")
    add_resource_arguments(group)


def options_from_args(args) -> dict[str, Any]:
    from schedulers.flags import resource_options

    opts = resource_options(args, ("gpus_per_job", "cpus_per_job"))
    if args.ray_address:
        opts["address"] = args.ray_address
    return opts


BACKEND = RayBackend
