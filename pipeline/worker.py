"""The worker: one job = load the scan, build the problem, run the solver, write the results.

This is the one place where scan I/O, operators, solvers and the store meet. `run_job` never
raises for a bad job: an exception becomes status 'failed' (message and traceback in the
ledger and in the job's log), a non-finite loss 'diverged' (metrics kept up to that step).
The ledger's status is written last, so 'done' means the data are complete. The worker only
writes its own job's chunks; the driver created every group and array beforehand.

`run_job` is the job function the driver hands to every backend (a job, or a pack of jobs run
together: `pipeline.pack_worker`). It runs the job with
`job.resources.cpus` torch threads (recorded in the ledger), whatever the backend, so the same
job gives the same numbers on every backend. While it runs it renews the job's ledger heartbeat
(every `JOB_HEARTBEAT_S`), so `status` tells a running job from one whose worker died. When the
driver asks to stop (`pipeline.lease.request_stop`), the job stops at its next step boundary,
leaves a checkpoint and is recorded 'interrupted'; a rerun continues from that checkpoint. A
job not yet started when the stop comes is left as it is (pending) and returns 'interrupted'.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
import math
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipeline.jobs import Job, Pack
from pipeline.lease import JOB_HEARTBEAT_S, StopCheck
from pipeline.scans import build_problem, reference_image
from pipeline.store import JobWriter, checkpoint_path, log_path


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
class JobLog:
    """Append-only job log: `<STORE>.work/logs/<job_id>.log`, or a section of a file that several
    jobs share (`shared_log`: one file per Slurm array task instead of one per job)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def line(self, text: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with self.path.open("a") as fh:
            fh.write(f"{stamp} {text}\n")


_SHARED_LOG: list[Path] = []  # the file the jobs of this process log into (shared_log), if any
SECTION = "=== job {job_id} {edge} ==="  # a job's section in a shared log: begin ... end


@contextmanager
def shared_log(path: Path, job_id: str):
    """While a job runs, its log lines go to `path` (shared with other jobs) between markers
    that `log_section` finds; the markers are appended like the lines, so they stay in order."""
    log = JobLog(path)
    log.line(SECTION.format(job_id=job_id, edge="begin"))
    _SHARED_LOG.append(path)
    try:
        yield log
    finally:
        _SHARED_LOG.remove(path)
        log.line(SECTION.format(job_id=job_id, edge="end"))


def job_log(store_path: str | Path, job_id: str) -> JobLog:
    return JobLog(_SHARED_LOG[-1] if _SHARED_LOG else log_path(store_path, job_id))


def log_section(text: str, job_id: str) -> str:
    """The lines of `job_id` in a log: its sections of a shared log (every attempt; a section
    cut off by a kill ends where the next job's begins), else the sections that name it (a pack's
    section names every member), or the whole of a job's own log."""
    if "=== job " not in text:
        return text
    sections = _sections(text)
    own = [body for owner, body in sections if owner == job_id]
    return "".join(own or [body for _, body in sections if job_id in body])


def _sections(text: str) -> list[tuple[str, str]]:
    """(owner id, text) of each `=== job ID begin ===` ... `=== job ID end ===` section."""
    out: list[tuple[str, list[str]]] = []
    inside = False
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip()
        if stripped.endswith(" begin ===") and "=== job " in stripped:
            out.append((stripped.rsplit("=== job ", 1)[1].split()[0], []))
            inside = True
        if inside:
            out[-1][1].append(line)
        if stripped.endswith(" end ===") and "=== job " in stripped:
            inside = False
    return [(owner, "".join(lines)) for owner, lines in out]


def device_name(device: str | torch.device | None) -> torch.device:
    from recon.solvers import default_device

    return torch.device(device) if device is not None else default_device()


def device_label(dev: torch.device) -> str:
    """The device as the ledger records it (a GPU with its model)."""
    return str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})"


@contextmanager
def job_threads(job: Job | Pack):
    """The job's (or pack's) torch threads (its resources.cpus) while it runs; the caller's afterwards."""
    before = torch.get_num_threads()
    threads = max(1, int(job.resources.cpus))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def run_job(job: Job | Pack, store_path: str | Path, device: str | torch.device | None = None,
            where: dict[str, str] | None = None) -> str:
    """Run one job and record it in the store; returns 'done', 'diverged', 'failed' or 'interrupted'.
    A pack of jobs (`pipeline.pack_worker.run_pack`) records each of them and returns the worst.

    where: the backend's name of the place it runs, recorded in the ledger (`node`, `ray_node_id`;
    default: the host)."""
    stop = StopCheck(store_path)
    if stop():
        return "interrupted"  # the driver is stopping: leave the job for the rerun, untouched
    if isinstance(job, Pack):
        from pipeline.pack_worker import run_pack as body
    else:
        body = _run_job
    with job_threads(job) as threads:
        return body(job, store_path, device, threads, stop, where or {})


# the file system, not the job: the job is 'interrupted' (rerun continues it), never 'failed'
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def environment_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS


def _run_job(job: Job, store_path: str | Path, device, threads: int, stop: StopCheck, where: dict) -> str:
    from recon.solvers.loop import StopRequested

    t0 = time.perf_counter()
    dev = device_name(device)
    label = device_label(dev)
    log = job_log(store_path, job.job_id)
    try:
        writer = JobWriter(store_path, job)
        attempt = writer.start(label, threads, **where)
    except Exception as err:
        if environment_error(err):  # nothing could be recorded: the job stays as it was for the rerun
            print(f"job {job.job_id}: cannot write to {store_path}: {err}", file=sys.stderr, flush=True)
            return "interrupted"
        log.line(f"cannot open the store {store_path} for job {job.job_id}:\n{traceback.format_exc()}")
        raise
    error = ""
    try:
        place = "".join(f" {name} {value}" for name, value in where.items() if value)
        log.line(f"start job {job.job_id} ({job.label}) attempt {attempt} on {label}{place} pid {os.getpid()} with "
                 f"{threads} thread(s); "
                 f"solver {job.solver} params {json.dumps(job.params, sort_keys=True)} steps {job.steps}")
        status = _execute(job, store_path, dev, writer, log, stop)
    except StopRequested as err:  # logged by _record
        status, error = "interrupted", f"stopped {stop.reason}: {err}"
    except KeyboardInterrupt:  # stopped at once (a second Ctrl-C, a cancelled Ray task): record, go on stopping
        _record(writer, log, "interrupted", time.perf_counter() - t0, "stopped at once (KeyboardInterrupt)")
        raise
    except Exception as err:  # noqa: BLE001 - one bad scan never stops the cohort
        status = "interrupted" if environment_error(err) else "failed"
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        if status == "interrupted":
            print(f"job {job.job_id}: cannot write its results: {err}", file=sys.stderr, flush=True)
    return _record(writer, log, status, time.perf_counter() - t0, error)


def _record(writer: JobWriter, log: JobLog, status: str, runtime: float, error: str) -> str:
    """Write the outcome (status last) and log it; a full or read-only disk leaves the job for the rerun."""
    try:
        if error:
            log.line(f"error: {error}" if status == "failed" else error)
        writer.finish(status, runtime, error)  # status written last
        log.line(f"end job {writer.job.job_id}: {status} after {runtime:.2f} s")
    except OSError as err:
        if not environment_error(err):
            raise
        print(f"job {writer.job.job_id}: cannot record its outcome ({status}): {err}", file=sys.stderr, flush=True)
        return "interrupted"
    return status


def _heartbeat(writer: JobWriter, every_s: float | None = None):
    """A loop progress callback that renews the job's ledger heartbeat at most every `every_s`."""
    every_s = JOB_HEARTBEAT_S if every_s is None else every_s
    last = [time.monotonic()]

    def beat(step: int, total: int, values: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            writer.heartbeat()
    return beat


def _execute(job: Job, store_path: str | Path, dev: torch.device, writer: JobWriter, log: JobLog,
             stop: StopCheck) -> str:
    from recon.rng import solver_seed
    from recon.solvers import run_solver

    problem = job_problem(job)
    ckpt = _checkpoint(store_path, job, log)
    # the checkpoint path is always given: a stop request leaves a checkpoint there (periodic
    # checkpoints only with checkpoint_every), so a rerun continues where the job stopped
    result = run_solver(job.solver, problem, steps=job.steps, params=job.params,
                        seed=solver_seed(job.scan.id, job.seed), device=dev,
                        ssim_every=job.ssim_every, checkpoint_path=ckpt, checkpoint_every=job.checkpoint_every,
                        progress=_heartbeat(writer), should_stop=stop)
    return write_result(writer, log, result, problem, ckpt)


def job_problem(job: Job):
    """The job's recon.Problem (its scan loaded, its measurements simulated)."""
    if not job.image_group:
        raise RuntimeError(f"scan {job.scan.id} could not be loaded when the store was created, so the store has "
                           f"no images for it; fix its source and run the cohort into a new --out")
    return build_problem(job.scan, job.seed)


def _checkpoint(store_path: str | Path, job: Job, log: JobLog) -> Path:
    ckpt = checkpoint_path(store_path, job.job_id)
    if ckpt.is_file():
        log.line(f"resuming from checkpoint {ckpt} at step {checkpoint_step(ckpt)}")
    return ckpt


def write_result(writer: JobWriter, log: JobLog, result, problem, ckpt: Path) -> str:
    """Write a finished job's metrics, summary and images; returns 'done' or 'diverged' (not yet recorded)."""
    from recon.tasks import degraded_image

    writer.metrics(result.history)
    writer.summary(result.summary())
    writer.images(final=result.image, early_stopped=result.es_image, ema=result.ema_image,
                  reference=reference_image(problem),
                  degraded=degraded_image(problem).cpu())
    status = "diverged" if result.diverged else "done"
    s = result.summary()
    log.line(f"{status}: {s['steps']} steps in {s['runtime_s']:.2f} s, final PSNR {_fmt(s['final_psnr'])}, "
             f"peak PSNR {_fmt(s['peak_psnr'])} at step {s['peak_step']}")
    ckpt.unlink(missing_ok=True)  # results are in the store: the checkpoint has served
    return status


def checkpoint_step(path: Path) -> int | str:
    """The step a checkpoint continues at ('?' where it cannot be read: the solver then says why)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["next_step"])
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f} dB"
