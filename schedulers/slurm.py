"""Slurm backend (submitit): jobs batched into array tasks, followed through the store's ledger.

Each array task runs a chunk of jobs one after another (`ChunkTask`, a submitit Checkpointable).
`--jobs-per-task auto` (the default) packs as many jobs as fit in TASK_MINUTES of their
declared `time_min` (`auto_jobs_per_task`), so the cluster sees tasks of 15-30 minutes rather
than thousands of seconds-long ones, while keeping at least `--array-parallelism` tasks.

Signals: Slurm sends USR2 90 s before a task's time limit or before a preemption (sbatch
`--signal=USR2@90`, submitit's convention) and SIGTERM when it requeues or cancels a task. Either
makes the running job stop at its next step boundary, leave a solver checkpoint
(`<STORE>.work/checkpoints/<job_id>.pt`) and record 'interrupted'; on USR2 submitit then
requeues the task (`checkpoint`), on SIGTERM Slurm does. The restarted task skips the jobs of its
chunk that already recorded an outcome, and the interrupted one continues from its checkpoint,
redoing at most one step, with the numbers of an uninterrupted run (a kill without warning,
such as a node failure, falls back to the periodic checkpoint, every `checkpoint_every` steps).

Arrays are split at the cluster's MaxArraySize, sharing `--array-parallelism` between them
(Slurm's %N cap applies to one array); jobs with different resource requests go into different
arrays, each group with its own cap. No `--wckey` is written unless the user asks (`--sbatch
wckey=NAME`). The submitit folder lives in `<STORE>.work/slurm/` (on the output's file system,
which every node must see): per array its sbatch file, per array task one log
(`<ARRAY>_<TASK>_0_log.out`, stdout and stderr) in which each job's lines form a section that
`dipcohort status STORE --log JOB` prints (the ledger's log_path points there); submitit's
pickles are removed once their array has left the queue.

Without `--no-wait` the driver follows the jobs, every `poll_s` (30 s): one `squeue` and one
read of the ledger entries of the jobs whose task is not pending. When an array has left the
queue, its jobs that never recorded an outcome are marked failed with the reason.
`submissions.jsonl` in the same folder lists what was submitted (each job's task), so a rerun
while arrays are still queued does not submit their jobs twice.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
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
POLL_S = 30.0                     # the driver looks at the queue and the ledger at most this often
TIDY_GRACE_S = 15.0               # how long the driver waits at the end for its arrays to leave the queue
TASK_MINUTES = 30                 # --jobs-per-task auto: an array task holds at most this many minutes of jobs
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

        from pipeline.store import set_log_path
        from pipeline.worker import shared_log

        env = submitit.JobEnvironment()  # the job function sets each job's threads (its resources.cpus)
        task_log = Path(env.paths.stdout)  # the task's one log file (stderr goes there too)
        outcomes: dict[str, str] = {}
        now = snapshot(self.store_path, jobs)
        before = Snapshot({job.index: tuple(self.before.get(job.job_id, (0, 0))) for job in jobs})
        with _stop_on_slurm_signals() as signalled:
            for job in jobs:
                done = ended_since(before, now, job)
                if done:  # recorded before a requeue of this task
                    outcomes[job.job_id] = done
                    continue
                if signalled:
                    break
                set_log_path(self.store_path, job, task_log)
                with shared_log(task_log, job.job_id) as log:
                    log.line(f"slurm: job {env.job_id} on node {os.environ.get('SLURMD_NODENAME', env.hostname)} "
                             f"(host {env.hostname}); job {job.job_id} ({job.label})")
                    outcomes[job.job_id] = run_one(self.job_fn, job, self.store_path, device=self.device)
                    log.line(f"job {job.job_id}: {outcomes[job.job_id]}")
        if signalled:
            _hand_over(signalled[0])
        return outcomes

    def checkpoint(self, jobs: list[Job]) -> Any:
        """Time limit or preemption: resubmit the same chunk (ledger and solver checkpoints hold the state)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, jobs)


@contextmanager
def _stop_on_slurm_signals():
    """Slurm's USR2 (time limit or preemption soon: submitit's requeue signal) and SIGTERM (a
    requeue, preemption or cancel under way) stop the running job at its next step boundary,
    where it leaves a checkpoint and records 'interrupted'; a requeued task redoes at most one
    step. Yields the signals received, with the handler that was there before each."""
    received: list[tuple[int, Any]] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}

    def handler(signum, frame):
        from pipeline.lease import stop_this_process

        received.append((signum, previous[signum]))
        stop_this_process(f"by Slurm's {signal.Signals(signum).name} (requeue, preemption or time limit)")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _hand_over(received: tuple[int, Any]) -> None:
    """The job has stopped: let submitit do what it does on that signal (USR2: call `checkpoint`,
    requeue the task, exit); on SIGTERM Slurm itself requeues or cancels the task: exit."""
    signum, before = received
    if signum == signal.SIGUSR2 and callable(before):
        before(signum, None)
    raise SystemExit(f"stopped by Slurm's {signal.Signals(signum).name}")


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


def task_states(slurm_ids: Sequence[str]) -> dict[str, str]:
    """State of each task still queued of these Slurm jobs (one `squeue`): {'123_4': 'PENDING', ...}
    (an array's tasks as ARRAY_TASK, a job that is no array by its id)."""
    if not slurm_ids:
        return {}
    out = _slurm_cmd("squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(slurm_ids), check=False)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # all of them already left the controller's memory
            return {}
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def array_id(task: str) -> str:
    return task.split("_")[0]


def active_jobs(slurm_ids: Sequence[str]) -> set[str]:
    """The ones of `slurm_ids` (array job ids) that still have tasks pending or running."""
    return {array_id(task) for task in task_states(slurm_ids)}


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class SlurmBackend(Backend):
    name = "slurm"
    detached = True  # array tasks run on when the driver stops; a rerun follows them

    def __init__(self, device: str | None = None, partition: str | None = None, gpus_per_job: float | None = None,
                 cpus_per_job: int | None = None, mem_gb: float | None = None, time_min: float | None = None,
                 array_parallelism: int | None = None, jobs_per_task: int | str = "auto",
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
        self.jobs_per_task = jobs_per_task if jobs_per_task == "auto" else int(jobs_per_task)
        self.sbatch = dict(sbatch or {})
        self.wait = bool(wait)
        self.checkpoint_every = checkpoint_every
        self.poll_s = float(poll_s)
        for name in ("array_parallelism", "jobs_per_task"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
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
        # stderr_to_stdout: one log file per array task (the jobs' log sections go there too)
        extra = {"requeue": True, **self.sbatch}  # requeue allowed even where JobRequeue=0
        params: dict[str, Any] = dict(
            # one task a job, whatever the allocation: with --exclusive Slurm would otherwise start
            # one srun task per CPU, each running the whole chunk
            job_name=f"dipcohort-{cohort}"[:64], cpus_per_task=cpus, ntasks_per_node=1, mem=f"{int(math.ceil(mem * 1024))}M",
            time=int(math.ceil(minutes * n_jobs)) + TIME_MARGIN_MIN, array_parallelism=self.array_parallelism,
            signal_delay_s=SIGNAL_DELAY_S, additional_parameters=extra, stderr_to_stdout=True,
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
        task_of = {job_id: task for job_id, (task, _) in earlier.items()}
        if fresh:
            cohort = str(open_store(store_path).attrs.get("cohort", "cohort"))
            submitted = self._submit(fresh, folder, store_path, before, cohort, job_fn)
            task_of.update(submitted)
            print(f"slurm: submitted {len(fresh)} jobs in Slurm job(s) "
                  f"{', '.join(sorted({array_id(t) for t in submitted.values()}))}; "
                  f"submitit files in {folder}", file=sys.stderr)
        if not self.wait:
            print(f"slurm: not waiting (--no-wait); follow with `dipcohort status {store_path}`", file=sys.stderr)
            return
        # jobs of an earlier submission: their ledger entries at that submission are the baseline
        rows = dict(before.rows)
        rows.update({j.index: earlier[j.job_id][1] for j in jobs if j.job_id in earlier})
        self._follow(list(jobs), store_path, Snapshot(rows), task_of, progress)

    def _submit(self, jobs: list[Job], folder: Path, store_path: str, before: Snapshot, cohort: str,
                job_fn: JobFn) -> dict[str, str]:
        """Submit chunks of jobs as arrays (grouped by request, split at MaxArraySize); job id -> its
        Slurm task ('ARRAY_TASK', or the job id of an array of one)."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(self._request(job), []).append(job)
        limit = max_array_size()
        entry = {job.job_id: before.rows.get(job.index, (0, 0)) for job in jobs}
        submitted: dict[str, str] = {}
        for request, members in groups.items():
            per_task = self.jobs_per_task
            if per_task == "auto":
                per_task = auto_jobs_per_task(request[3], len(members), self.array_parallelism)
            chunks = [members[i:i + per_task] for i in range(0, len(members), per_task)]
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
                ids.append(array_id(handles[0].job_id))
                tasks = {j.job_id: h.job_id for h, c in zip(handles, part) for j in c}
                submitted.update(tasks)
                self._record(folder, ids[-1], before, members_part, tasks)
        return submitted

    @staticmethod
    def _record(folder: Path, slurm_id: str, before: Snapshot, jobs: list[Job], tasks: dict[str, str]) -> None:
        """Append to submissions.jsonl: the Slurm job, each job's ledger entry at submission and its task."""
        entries = {j.job_id: list(before.rows.get(j.index, (0, 0))) for j in jobs}  # (status code, attempts)
        with (folder / "submissions.jsonl").open("a") as fh:
            fh.write(json.dumps({"slurm_job": slurm_id, "submitted": time.time(), "jobs": entries,
                                 "tasks": tasks}) + "\n")

    @staticmethod
    def _still_queued(jobs: list[Job], folder: Path) -> dict[str, tuple[str, tuple[int, int]]]:
        """Jobs that an earlier submission still has pending or running: job id -> (its Slurm task, entry)."""
        path = folder / "submissions.jsonl"
        if not path.is_file():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        live = active_jobs(sorted({r["slurm_job"] for r in records}))
        tidy(folder, {r["slurm_job"] for r in records} - live)
        queued = {jid: (r.get("tasks", {}).get(jid, r["slurm_job"]), tuple(entry)) for r in records
                  if r["slurm_job"] in live for jid, entry in r["jobs"].items()}
        wanted = {j.job_id for j in jobs}
        queued = {jid: v for jid, v in queued.items() if jid in wanted}
        if queued:
            print(f"slurm: {len(queued)} job(s) are still queued or running from an earlier submission "
                  f"(Slurm job(s) {', '.join(sorted({array_id(t) for t, _ in queued.values()}))}); not submitting "
                  f"them again", file=sys.stderr)
        return queued

    def _follow(self, jobs: list[Job], store_path: str, before: Snapshot, task_of: dict[str, str],
                progress: Progress) -> None:
        """Poll the ledger until every job recorded an outcome or its array left the queue."""
        waiting = {job.job_id: job for job in jobs}
        started: set[str] = set()
        try:
            self._poll(waiting, started, store_path, before, task_of, progress)
        except KeyboardInterrupt:
            self.stopping.set()
            raise
        finally:
            if waiting and self.stopping.is_set():
                print(f"slurm: stopped waiting; {len(waiting)} job(s) go on running on Slurm. Follow them with "
                      f"`dipcohort status {store_path}` or rerun to wait for them", file=sys.stderr)

    def _poll(self, waiting: dict[str, Job], started: set[str], store_path: str, before: Snapshot,
              task_of: dict[str, str], progress: Progress) -> None:
        """Every `poll_s` (30 s): one `squeue`, then one read of the ledger entries of the jobs
        whose task is not pending (a queue of 10,000 pending jobs costs no file reads)."""
        from pipeline.store import work_dir

        folder, ended = work_dir(store_path) / "slurm", set()
        while waiting and not self.stopping.is_set():
            states = task_states(sorted({array_id(task_of[j]) for j in waiting}))
            arrays = {array_id(t) for t in states}
            look = [job for job_id, job in waiting.items() if states.get(task_of[job_id]) != "PENDING"]
            now = snapshot(store_path, look)
            for job in look:
                job_id = job.job_id
                if job_id not in started and started_since(before, now, job):
                    started.add(job_id)
                    progress.job_started(job)
                status = ended_since(before, now, job)
                if status is None and array_id(task_of[job_id]) not in arrays:  # queue read before the ledger
                    status = self._lost(job, store_path, array_id(task_of[job_id]))
                if status:
                    if job_id not in started:
                        progress.job_started(job)
                    progress.job_finished(job, status)
                    del waiting[job_id]
                    ended.add(job_id)
            if waiting:
                self.stopping.wait(self.poll_s)
        if ended:
            self._tidy_when_gone(folder, {array_id(task_of[j]) for j in ended})

    @staticmethod
    def _tidy_when_gone(folder: Path, arrays: set[str]) -> None:
        """Tidy the arrays once they leave the queue (their last tasks are still exiting when the
        last outcome is read); those still there after TIDY_GRACE_S are tidied by the next run."""
        end = time.monotonic() + TIDY_GRACE_S
        while arrays:
            gone = arrays - active_jobs(sorted(arrays))
            tidy(folder, gone)
            arrays -= gone
            if not arrays or time.monotonic() > end:
                return
            time.sleep(1.0)

    @staticmethod
    def _lost(job: Job, store_path: str, slurm_id: str) -> str:
        """The array left the queue (checked before the ledger was read) without this job's outcome."""
        from pipeline.store import work_dir

        record_lost(job, store_path, f"Slurm job {slurm_id} ended without recording this job (cancelled, "
                                     f"out of time or memory, node failure); see the submitit logs "
                                     f"{work_dir(store_path) / 'slurm'}/{slurm_id}_*")
        return "failed"


def auto_jobs_per_task(time_min: float, n_jobs: int, parallelism: int) -> int:
    """`--jobs-per-task auto`: as many jobs as fit in TASK_MINUTES of their declared time limit
    (floor(30 / time_min): an array task then runs 15-30 minutes of limits when a job's limit is
    under 15 minutes, one job when it is longer), but never so many that fewer array tasks than
    `parallelism` could run at once (a small cohort still spreads over the cluster)."""
    fit = max(1, int(TASK_MINUTES // max(float(time_min), 1e-9)))
    spread = max(1, math.ceil(n_jobs / max(1, parallelism)))
    return min(fit, spread)


def tidy(folder: Path, gone: set[str]) -> None:
    """Remove submitit's pickles of Slurm jobs that have left the queue (nothing can requeue them;
    the ledger holds the outcomes): the task logs and sbatch files stay, for the admin and the user."""
    for slurm_id in gone:
        for pattern in (f"{slurm_id}_*submitted.pkl", f"{slurm_id}_*result.pkl"):
            for path in folder.glob(pattern):
                path.unlink(missing_ok=True)
    # submitit leaves a link .submission_file_<uuid>.sh -> <slurm id>_submission.sh per submission
    for link in folder.glob(".submission_file_*.sh"):
        if link.is_symlink() and array_id(Path(os.readlink(link)).name) in gone:
            link.unlink(missing_ok=True)


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
    group.add_argument("--jobs-per-task", type=_jobs_per_task, default=None, metavar="K|auto",
                       help=f"slurm: jobs run one after another in each array task (default auto: as many "
                            f"as fit in {TASK_MINUTES} min of their time limits, keeping at least "
                            f"--array-parallelism tasks)")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: extra sbatch option, repeatable (e.g. --sbatch account=proj --sbatch qos=high)")
    group.add_argument("--no-wait", action="store_true",
                       help="slurm: submit and return; `dipcohort status STORE` shows progress")


def _jobs_per_task(text: str) -> int | str:
    import argparse

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, got {text!r}")
    return value


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
