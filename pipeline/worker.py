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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.jobs import Job, ScanSpec, canonical_json
from pipeline.store import ImageShape, JobWriter, checkpoint_path, log_path


# ---------------------------------------------------------------------------------------------
# problem building (also used by the driver to learn image shapes)
# ---------------------------------------------------------------------------------------------
def load(spec: ScanSpec):
    """The scan's data (pipeline.io): gray unless the task takes colour (natural-image tasks)."""
    from pipeline.io import load_scan

    gray = not spec.color or spec.task in ("mri", "ct")
    return load_scan(spec.source, size=spec.size, grayscale=gray)


def build_problem(spec: ScanSpec, seed: int, data=None):
    """A recon.Problem for this scan: simulated from the ground truth, or from measured data."""
    from recon import simulate as sim

    if spec.kind == "simulate":
        data = load(spec) if data is None else data
        return sim.simulate(spec.task, data.image, dict(spec.task_params), seed)
    reference = None
    if spec.reference:
        from pipeline.io import load_scan

        reference = load_scan(spec.reference, size=spec.size, grayscale=True).image
    if spec.task == "ct":  # a post-log sinogram: raw numbers, not an image to normalise
        measured = load_array(spec.source) if data is None else data
    else:  # fastMRI k-space (ScanData with kspace and its reference)
        measured = load(spec) if data is None else data
    if spec.task == "mri" and getattr(measured, "kspace", None) is not None:
        # the same problem the single-scan CLI builds (default acceleration included)
        from pipeline.io import scan_problem

        return scan_problem(measured, "mri", dict(spec.task_params), seed, reference=reference)
    return sim.from_measurements(spec.task, measured, dict(spec.task_params), reference=reference, seed=seed)


def load_array(source: str) -> np.ndarray:
    """A measured array (CT sinogram) from .npy or .npz (`FILE.npz#key=NAME`), without pickle."""
    file, _, fragment = source.partition("#")
    path = Path(file)
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"{source}: a measured sinogram must be a .npy or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        key = fragment.removeprefix("key=") or ("sinogram" if "sinogram" in loaded.files else None)
        if key is None and len(loaded.files) == 1:
            key = loaded.files[0]
        if key not in loaded.files:
            raise ValueError(f"{source}: expected an array named by '#key=NAME' or 'sinogram'; "
                             f"found {', '.join(loaded.files)}")
        return loaded[key]


def image_shape(problem) -> ImageShape:
    from recon.simulate import degraded_image

    _, c, h, w = problem.image_shape
    return ImageShape(channels=int(c), display_channels=int(degraded_image(problem).shape[1]),
                      height=int(h), width=int(w))


def probe_shapes(scans: Sequence[ScanSpec], threads: int = 4) -> dict[str, ImageShape]:
    """Image shape of every scan, for the driver to create image groups before workers start.

    Scans are loaded in a few threads (I/O bound); a problem is built once per distinct
    (task, params, kind, array shapes), since the shape depends on nothing else.
    """
    def loaded(spec: ScanSpec):
        return load_array(spec.source) if spec.kind == "measured" and spec.task == "ct" else load(spec)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        data = list(pool.map(loaded, scans))
    by_signature: dict[str, ImageShape] = {}
    out: dict[str, ImageShape] = {}
    for spec, d in zip(scans, data):
        arrays = [list(d.shape)] if isinstance(d, np.ndarray) else \
            {k: list(np.shape(v)) for k, v in vars(d).items() if isinstance(v, np.ndarray)}
        key = canonical_json([spec.task, spec.task_params, spec.kind, spec.reference, arrays])
        if key not in by_signature:
            by_signature[key] = image_shape(build_problem(spec, 0, d))
        out[spec.id] = by_signature[key]
    return out


def reference_image(problem) -> torch.Tensor | None:
    """The ground truth in display format (1, Cd, H, W), or None without one."""
    gt = problem.ground_truth
    return None if gt is None else problem.display(gt).detach().float().cpu()


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
    from recon.simulate import degraded_image
    from recon.solvers import run_solver

    if not job.image_group:
        raise RuntimeError(f"scan {job.scan.id} could not be loaded when the store was created, so the store has "
                           f"no images for it; fix its source and run the cohort into a new --out")
    problem = build_problem(job.scan, job.seed)
    ckpt = checkpoint_path(store_path, job.job_id)
    resumed = ckpt.is_file()
    if resumed:
        log.line(f"resuming from checkpoint {ckpt}")
    result = run_solver(job.solver, problem, steps=job.steps, params=job.params, seed=job.seed, device=dev,
                        ssim_every=job.ssim_every, checkpoint_path=ckpt if job.checkpoint_every else None,
                        checkpoint_every=job.checkpoint_every, progress=None)
    writer.metrics(result.history)
    writer.summary(result.summary())
    writer.images(final=result.image, early_stopped=result.es_image, reference=reference_image(problem),
                  degraded=degraded_image(problem).cpu())
    status = "diverged" if result.diverged else "done"
    s = result.summary()
    log.line(f"{status}: {s['steps']} steps in {s['runtime_s']:.2f} s, final PSNR {_fmt(s['final_psnr'])}, "
             f"peak PSNR {_fmt(s['peak_psnr'])} at step {s['peak_step']}")
    ckpt.unlink(missing_ok=True)  # results are in the store: the checkpoint has served
    return status


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f} dB"
