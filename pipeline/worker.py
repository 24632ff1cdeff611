"""The worker: one job = load the scan, build the problem, run the solver, write the results.

This is the one place where scan I/O, operators, solvers and the store meet. `run_job` never
raises for a bad job: an exception becomes status 'failed' (message and traceback in the
ledger and in the job's log), a non-finite loss 'diverged' (metrics kept up to that step).
The ledger's status is written last, so 'done' means the data are complete. The worker only
writes its own job's chunks; the driver created every group and array beforehand.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from pipeline.jobs import Job
from pipeline.scans import build_problem, reference_image
from pipeline.store import JobWriter, checkpoint_path, log_path


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
class JobLog:
    """Append-only per-job log file (`<STORE>.work/logs/<job_id>.log`)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def line(self, text: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with self.path.open("a") as fh:
            fh.write(f"{stamp} {text}\n")


def device_name(device: str | torch.device | None) -> torch.device:
    from recon.solvers import default_device

    return torch.device(device) if device is not None else default_device()


def run_job(job: Job, store_path: str | Path, device: str | torch.device | None = None) -> str:
    """Run one job and record it in the store; returns 'done', 'diverged' or 'failed'."""
    t0 = time.perf_counter()
    dev = device_name(device)
    label = str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    log = JobLog(log_path(store_path, job.job_id))
    try:
        writer = JobWriter(store_path, job)
        attempt = writer.start(label)
    except Exception:
        log.line(f"cannot open the store {store_path} for job {job.job_id}:\n{traceback.format_exc()}")
        raise
    log.line(f"start job {job.job_id} ({job.label}) attempt {attempt} on {label}; "
             f"solver {job.solver} params {json.dumps(job.params, sort_keys=True)} steps {job.steps}")
    error = ""
    try:
        status = _execute(job, store_path, dev, writer, log)
    except Exception as err:  # noqa: BLE001 - one bad scan never stops the cohort
        status = "failed"
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        log.line(f"error: {error}")
    runtime = time.perf_counter() - t0
    writer.finish(status, runtime, error)  # status written last
    log.line(f"end job {job.job_id}: {status} after {runtime:.2f} s")
    return status


def _execute(job: Job, store_path: str | Path, dev: torch.device, writer: JobWriter, log: JobLog) -> str:
    from recon.rng import solver_seed
    from recon.solvers import run_solver
    from recon.tasks import degraded_image

    if not job.image_group:
        raise RuntimeError(f"scan {job.scan.id} could not be loaded when the store was created, so the store has "
                           f"no images for it; fix its source and run the cohort into a new --out")
    problem = build_problem(job.scan, job.seed)
    ckpt = checkpoint_path(store_path, job.job_id)
    resumed = ckpt.is_file()
    if resumed:
        log.line(f"resuming from checkpoint {ckpt}")
    seed = solver_seed(job.scan.id, job.seed)  # input noise and weights per scan, as its measurements
    result = run_solver(job.solver, problem, steps=job.steps, params=job.params, seed=seed, device=dev,
                        ssim_every=job.ssim_every, checkpoint_path=ckpt if job.checkpoint_every else None,
                        checkpoint_every=job.checkpoint_every, progress=None)
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


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f} dB"
