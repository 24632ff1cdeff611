"""The pack worker: the jobs of a pack run as one computation and are recorded one by one.

`pipeline.worker.run_job`, the job function of every backend, hands a pack (`pipeline.jobs.Pack`)
to `run_pack`. It writes each job of
the pack into the store separately, with its own ledger entry, log, heartbeat, checksum and
threads, as `run_job` does for one: every job is marked running first; a job whose problem
cannot be built (its scan, its task) is recorded failed at once and its pack-mates run on;
the others run through `recon.solvers.run_solver_pack`, each with its own checkpoint, so a
stop request (or a Slurm requeue) leaves a checkpoint per job and a rerun continues each job.
A job of the pack already done or diverged (an earlier attempt of this pack that got that
far) is not run again. Jobs whose measurements differ in shape are solved as separate packs.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.jobs import FINISHED, Job, Pack
from pipeline.lease import StopCheck
from pipeline.store import JobWriter, log_path, snapshot
from pipeline.worker import (JobLog, _checkpoint, _heartbeat, _record, device_label, device_name,
                             environment_error, job_problem, write_result)

# the worst outcome of a pack's jobs is the pack's (what a backend reports for the unit)
_WORST_FIRST = ("interrupted", "failed", "diverged", "done")


@dataclass
class _Member:
    """One job of a running pack."""

    job: Job
    writer: JobWriter
    log: JobLog
    problem: object = None
    ckpt: Path | None = None
    status: str | None = None  # recorded outcome


def run_pack(pack: Pack, store_path: str | Path, device, threads: int, stop: StopCheck, where: dict) -> str:
    """Run a pack (with its threads set, the stop check made: `pipeline.worker.run_job`), recording
    each job and where it ran (`where`: ledger `node`, `ray_node_id`); returns the worst of their statuses."""
    from recon.solvers.loop import StopRequested

    t0 = time.perf_counter()
    dev = device_name(device)
    members = _start(pack, store_path, device_label(dev), threads, where)
    if members is None:
        return "interrupted"
    try:
        groups = _set_up(members, store_path, t0)
        for group in groups:
            _solve(group, dev, stop, t0)
    except StopRequested as err:
        _record_left(members, "interrupted", f"stopped by the driver: {err}", t0)
    except KeyboardInterrupt:  # stopped at once (a second Ctrl-C, a cancelled Ray task): record, go on stopping
        _record_left(members, "interrupted", "stopped at once (KeyboardInterrupt)", t0)
        raise
    except Exception as err:  # noqa: BLE001 - the pack's computation itself failed: each job records it
        status = "interrupted" if environment_error(err) else "failed"
        _record_left(members, status, f"{type(err).__name__}: {err}\n{traceback.format_exc()}", t0)
    done = [m.status or "interrupted" for m in members]
    return next((s for s in _WORST_FIRST if s in done), "done")


def _start(pack: Pack, store_path: str | Path, label: str, threads: int, where: dict) -> list[_Member] | None:
    """Mark each job of the pack running (not those an earlier attempt finished); None: the store
    cannot be written (the jobs stay for the rerun)."""
    ledger = snapshot(store_path, list(pack.jobs))  # one chunk per job, not the whole ledger
    todo = [replace(j, resources=pack.resources, checkpoint_every=pack.checkpoint_every) for j in pack.jobs
            if ledger.of(j)[0] not in FINISHED]
    members: list[_Member] = []
    for job in todo:
        log = JobLog(log_path(store_path, job.job_id))
        try:
            writer = JobWriter(store_path, job)
            attempt = writer.start(label, threads, **where)
        except Exception as err:
            if environment_error(err):
                print(f"pack {pack.job_id}: cannot write to {store_path}: {err}", file=sys.stderr, flush=True)
                return None
            log.line(f"cannot open the store {store_path} for job {job.job_id}:\n{traceback.format_exc()}")
            raise
        log.line(f"start job {job.job_id} ({job.label}) attempt {attempt} on {label} with {threads} thread(s) in "
                 f"{pack.job_id} (a pack of {len(todo)}: {', '.join(j.job_id for j in todo)}); solver {job.solver} "
                 f"params {job.params} steps {job.steps}")
        members.append(_Member(job, writer, log))
    return members


def _set_up(members: list[_Member], store_path: str | Path, t0: float) -> list[list[_Member]]:
    """Build each job's problem (a failure is that job's alone); the rest grouped by measurement shape."""
    groups: dict[tuple, list[_Member]] = {}
    for m in members:
        try:
            m.problem = job_problem(m.job)
        except Exception as err:  # noqa: BLE001 - one bad scan never stops its pack-mates
            status = "interrupted" if environment_error(err) else "failed"
            _finish(m, status, f"{type(err).__name__}: {err}\n{traceback.format_exc()}", t0)
            continue
        m.ckpt = _checkpoint(store_path, m.job, m.log)
        y = m.problem.measurements
        groups.setdefault((tuple(y.shape), y.dtype), []).append(m)
    return list(groups.values())


def _solve(group: list[_Member], dev: torch.device, stop: StopCheck, t0: float) -> None:
    """One computation for the group; each job's result written and recorded as it comes back."""
    from recon.rng import solver_seed
    from recon.solvers import run_solver_pack
    from recon.solvers.loop import StopRequested

    job = group[0].job
    results = run_solver_pack(job.solver, [m.problem for m in group], steps=job.steps, params=job.params,
                              seeds=[solver_seed(m.job.scan.id, m.job.seed) for m in group], device=dev,
                              ssim_every=job.ssim_every, checkpoint_paths=[m.ckpt for m in group],
                              checkpoint_every=job.checkpoint_every,
                              progress=[_heartbeat(m.writer) for m in group], should_stop=stop)
    for m, result in zip(group, results):
        if isinstance(result, StopRequested):
            _finish(m, "interrupted", f"stopped by the driver: {result}", t0)
        elif isinstance(result, BaseException):
            _finish(m, "failed", _error_text(result), t0)
        else:
            try:
                _finish(m, write_result(m.writer, m.log, result, m.problem, m.ckpt), "", t0)
            except Exception as err:  # noqa: BLE001 - as run_job: a full disk leaves it for the rerun
                _finish(m, "interrupted" if environment_error(err) else "failed", _error_text(err), t0)


def _finish(m: _Member, status: str, error: str, t0: float) -> None:
    m.status = _record(m.writer, m.log, status, time.perf_counter() - t0, error)


def _record_left(members: list[_Member], status: str, error: str, t0: float) -> None:
    for m in members:
        if m.status is None:
            _finish(m, status, error, t0)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err))}"
