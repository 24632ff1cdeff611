"""Fabricated results stores for the aggregation / query / report tests and the scale benchmark.

The store is created with the driver's own `pipeline.store.create_store` and filled with the
worker's own `pipeline.store.JobWriter` (data first, ledger status last), so the layout cannot
drift from what `dipcohort run` writes. Only the numbers are synthetic: DIP-like PSNR curves
(rise, peak, overfitting decay) whose statistics the tests recompute with numpy from the
arrays returned in `Fabricated`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import store as st
from pipeline.jobs import STATUS_CODES, Job, ScanSpec, config_id_for, job_id_for

METRIC_NAMES = ["loss", "psnr", "ssim", "movvar", "data"]
SUMMARY_FIELDS = list(st.SUMMARY_FIELDS)
# (solver, params, steps): two configurations of aseqdip to exercise grouping by config
CONFIGS = (("dip", {}, 120), ("aseqdip", {"lambda": 0.5}, 120), ("aseqdip", {"lambda": 1.0}, 80))


@dataclass
class Fabricated:
    """What was written, in job-row order, for the tests to compare with."""

    path: Path
    jobs: list[Job]
    status: np.ndarray                        # int8 codes
    metrics: np.ndarray                       # (job, metric, step) float32 as stored
    summary: np.ndarray                       # (job, field) float64 as stored
    images: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (job, C, H, W), NaN if absent

    def column(self, name: str) -> np.ndarray:
        return self.summary[:, SUMMARY_FIELDS.index(name)]

    def coord(self, name: str) -> np.ndarray:
        get = {"task": lambda j: j.scan.task, "scan_id": lambda j: j.scan.id}.get(name, lambda j: getattr(j, name))
        return np.array([get(j) for j in self.jobs])


def make_jobs(tasks=("denoise", "mri"), configs=CONFIGS, n_scans=3, seeds=(0, 1)) -> list[Job]:
    """scans × configs × seeds in manifest order, with the real id and config hashes."""
    jobs = []
    for task in tasks:
        for s in range(n_scans):
            scan = ScanSpec(id=f"{task}{s:03d}", source="skimage:camera", task=task, task_params={})
            for solver, params, steps in configs:
                for seed in seeds:
                    jobs.append(Job(job_id=job_id_for(scan, solver, params, seed, steps, 10), index=len(jobs),
                                    scan=scan, solver=solver, params=params, config=config_id_for(solver, params),
                                    seed=seed, steps=steps))
    return jobs


def create(path: str | Path, jobs: list[Job], size: int = 16, metric_names=METRIC_NAMES) -> list[Job]:
    """Create the empty store exactly as the driver does; returns the jobs placed in image groups."""
    shapes = {j.scan.id: st.ImageShape(2 if j.scan.task == "mri" else 1, 1, size, size) for j in jobs}
    placed, groups = st.assign_image_groups(jobs, shapes)
    st.create_store(path, placed, groups, cohort="fabricated", manifest_text="cohort: fabricated\n",
                    manifest_path=Path(path).parent / "fabricated.yaml", metric_names=metric_names)
    return placed


def synthetic_curves(n: int, n_steps: int, rng: np.random.Generator, ssim_every: int = 10) -> np.ndarray:
    """(n, metric, step) float32 in METRIC_NAMES order: PSNR rises to a peak, then overfits."""
    k = np.arange(n_steps, dtype=np.float64)[None, :]
    peak = rng.uniform(24, 32, (n, 1))
    tau = rng.uniform(0.05, 0.15, (n, 1)) * n_steps
    decay = rng.uniform(0, 8, (n, 1)) / n_steps
    psnr = 10 + (peak - 10) * (1 - np.exp(-k / tau)) - decay * np.maximum(k - 3 * tau, 0)
    psnr = psnr + rng.normal(0, 0.2, psnr.shape)
    ssim = np.clip(psnr / 40, 0, 1)
    ks = np.arange(n_steps)
    ssim[:, (ks % ssim_every != 0) & (ks != n_steps - 1)] = np.nan  # every k steps and the last, as the loop
    loss = 10 ** (-(psnr / 10))
    movvar = np.abs(np.gradient(psnr, axis=1)) * 1e-3
    return np.stack([loss, psnr, ssim, movvar, loss], axis=1).astype(np.float32)


def summary_row(metrics: np.ndarray, diverged: bool, rng: np.random.Generator) -> np.ndarray:
    """Summary fields consistent with one job's metrics (what the loop's SolverResult reports)."""
    psnr, ssim = metrics[1].astype(np.float64), metrics[2].astype(np.float64)
    ran = int(np.sum(~np.isnan(metrics[0])))  # steps run (a diverged loss is inf)
    peak_step = int(np.nanargmax(psnr))
    es_step = int(np.clip(peak_step + rng.integers(-5, 20), 0, ran - 1))
    runtime = ran * rng.uniform(0.01, 0.02)
    last = ran - 1
    row = {"peak_psnr": psnr[peak_step], "peak_step": peak_step,
           "final_psnr": np.nan if diverged else psnr[last], "final_ssim": np.nan if diverged else ssim[last],
           "es_step": es_step, "es_psnr": psnr[es_step], "es_ssim": float(np.clip(psnr[es_step] / 40, 0, 1)),
           "steps": ran, "runtime_s": runtime, "steps_per_s": ran / runtime,
           "diverged": float(diverged), "stopped_early": 0.0}
    return np.array([row.get(f, np.nan) for f in SUMMARY_FIELDS], dtype=np.float64)


def fabricate_store(path: str | Path, *, tasks=("denoise", "mri"), configs=CONFIGS, n_scans=3, seeds=(0, 1),
                    size: int = 16, statuses: dict[int, str] | None = None, seed: int = 0,
                    settled: bool = True) -> Fabricated:
    """A small store written job by job with the worker's writer; every job done unless
    `statuses` says otherwise ({job row: 'pending' | 'running' | 'failed' | 'diverged'}).
    `settled`: the ledger's entries folded into its columns, as the driver leaves it after a run."""
    rng = np.random.default_rng(seed)
    jobs = create(path, make_jobs(tasks, configs, n_scans, seeds), size)
    n, n_steps = len(jobs), max(j.steps for j in jobs)
    status = np.full(n, STATUS_CODES["done"], dtype=np.int8)
    for i, name in (statuses or {}).items():
        status[i] = STATUS_CODES[name]
    metrics = np.full((n, len(METRIC_NAMES), n_steps), np.nan, dtype=np.float32)
    summary = np.full((n, len(SUMMARY_FIELDS)), np.nan)
    images = _empty_images(jobs, size)
    for job in jobs:
        _write_job(path, job, int(status[job.index]), metrics, summary, images, rng)
    if settled:
        st.settle(path)
    return Fabricated(Path(path), jobs, status, metrics, summary, images)


def _empty_images(jobs: list[Job], size: int) -> dict[str, np.ndarray]:
    c = max(2 if j.scan.task == "mri" else 1 for j in jobs)
    return {"final": np.full((len(jobs), c, size, size), np.nan, np.float32),
            "reference": np.full((len(jobs), 1, size, size), np.nan, np.float32),
            "degraded": np.full((len(jobs), 1, size, size), np.nan, np.float32)}


def _write_job(path, job: Job, code: int, metrics, summary, images, rng) -> None:
    if code == STATUS_CODES["pending"]:
        return
    w = st.JobWriter(path, job)
    w.start("cpu")
    if code == STATUS_CODES["running"]:
        return  # interrupted: no data, status left 'running'
    if code == STATUS_CODES["failed"]:
        w.finish("failed", 0.25, error=f"RuntimeError: boom in {job.job_id}\nTraceback ...")
        return
    curves = synthetic_curves(1, job.steps, rng)[0]
    diverged = code == STATUS_CODES["diverged"]
    if diverged:  # metrics kept up to the step whose loss was not finite
        stop = int(rng.integers(job.steps // 4, job.steps // 2))
        curves[:, stop + 1:] = np.nan
        curves[0, stop] = np.inf
    metrics[job.index, :, :job.steps] = curves
    summary[job.index] = summary_row(curves, diverged, rng)
    w.metrics(dict(zip(METRIC_NAMES, curves)))
    w.summary(dict(zip(SUMMARY_FIELDS, summary[job.index])))
    c, size = (2 if job.scan.task == "mri" else 1), images["final"].shape[-1]
    ref = rng.uniform(0, 1, (1, size, size)).astype(np.float32)
    final = np.repeat(ref, c, axis=0) + rng.normal(0, 0.05, (c, size, size)).astype(np.float32)
    degraded = ref + rng.normal(0, 0.2, ref.shape).astype(np.float32)
    images["final"][job.index, :c], images["reference"][job.index], images["degraded"][job.index] = final, ref, degraded
    w.images(final=final, early_stopped=None, reference=ref, degraded=degraded)
    w.finish("diverged" if diverged else "done", float(summary[job.index, SUMMARY_FIELDS.index("runtime_s")]) + 0.5)
