"""Ray backend: jobs run on long-lived Ray actors ("warm workers"), on a running cluster or on a
local one sized to this machine.

Worker reuse, decided: one actor per job slot, kept for the whole run. An actor asks Ray for the
job's `num_cpus` and `num_gpus` once (fractional GPUs pack several small reconstructions on one
device; torch's per-process memory fraction is set to match), so its device never changes under
it: a plain Ray task in a reused worker process may be granted another GPU after CUDA has read
CUDA_VISIBLE_DEVICES, and an actor cannot. It keeps what does not change between jobs: the CUDA
context, torch's allocator and the per-process caches of recon (e.g. a CT geometry's operator
norm), which a fresh process per job (`max_calls=1`) would pay for on every job (process start,
`import torch`, CUDA start-up: seconds). An actor runs one job at a time (the driver dispatches a
job only to an idle actor) and each job's log says which process ran it (`pid`).

Actors are shaped per request: jobs asking for different CPUs or GPUs (solver configurations
with their own resources) each get actors of their own request, as many as the cluster has slots
for that request (`--workers N` > 1 or `max_in_flight`: at most N actors in all); jobs wait in
the driver, so a cohort of thousands of jobs never becomes thousands of pending Ray tasks. Connecting to a running cluster (`--ray-address`) ships the recon, pipeline
and schedulers packages with the job (runtime_env py_modules), so the nodes need the
dependencies (torch, zarr, ...) but not this code. A cluster may grow while the run goes on:
the job slots are counted again every few seconds and more actors started; on a running cluster
a request that does not fit now (e.g. no GPU yet) waits for a node, with a line saying so,
instead of being refused (only a local cluster, whose size is fixed, refuses it). That wait is
bounded: when no node of the cluster could ever hold a request (its whole resources, not what is
free) and the cluster has not changed for `fit_timeout_s` (`--ray-fit-timeout`, default 15 min:
an autoscaler launching a cloud GPU node takes a few minutes, and every node that joins or leaves
starts the wait again), that request's jobs are recorded failed with what they asked for and
what the nodes have; the other requests' jobs go on.

Failures: the worker records exceptions inside a job itself (status 'failed', not retried). An
actor that dies (killed, out of memory, its node lost) is not restarted in place by Ray
(`max_restarts=0`); the driver instead retries its job up to `max_retries` times on another actor
and starts a replacement that Ray places wherever there is room, so the jobs of a lost node move
to the surviving ones rather than wait for a restart that needs the lost node's resources. After
`max_retries` the job is recorded as failed with the reason. CUDA out-of-memory inside a job is
an exception like any other: 'failed' with torch's message.
"""
from __future__ import annotations

import math
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import Job
from pipeline.progress import Progress
from schedulers.base import Backend, JobFn, run_one, with_cpus
from schedulers.ledger import record_lost

DEFAULT_MAX_RETRIES = 2  # retries after a worker process died; a job that kills its worker 3x is failed
RECOUNT_S = 5.0          # how often the driver counts the cluster's job slots again (it may scale up)
WAIT_NOTE_S = (10.0, 60.0)  # first 'waiting for the cluster' line after this long, then every so often
START_FAILURES = 3       # actors in a row that could not start (e.g. the shipped code fails to import): give up
FIT_TIMEOUT_S = 900.0    # a request no node can hold fails after the cluster stayed unchanged this long


class JobRunner:
    """A warm worker (a Ray actor): runs one job at a time on the device Ray granted it for its life."""

    def __init__(self, device: str | None, num_gpus: float):
        import os

        import ray
        import torch

        if device is None or str(device).startswith("cuda"):
            # Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted this actor: it is cuda:0 in here
            device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and 0 < num_gpus < 1:
            # a fraction of a GPU: keep torch's caching allocator within that share of the memory
            torch.cuda.set_per_process_memory_fraction(num_gpus, torch.device(device).index or 0)
        self.device = device
        node_id = ray.get_runtime_context().get_node_id()
        names = [n["NodeName"] for n in ray.nodes() if n["NodeID"] == node_id]
        self.where = {"node": names[0] if names else ray.util.get_node_ip_address(), "ray_node_id": node_id}
        self.pid = os.getpid()

    def ready(self) -> dict:
        """Answers once Ray has placed and started the actor."""
        return {"pid": self.pid, **self.where}

    def run(self, job_fn: JobFn, job: Job, store_path: str) -> str:
        """The job function sets the job's torch threads (its resources.cpus), as on every backend."""
        return run_one(job_fn, job, store_path, device=self.device, where=self.where)


class RayBackend(Backend):
    name = "ray"

    def __init__(self, device: str | None = None, address: str | None = None, cpus_per_job: float | None = None,
                 gpus_per_job: float | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_in_flight: int | None = None, ship_code: bool = True, workers: int = 1,
                 fit_timeout_s: float = FIT_TIMEOUT_S, **options: Any):
        super().__init__(device=device, **options)
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self.max_retries = int(max_retries)
        self.max_in_flight = max_in_flight
        self.ship_code = bool(ship_code)
        self.workers = int(workers)  # > 1: at most this many jobs at once (`--workers`)
        self.fit_timeout_s = float(fit_timeout_s)
        for name, value in (("cpus_per_job", cpus_per_job), ("gpus_per_job", gpus_per_job),
                            ("fit_timeout_s", fit_timeout_s)):
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

    def _slots(self, request: tuple[float, float]) -> int:
        """How many jobs of this request the cluster runs at once now (0: none fits yet)."""
        import ray

        total = ray.cluster_resources()
        slots = math.inf
        for name, need in zip(("CPU", "GPU"), request):
            if need > 0:
                slots = min(slots, total.get(name, 0) // need)
        return int(slots) if slots != math.inf else 1

    def cap(self) -> int | None:
        """The user's cap on actors in all (`max_in_flight`, `--workers N` > 1), else None."""
        return int(self.max_in_flight or self.workers) if self.max_in_flight or self.workers > 1 else None

    def _limit(self, request: tuple[float, float]) -> int:
        """Actors to keep for one request: the user's cap, else the cluster's slots for it (at least
        1 on a running cluster, whose request for resources is what makes an autoscaler add a node)."""
        from pipeline.errors import UsageError

        cap = self.cap()
        if cap:
            return cap
        slots = self._slots(request)
        if slots < 1 and not self.address:
            import ray

            total = ray.cluster_resources()
            raise UsageError(f"--backend ray: no node of the local Ray cluster can run a job asking for "
                             f"{request[0]:g} CPU(s) and {request[1]:g} GPU(s) (cluster: {total.get('CPU', 0):g} "
                             f"CPUs, {total.get('GPU', 0):g} GPUs); connect to a cluster that has them (--ray-address)")
        return max(1, slots)

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
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level="warning", runtime_env=env)
            except ConnectionError as err:
                raise _connection_refused(self.address, err) from None
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
            _Run(self, list(jobs), str(Path(store_path).resolve()), progress, job_fn).loop()
        finally:
            if started:
                ray.shutdown()


class _Run:
    """One run's actors and queues: jobs wait here (per resource request) for an idle actor of their request."""

    def __init__(self, backend: RayBackend, jobs: list[Job], store_path: str, progress: Progress, job_fn: JobFn):
        import ray

        self.b, self.store_path, self.progress, self.job_fn = backend, store_path, progress, job_fn
        self.queues: dict[tuple[float, float], deque[Job]] = {}
        for job in jobs:
            self.queues.setdefault(backend._resources(job), deque()).append(job)
        self.runner = ray.remote(JobRunner)
        self.starting: dict[Any, tuple[Any, tuple]] = {}   # ready() ref -> (actor, request)
        self.idle: dict[tuple, list[Any]] = {}              # request -> actors waiting for a job
        self.busy: dict[Any, tuple[Any, tuple, Job]] = {}  # run() ref -> (actor, request, job)
        self.crashes: dict[str, int] = {}                  # job id -> times its actor died under it
        self.start_failures = 0
        self.limits = {request: self.b._limit(request) for request in self.queues}   # actors per request
        self.counted = time.monotonic()
        self.waiting_since, self.noted = time.monotonic(), 0
        # no: say at once that the run waits for the cluster
        self.fits_now = all(self.b._slots(request) >= 1 for request in self.queues)
        self.unfit = _Unfit(backend.fit_timeout_s)

    # ---- the loop --------------------------------------------------------------------------
    def loop(self) -> None:
        import ray

        try:
            while self._step():
                # a timeout, so that the driver's signal handlers run while it waits
                refs = [*self.busy, *self.starting]
                if not refs:  # only idle actors of requests still to start: the next step starts them
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                for ref in ready:
                    self._answered(ref)
        except BaseException:
            self._kill(list(self.busy.values()))  # driver interrupted: leave no orphan reconstruction running
            raise
        finally:
            self._kill([*self.starting.values(), *((a, r) for r, actors in self.idle.items() for a in actors)])

    def _step(self) -> bool:
        """Dispatch, retire and start actors; False when nothing is left to wait for."""
        if self.b.stopping.is_set():
            self._kill([*self.starting.values(), *((a, r) for r, actors in self.idle.items() for a in actors)])
            self.starting.clear()
            self.idle.clear()
            return bool(self.busy)
        self._dispatch()
        if not any(self.queues.values()):
            return bool(self.busy)
        self._grow()
        self._fail_unfit()
        self._note_waiting()
        return True

    def _dispatch(self) -> None:
        for request, actors in self.idle.items():
            queue = self.queues.get(request)
            while actors and queue:
                actor, job = actors.pop(), queue.popleft()
                ref = actor.run.options(name=f"dipcohort:{job.job_id}").remote(
                    self.job_fn, with_cpus(job, request[0]), self.store_path)
                self.busy[ref] = (actor, request, job)
                if job.job_id not in self.crashes:  # a retry was started already, as progress sees it
                    self.progress.job_started(job)
            if not queue and self._retire(request):
                self._kill([(a, request) for a in actors])
                actors.clear()

    def _retire(self, request: tuple) -> bool:
        """Whether the idle actors of a request with no queued jobs should go: yes when other
        requests' jobs wait for resources, or when none of its jobs still runs. While one runs, they
        stay: should its actor die (its node lost), the retry starts at once in a warm process."""
        others_wait = any(q for r, q in self.queues.items() if r != request)
        return others_wait or not any(r == request for _, r, _ in self.busy.values())

    def _grow(self) -> None:
        """Start actors up to each request's limit (counted again every RECOUNT_S: the cluster may have grown)."""
        if not self.b.cap() and time.monotonic() - self.counted > RECOUNT_S:
            for request, queue in self.queues.items():
                if queue:
                    self.limits[request] = max(self.limits[request], self.b._limit(request))
            self.counted = time.monotonic()
        while (request := self._request()) is not None:
            cpus, gpus = request
            actor = self.runner.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=1).remote(
                self.b.device, gpus)
            self.starting[actor.ready.remote()] = (actor, request)

    def _actors(self) -> dict[tuple, tuple[int, int]]:
        """Per request: (actors in all, actors not busy: starting or idle)."""
        out: dict[tuple, list[int]] = {}
        for r, actors in self.idle.items():
            out.setdefault(r, [0, 0])[:] = [len(actors), len(actors)]
        for _, r in self.starting.values():
            counts = out.setdefault(r, [0, 0])
            counts[0], counts[1] = counts[0] + 1, counts[1] + 1
        for _, r, _ in self.busy.values():
            out.setdefault(r, [0, 0])[0] += 1
        return {r: (n, free) for r, (n, free) in out.items()}

    def _request(self) -> tuple | None:
        """The request under its limit whose queued jobs most outnumber its actors not busy (None:
        every request has its actors, or the user's cap is reached)."""
        actors = self._actors()
        if self.b.cap() and sum(n for n, _ in actors.values()) >= self.b.cap():
            return None
        wanting = {r: len(q) - actors.get(r, (0, 0))[1] for r, q in self.queues.items()
                   if len(q) > actors.get(r, (0, 0))[1] and actors.get(r, (0, 0))[0] < self.limits[r]}
        return max(wanting, key=wanting.get) if wanting else None

    def _fail_unfit(self) -> None:
        """Record failed the queued jobs of a request no node could hold for fit_timeout_s."""
        placed = {r for r, actors in self.idle.items() if actors} | {r for _, r, _ in self.busy.values()}
        for request, why in self.unfit.expired(self.queues, placed):
            queue = self.queues[request]
            self.progress.note(f"{len(queue)} job(s) failed: {why}")
            for job in queue:
                record_lost(job, self.store_path, why)
                self.progress.job_finished(job, "failed")
            queue.clear()
            doomed = [ref for ref, (_, r) in self.starting.items() if r == request]
            self._kill([self.starting.pop(ref) for ref in doomed])

    def _note_waiting(self) -> None:
        """Say so when no actor could be placed for a while (the cluster may be scaling up)."""
        if self.busy or any(self.idle.values()):
            self.waiting_since, self.noted = time.monotonic(), 0
            return
        waited = time.monotonic() - self.waiting_since
        due = 0.0 if not (self.fits_now or self.noted) else WAIT_NOTE_S[0] + self.noted * WAIT_NOTE_S[1]
        if waited < due:
            return
        import ray

        self.noted += 1
        cpus, gpus = self._request() or next(r for r, q in self.queues.items() if q)
        total = ray.cluster_resources()
        self.progress.note(f"waiting {waited:.0f} s for the Ray cluster to place a worker: each asks {cpus:g} CPU(s) "
                           f"and {gpus:g} GPU(s), the cluster has {total.get('CPU', 0):g} CPUs and "
                           f"{total.get('GPU', 0):g} GPUs; it may be scaling up, or add a node (`ray start "
                           f"--address={self.b.address or 'HEAD:6379'} --num-gpus=N`); a request no node can hold fails "
                           f"after {self.b.fit_timeout_s:g} s of an unchanged cluster (--ray-fit-timeout); Ctrl-C stops")

    # ---- answers ---------------------------------------------------------------------------
    def _answered(self, ref: Any) -> None:
        import ray

        if ref in self.starting:
            actor, request = self.starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                self._start_failed(err)
                return
            self.start_failures = 0
            self.idle.setdefault(request, []).append(actor)
            return
        actor, request, job = self.busy.pop(ref)
        status, actor_alive = self._outcome(ref, job)
        if actor_alive:
            self.idle.setdefault(request, []).append(actor)
        else:
            self._kill([(actor, request)])
        if status is None:
            self.queues[request].appendleft(job)  # its actor died: run it again, first (still 'running' to progress)
        else:
            self.progress.job_finished(job, status)

    def _start_failed(self, err: BaseException) -> None:
        """An actor that could not start (its node lost, or the shipped code failed): give up after several."""
        from pipeline.errors import UsageError

        self.start_failures += 1
        if self.start_failures >= START_FAILURES:
            raise UsageError(f"--backend ray: {START_FAILURES} Ray workers in a row could not start "
                             f"({type(err).__name__}): {_last_line(err)}\n{_plain(err)}")

    def _outcome(self, ref: Any, job: Job) -> tuple[str | None, bool]:
        """(status, whether the actor lives on); status None: the job is to be run again."""
        import ray
        from ray import exceptions as rex

        try:
            return ray.get(ref), True
        except rex.RayActorError as err:
            died = self.crashes[job.job_id] = self.crashes.get(job.job_id, 0) + 1
            if self.b.stopping.is_set():
                return "interrupted", False
            if died <= self.b.max_retries:
                return None, False
            why = "host out of memory, " if "memory" in _plain(err).lower() else ""
            reason = (f"Ray worker process died {died} time(s) running this job ({why}{type(err).__name__}): "
                      f"{_first_line(err)}")
            alive = False
        except rex.TaskCancelledError as err:
            if self.b.stopping.is_set():
                return "interrupted", True  # the driver records what the task could not
            reason, alive = f"Ray task cancelled: {_first_line(err)}", True
        except rex.RayError as err:  # e.g. the job could not be unpickled or imported on the node
            reason, alive = f"Ray error ({type(err).__name__}): {_last_line(err)}\n{_plain(err)}", True
        record_lost(job, self.store_path, reason)
        return "failed", alive

    @staticmethod
    def _kill(actors) -> None:
        import ray

        for actor, *_ in actors:
            ray.kill(actor, no_restart=True)


class _Unfit:
    """Requests no node of the cluster could ever hold (its whole resources), and since when the
    cluster has been as it is: any node that joins or leaves starts every wait again."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.nodes: tuple = ()
        self.since = time.monotonic()
        self.checked = 0.0

    def expired(self, queues: dict[tuple, Any], placed: set[tuple]) -> list[tuple[tuple, str]]:
        """(request, why) for each queued request no node can hold, without an actor Ray placed,
        once the cluster has been unchanged for timeout_s."""
        if time.monotonic() - self.checked < min(RECOUNT_S, self.timeout_s / 2):
            return []
        self.checked = time.monotonic()
        nodes = _node_resources()
        if nodes != self.nodes:
            self.nodes, self.since = nodes, time.monotonic()
        waited = time.monotonic() - self.since
        if waited < self.timeout_s:
            return []
        return [(r, _unfit_reason(r, nodes, waited, self.timeout_s)) for r, q in queues.items()
                if q and r not in placed and not _fits_a_node(r, nodes)]


def _node_resources() -> tuple[tuple[str, float, float], ...]:
    """(node id, CPUs, GPUs) of every live node: what could ever be granted, busy or not."""
    import ray

    return tuple(sorted((n["NodeID"], float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                        for n in ray.nodes() if n.get("Alive")))


def _fits_a_node(request: tuple[float, float], nodes) -> bool:
    cpus, gpus = request
    return any(c >= cpus and g >= gpus for _, c, g in nodes)


def _unfit_reason(request: tuple[float, float], nodes, waited: float, timeout_s: float) -> str:
    shapes = sorted({(c, g) for _, c, g in nodes})
    have = ", ".join(f"{sum((c, g) == s for _, c, g in nodes)} with {s[0]:g} CPU(s) and {s[1]:g} GPU(s)"
                     for s in shapes) or "no live node"
    return (f"no node of the Ray cluster can run this job: it asks for {request[0]:g} CPU(s) and {request[1]:g} "
            f"GPU(s); the cluster's {len(nodes)} live node(s): {have}; it did not change for {waited:.0f} s "
            f"(--ray-fit-timeout {timeout_s:g}). Ask for less (the manifest's resources, --cpus-per-job, "
            f"--gpus-per-job) or add a node that has it, then rerun with --retry-failed")


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


def _connection_refused(address: str, err: ConnectionError):
    """Something answers at the address but Ray would not connect: most often token authentication."""
    import os

    from pipeline.errors import UsageError

    hint = ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        # Ray >= 2.5x starts a head with token authentication when ~/.ray/auth_token exists, and
        # then refuses clients that do not send the token (RAY_AUTH_MODE unset means 'disabled')
        hint = ("; if the cluster uses token authentication, run with RAY_AUTH_MODE=token and its token in "
                "~/.ray/auth_token (or RAY_AUTH_TOKEN), as `ray start --address` needs too")
    return UsageError(f"--ray-address {address}: Ray could not connect to the cluster there ({_first_line(err)}){hint}")


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
FLAGS = ("ray_address", "ray_fit_timeout", "gpus_per_job", "cpus_per_job")


def add_arguments(group) -> None:
    from schedulers.flags import add_resource_arguments

    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="ray: connect to a running cluster ('auto' or HOST:PORT); default: start a local one")
    group.add_argument("--ray-fit-timeout", type=float, default=None, metavar="SECONDS",
                       help=f"ray: fail the jobs of a request no node of the cluster can hold once the cluster "
                            f"has not changed for this long (default {FIT_TIMEOUT_S:g}: time for an autoscaler "
                            f"to add a node)")
    add_resource_arguments(group)


def options_from_args(args) -> dict[str, Any]:
    from schedulers.flags import resource_options

    opts = resource_options(args, ("gpus_per_job", "cpus_per_job"))
    if args.ray_address:
        opts["address"] = args.ray_address
    if args.ray_fit_timeout is not None:
        opts["fit_timeout_s"] = args.ray_fit_timeout
    return opts


BACKEND = RayBackend
