"""Slurm backend (submitit): jobs batched into array tasks, followed through the store's ledger.

Each array task runs a chunk of `jobs_per_task` jobs one after another (`ChunkTask`, a
submitit Checkpointable: at the time limit or on preemption submitit requeues it; a task that
Slurm requeues by itself — `scontrol requeue`, node failure — restarts the same way). A
restarted task skips the jobs of its chunk that already recorded an outcome, and the job it
was running continues from its solver checkpoint (`<STORE>.work/checkpoints/<job_id>.pt`,
written every `checkpoint_every` steps by the solver loop), so it ends with the same numbers
as an uninterrupted run.

Arrays are split at the cluster's MaxArraySize, sharing `--array-parallelism` between them
(Slurm's %N cap applies to one array); jobs with different resource requests go into different
arrays, each group with its own cap. The submitit folder lives in `<STORE>.work/slurm/` (on the
output's file system, which every node must see); every job's log (`logs/<job_id>.log`) names
the Slurm task and its submitit stdout/stderr, and `logs/<job_id>.slurm.out|err` link to them.

Without `--no-wait` the driver polls the ledger for progress; when the arrays have left the
queue, jobs that never recorded an outcome are marked failed with the reason.
`submissions.jsonl` in the same folder lists what was submitted, so a rerun while arrays are
still queued does not submit their jobs twice.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import UsageError
from pipeline.jobs import Job
from pipeline.progress import Progress
from schedulers.base import Backend, JobFn, run_one, with_cpus
from schedulers.ledger import Snapshot, ended_since, record_lost, snapshot, started_since

DEFAULT_ARRAY_PARALLELISM = 256   # submitit's default cap on simultaneously running array tasks
TIME_MARGIN_MIN = 5               # added to each array task's time limit (start-up, store writes)
SIGNAL_DELAY_S = 90               # submitit: USR2 this long before the time limit -> checkpoint, requeue
MAX_TIMEOUT_REQUEUES = 5          # requeues at the time limit before submitit gives up on a task
POLL_S = 5.0
SLURM_COMMANDS = ("sbatch", "squeue", "scontrol", "sinfo")


class SlurmError(UsageError):
    """Slurm is missing or refused the submission (message says what to do; exit code 2)."""


# ---------------------------------------------------------------------------------------------
# what runs inside an array task
# ---------------------------------------------------------------------------------------------
class ChunkTask:
    """Runs a chunk of jobs inside one Slurm array task (see module doc).

    Checkpointable the way submitit.helpers.Checkpointable is (submitit only looks for a
    `checkpoint` method), without importing submitit when this module is imported.
    """

    def __init__(self, job_fn: JobFn, store_path: str, device: str | None, before: dict[str, tuple[int, int]]):
        self.job_fn = job_fn
        self.store_path = store_path
        # Slurm shows a task only the GPUs it granted (CUDA_VISIBLE_DEVICES): 'cuda:K' means 'cuda' there
        self.device = "cuda" if device and device.startswith("cuda") else device
        # ledger (status code, attempts) of each job at submission: an outcome recorded after that
        # belongs to this submission, and a restarted task does not run that job again
        self.before = before

    def __call__(self, jobs: list[Job]) -> dict[str, str]:
        import submitit

        env = submitit.JobEnvironment()  # the job function sets each job's threads (its resources.cpus)
        outcomes: dict[str, str] = {}
        now = snapshot(self.store_path, jobs)
        before = Snapshot({job.index: tuple(self.before.get(job.job_id, (0, 0))) for job in jobs})
        for job in jobs:
            done = ended_since(before, now, job)
            if done:  # recorded before a requeue of this task
                outcomes[job.job_id] = done
                continue
            _link_logs(self.store_path, job, env)
            print(f"job {job.job_id} ({job.label})", flush=True)
            outcomes[job.job_id] = run_one(self.job_fn, job, self.store_path, device=self.device)
            print(f"job {job.job_id}: {outcomes[job.job_id]}", flush=True)
        return outcomes

    def checkpoint(self, jobs: list[Job]) -> Any:
        """Time limit or preemption: resubmit the same chunk (ledger and solver checkpoints hold the state)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, jobs)


def _link_logs(store_path: str, job: Job, env: Any) -> None:
    """Name the Slurm task in the job's log and link its submitit stdout/stderr beside it."""
    from pipeline.store import log_path

    log = log_path(store_path, job.job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    paths = env.paths
    with log.open("a") as fh:
        fh.write(f"slurm: job {env.job_id} on {env.hostname}; submitit stdout {paths.stdout}, stderr {paths.stderr}\n")
    for suffix, target in (("out", paths.stdout), ("err", paths.stderr)):
        link = log.with_suffix(f".slurm.{suffix}")
        try:
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        except OSError:  # file systems without symlinks: the log line above names the files
            pass


# ---------------------------------------------------------------------------------------------
# cluster queries
# ---------------------------------------------------------------------------------------------
def _slurm_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"`{args[0]}` not found: the slurm backend needs a Slurm client on this machine "
                         f"(on a test machine: scripts/slurm-local.sh up)")
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise SlurmError(f"`{' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


def max_array_size() -> int:
    """Most tasks in one array: MaxArraySize (indices run 0 .. MaxArraySize-1)."""
    text = _slurm_cmd("scontrol", "show", "config").stdout
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return max(1, int(value.strip()))
    return 1001  # Slurm's default


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    out = _slurm_cmd("scontrol", "show", "partition", partition, check=False)
    if out.returncode != 0:
        names = _slurm_cmd("sinfo", "-h", "-o", "%R", check=False).stdout.split()
        raise SlurmError(f"--partition {partition}: no such Slurm partition (partitions: {', '.join(names) or 'none'})")


def active_jobs(slurm_ids: Sequence[str]) -> set[str]:
    """The ones of `slurm_ids` (array job ids) that still have tasks pending or running."""
    if not slurm_ids:
        return set()
    out = _slurm_cmd("squeue", "-h", "-r", "-o", "%F %T", "-j", ",".join(slurm_ids), check=False)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # all of them already left the controller's memory
            return set()
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class SlurmBackend(Backend):
    name = "slurm"
    detached = True  # array tasks run on when the driver stops; a rerun follows them

    def __init__(self, device: str | None = None, partition: str | None = None, gpus_per_job: float | None = None,
                 cpus_per_job: int | None = None, mem_gb: float | None = None, time_min: float | None = None,
                 array_parallelism: int | None = None, jobs_per_task: int = 1,
                 sbatch: dict[str, Any] | None = None, wait: bool = True, checkpoint_every: int | None = None,
                 poll_s: float = POLL_S, workers: int = 1, **options: Any):
        super().__init__(device=device, **options)
        self.partition = partition
        self.gpus_per_job, self.cpus_per_job = gpus_per_job, cpus_per_job
        self.mem_gb, self.time_min = mem_gb, time_min
        # `--workers N` (N > 1) also caps the array tasks running at once, unless given explicitly
        if array_parallelism is None:
            array_parallelism = int(workers) if int(workers) > 1 else DEFAULT_ARRAY_PARALLELISM
        self.array_parallelism = int(array_parallelism)
        self.jobs_per_task = int(jobs_per_task)
        self.sbatch = dict(sbatch or {})
        self.wait = bool(wait)
        self.checkpoint_every = checkpoint_every
        self.poll_s = float(poll_s)
        for name in ("array_parallelism", "jobs_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    # ---- what each array task asks for ------------------------------------------------------
    def _request(self, job: Job) -> tuple[int, int, float, float]:
        """(gpus, cpus, mem_gb, time_min) of one job. Slurm allocates whole GPUs: fractions round up."""
        r = job.resources
        gpus = float(self.gpus_per_job if self.gpus_per_job is not None else r.gpus)
        if self.device == "cpu":
            gpus = 0.0
        cpus = int(self.cpus_per_job if self.cpus_per_job is not None else r.cpus)
        mem = float(self.mem_gb if self.mem_gb is not None else r.mem_gb)
        minutes = float(self.time_min if self.time_min is not None else r.time_min)
        return int(math.ceil(gpus)), max(1, cpus), mem, minutes

    def _prepared(self, job: Job) -> Job:
        """The job as its array task runs it: the CPUs it is given (its torch threads) and
        checkpoints so a requeued task resumes (the manifest's setting, or ~10 per run)."""
        every = self.checkpoint_every if self.checkpoint_every is not None else job.checkpoint_every
        if not every:
            every = max(1, job.steps // 10)
        return replace(with_cpus(job, self._request(job)[1]), checkpoint_every=int(every))

    def _executor(self, folder: Path, request: tuple[int, int, float, float], n_jobs: int, cohort: str):
        import submitit

        gpus, cpus, mem, minutes = request
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
        extra = {"requeue": True, **self.sbatch}  # requeue allowed even where JobRequeue=0
        params: dict[str, Any] = dict(
            job_name=f"dipcohort-{cohort}"[:64], cpus_per_task=cpus, mem=f"{int(math.ceil(mem * 1024))}M",
            time=int(math.ceil(minutes * n_jobs)) + TIME_MARGIN_MIN, array_parallelism=self.array_parallelism,
            signal_delay_s=SIGNAL_DELAY_S, additional_parameters=extra,
            # submitit writes --wckey=submitit by default, which sites enforcing wckeys reject: none
            # unless the user asks (--sbatch wckey=NAME lands in additional_parameters)
            wckey=None,
            # the package may be a source checkout rather than installed on the nodes
            setup=[f"export PYTHONPATH={shlex_quote(str(_source_root()))}${{PYTHONPATH:+:$PYTHONPATH}}",
                   f"export OMP_NUM_THREADS={cpus}",
                   # srun (Slurm >= 22.05) no longer inherits --cpus-per-task from sbatch
                   f"export SRUN_CPUS_PER_TASK={cpus}"])
        if gpus:
            params["gpus_per_node"] = gpus
        if self.partition:
            params["partition"] = self.partition
        ex.update_parameters(**params)
        return ex

    # ---- run -------------------------------------------------------------------------------
    def preflight(self, jobs: Sequence[Job]) -> None:
        """submitit installed, the Slurm commands on PATH and answering, the partition known."""
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise SlurmError("--backend slurm: submitit is not installed (pip install 'dipcohort[slurm]')") from None
        missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
        if missing:
            raise SlurmError(f"--backend slurm: {', '.join(missing)} not found on PATH: the slurm backend needs a "
                             f"Slurm client on this machine (on a test machine: scripts/slurm-local.sh up)")
        max_array_size()  # the controller answers
        check_partition(self.partition)

    def run(self, jobs: Sequence[Job], store_path: str | Path, progress: Progress, job_fn: JobFn) -> None:
        from pipeline.store import open_store, work_dir

        store_path = str(Path(store_path).resolve())
        folder = work_dir(store_path) / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        check_partition(self.partition)
        earlier = self._still_queued(list(jobs), folder)
        fresh = [self._prepared(j) for j in jobs if j.job_id not in earlier]
        before = snapshot(store_path, fresh)
        array_of = {job_id: sid for job_id, (sid, _) in earlier.items()}
        if fresh:
            cohort = str(open_store(store_path).attrs.get("cohort", "cohort"))
            submitted = self._submit(fresh, folder, store_path, before, cohort, job_fn)
            array_of.update(submitted)
            print(f"slurm: submitted {len(fresh)} jobs in Slurm job(s) {', '.join(sorted(set(submitted.values())))}; "
                  f"submitit files in {folder}", file=sys.stderr)
        if not self.wait:
            print(f"slurm: not waiting (--no-wait); follow with `dipcohort status {store_path}`", file=sys.stderr)
            return
        # jobs of an earlier submission: their ledger entries at that submission are the baseline
        rows = dict(before.rows)
        rows.update({j.index: earlier[j.job_id][1] for j in jobs if j.job_id in earlier})
        self._follow(list(jobs), store_path, Snapshot(rows), array_of, progress)

    def _submit(self, jobs: list[Job], folder: Path, store_path: str, before: Snapshot, cohort: str,
                job_fn: JobFn) -> dict[str, str]:
        """Submit chunks of jobs as arrays (grouped by request, split at MaxArraySize); job id -> Slurm id."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(self._request(job), []).append(job)
        limit = max_array_size()
        entry = {job.job_id: before.rows.get(job.index, (0, 0)) for job in jobs}
        submitted: dict[str, str] = {}
        for request, members in groups.items():
            chunks = [members[i:i + self.jobs_per_task] for i in range(0, len(members), self.jobs_per_task)]
            parts = [chunks[i:i + limit] for i in range(0, len(chunks), limit)]
            ex = self._executor(folder, request, len(chunks[0]), cohort)
            caps = split_parallelism(self.array_parallelism, len(parts))
            ids: list[str] = []
            for k, part in enumerate(parts):
                extra = dict(ex.parameters.get("additional_parameters") or {})
                extra.pop("dependency", None)
                if k >= self.array_parallelism:  # more arrays than the cap: wait for an earlier one to end
                    extra["dependency"] = f"afterany:{ids[k - self.array_parallelism]}"
                ex.update_parameters(array_parallelism=caps[k], additional_parameters=extra)
                members_part = [j for c in part for j in c]
                task = ChunkTask(job_fn, store_path, self.device, {j.job_id: entry[j.job_id] for j in members_part})
                try:
                    handles = ex.map_array(task, part)
                except Exception as err:  # noqa: BLE001 - sbatch's refusal, said plainly
                    raise SlurmError(f"sbatch refused the array: {err}") from None
                ids.append(handles[0].job_id.split("_")[0])
                submitted.update({j.job_id: ids[-1] for j in members_part})
                self._record(folder, ids[-1], before, members_part)
        return submitted

    @staticmethod
    def _record(folder: Path, slurm_id: str, before: Snapshot, jobs: list[Job]) -> None:
        """Append to submissions.jsonl: the Slurm job and each job's ledger entry at submission."""
        entries = {j.job_id: list(before.rows.get(j.index, (0, 0))) for j in jobs}  # (status code, attempts)
        with (folder / "submissions.jsonl").open("a") as fh:
            fh.write(json.dumps({"slurm_job": slurm_id, "submitted": time.time(), "jobs": entries}) + "\n")

    @staticmethod
    def _still_queued(jobs: list[Job], folder: Path) -> dict[str, tuple[str, tuple[int, int]]]:
        """Jobs that an earlier submission still has pending or running: job id -> (Slurm id, entry)."""
        path = folder / "submissions.jsonl"
        if not path.is_file():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        live = active_jobs(sorted({r["slurm_job"] for r in records}))
        queued = {jid: (r["slurm_job"], tuple(entry)) for r in records if r["slurm_job"] in live
                  for jid, entry in r["jobs"].items()}
        wanted = {j.job_id for j in jobs}
        queued = {jid: v for jid, v in queued.items() if jid in wanted}
        if queued:
            print(f"slurm: {len(queued)} job(s) are still queued or running from an earlier submission "
                  f"(Slurm job(s) {', '.join(sorted({sid for sid, _ in queued.values()}))}); not submitting "
                  f"them again", file=sys.stderr)
        return queued

    def _follow(self, jobs: list[Job], store_path: str, before: Snapshot, array_of: dict[str, str],
                progress: Progress) -> None:
        """Poll the ledger until every job recorded an outcome or its array left the queue."""
        waiting = {job.job_id: job for job in jobs}
        started: set[str] = set()
        try:
            self._poll(waiting, started, store_path, before, array_of, progress)
        except KeyboardInterrupt:
            self.stopping.set()
            raise
        finally:
            if waiting and self.stopping.is_set():
                print(f"slurm: stopped waiting; {len(waiting)} job(s) go on running on Slurm. Follow them with "
                      f"`dipcohort status {store_path}` or rerun to wait for them", file=sys.stderr)

    def _poll(self, waiting: dict[str, Job], started: set[str], store_path: str, before: Snapshot,
              array_of: dict[str, str], progress: Progress) -> None:
        while waiting and not self.stopping.is_set():
            live = active_jobs(sorted({array_of[j] for j in waiting}))
            now = snapshot(store_path, list(waiting.values()))
            for job_id, job in list(waiting.items()):
                if job_id not in started and started_since(before, now, job):
                    started.add(job_id)
                    progress.job_started(job)
                status = ended_since(before, now, job)
                if status is None and array_of[job_id] not in live:
                    status = self._lost(job, store_path, array_of[job_id])
                if status:
                    if job_id not in started:
                        progress.job_started(job)
                    progress.job_finished(job, status)
                    del waiting[job_id]
            if waiting:
                self.stopping.wait(self.poll_s)

    @staticmethod
    def _lost(job: Job, store_path: str, slurm_id: str) -> str:
        """The array left the queue (checked before the ledger was read) without this job's outcome."""
        from pipeline.store import work_dir

        record_lost(job, store_path, f"Slurm job {slurm_id} ended without recording this job (cancelled, "
                                     f"out of time or memory, node failure); see the submitit logs "
                                     f"{work_dir(store_path) / 'slurm'}/{slurm_id}_*")
        return "failed"


def split_parallelism(total: int, arrays: int) -> list[int]:
    """Per-array task caps (Slurm's %N applies to one array) that add up to `total`.

    With more arrays than `total`, each gets 1 and arrays beyond the first `total` are made to
    wait for an earlier one (see `_submit`), so at most `total` tasks run at once either way.
    """
    if arrays <= total:
        return [total // arrays + (1 if k < total % arrays else 0) for k in range(arrays)]
    return [1] * arrays


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# dests of the `dipcohort run` flags this backend reads (giving one of them with another backend is an error)
FLAGS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time_min", "array_parallelism", "jobs_per_task",
         "sbatch", "no_wait")


def add_arguments(group) -> None:
    from schedulers.flags import add_resource_arguments

    group.add_argument("--partition", default=None, help="slurm: partition (default: the cluster's default)")
    add_resource_arguments(group)
    group.add_argument("--mem-gb", type=float, default=None, help="slurm: memory per array task (GB); "
                       "default: the manifest's resources")
    group.add_argument("--time-min", type=float, default=None, help="slurm: time limit per job in minutes "
                       "(an array task gets jobs-per-task times this); default: the manifest's resources")
    group.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                       help=f"slurm: array tasks running at once (default {DEFAULT_ARRAY_PARALLELISM})")
    group.add_argument("--jobs-per-task", type=int, default=None, metavar="K",
                       help="slurm: jobs run one after another in each array task (default 1; more for "
                            "many short jobs)")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: extra sbatch option, repeatable (e.g. --sbatch account=proj --sbatch qos=high)")
    group.add_argument("--no-wait", action="store_true",
                       help="slurm: submit and return; `dipcohort status STORE` shows progress")


def options_from_args(args) -> dict[str, Any]:
    from schedulers.flags import resource_options, sbatch_pairs

    opts = resource_options(args, ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time_min",
                                   "array_parallelism", "jobs_per_task"))
    if args.sbatch:
        opts["sbatch"] = sbatch_pairs(args.sbatch)
    if args.no_wait:
        opts["wait"] = False
    if opts.get("cpus_per_job") is not None:
        opts["cpus_per_job"] = int(math.ceil(opts["cpus_per_job"]))
    return opts


BACKEND = SlurmBackend
