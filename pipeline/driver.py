"""The driver of a cohort run: create or reopen the store, probe shapes, place late jobs, run, summarize.

The command line (`dipcohort run`, `dipcohort demo`), tests and benchmarks call these steps; the
backend that runs the jobs is built by the caller (pipeline never imports schedulers) and handed in.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.jobs import STATUS_CODES, Job


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_cohort(manifest_path: str | Path, out: str | Path, backend, *, resume: bool = False,
               retry_failed: bool = False, progress: str = "auto", stream=None) -> dict[str, int]:
    """Run a manifest into `out` with `backend` (a schedulers.Backend); returns counts per status."""
    from pipeline import store as st
    from pipeline.manifest import load_manifest
    from pipeline.progress import make_progress
    from pipeline.worker import run_job

    stream = stream or sys.stdout
    manifest = load_manifest(manifest_path)  # ManifestError (exit 2) before anything is written
    out = Path(out)
    if _is_store(out):
        jobs = _reopen(out, manifest, st)
        print(f"resuming {out} ({len(jobs)} jobs of cohort {manifest.cohort!r})", file=stream)
    else:
        if resume:
            raise UsageError(f"--resume: {out} is not an existing results store")
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out}: exists and is not a results store; choose a new directory")
        jobs = create_cohort_store(out, manifest, stream)
    root = st.open_store(out)
    todo = st.jobs_to_run(root, jobs, retry_failed=retry_failed)
    if any(not j.image_group for j in todo):
        todo = _place_late(out, todo, stream)
    print(f"{len(todo)} of {len(jobs)} jobs to run on backend {backend.name}", file=stream)
    reporter = make_progress(progress)
    t0 = time.monotonic()
    reporter.start(len(todo))
    try:
        backend.run(todo, out, reporter, run_job)
    finally:
        reporter.close()
    counts = summarize(out, stream, elapsed=time.monotonic() - t0)
    return counts


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _reopen(out: Path, manifest, st) -> list[Job]:
    try:
        root = st.open_store(out)
        return st.match_jobs(root, manifest.jobs, out)
    except st.StoreError as err:
        raise UsageError(str(err)) from None


def create_cohort_store(out: str | Path, manifest, stream=None) -> list[Job]:
    """Probe shapes, create the store; jobs of scans that cannot be loaded are recorded failed.

    Returns the manifest's jobs placed at their rows and image groups.
    """
    from pipeline import store as st

    stream = stream or sys.stdout
    shapes, errors = _probe(manifest, stream)
    jobs = manifest.jobs
    ok = [j for j in jobs if j.scan.id in shapes]
    placed, groups = st.assign_image_groups(ok, shapes)
    by_id = {j.job_id: j for j in placed}
    jobs = [by_id.get(j.job_id, j) for j in jobs]  # unloadable scans keep image_group ''
    st.create_store(out, jobs, groups, cohort=manifest.cohort, manifest_text=manifest.text,
                    manifest_path=manifest.path, metric_names=st.metric_names_for(c.solver for c in manifest.configs))
    if errors:
        root = st.open_store(out, mode="r+")
        for job in jobs:
            if job.scan.id in errors:
                root["jobs/error"][job.index] = f"scan could not be loaded when the store was created: {errors[job.scan.id]}"
                root["jobs/status"][job.index] = STATUS_CODES["failed"]
    return jobs


def _place_late(out: Path, todo: list[Job], stream) -> list[Job]:
    """Retrying jobs whose scan could not be loaded at creation: load it now and give it image rows."""
    from pipeline import store as st
    from pipeline.scans import probe_shapes

    late = [j for j in todo if not j.image_group]
    shapes, errors = {}, {}
    for scan in {j.scan.id: j.scan for j in late}.values():
        try:
            shapes.update(probe_shapes([scan], threads=1))
        except Exception as err:  # noqa: BLE001 - still broken: stays failed, with today's error
            errors[scan.id] = f"{type(err).__name__}: {err}"
            print(f"warning: scan {scan.id}: {errors[scan.id]} (its jobs stay failed)", file=stream)
    placed = {j.job_id: j for j in st.place_late_jobs(out, [j for j in late if j.scan.id in shapes], shapes)}
    if errors:
        root = st.open_store(out, mode="r+")
        for job in late:
            if job.scan.id in errors:
                root["jobs/error"][job.index] = f"scan could not be loaded: {errors[job.scan.id]}"
    return [placed.get(j.job_id, j) for j in todo if j.image_group or j.job_id in placed]


def _probe(manifest, stream, dry: bool = False) -> tuple[dict, dict[str, str]]:
    """Image shape per loadable scan, and the load error of each scan that is not."""
    from pipeline.scans import probe_shapes

    shapes, errors = {}, {}
    try:
        shapes = probe_shapes(manifest.scans)
    except Exception:  # noqa: BLE001 - find the bad scans one by one, keep the good ones
        for scan in manifest.scans:
            try:
                shapes.update(probe_shapes([scan], threads=1))
            except Exception as err:  # noqa: BLE001
                errors[scan.id] = f"{type(err).__name__}: {err}"
    for scan_id, err in errors.items():
        print(f"warning: scan {scan_id}: {err} (its jobs {'would be' if dry else 'are'} recorded as failed)",
              file=stream)
    return shapes, errors


def summarize(out: str | Path, stream=None, elapsed: float | None = None) -> dict[str, int]:
    from pipeline.store import ledger_table

    stream = stream or sys.stdout
    table = ledger_table(out)
    counts = Counter(table["status"])
    parts = ", ".join(f"{name} {counts[name]}" for name in STATUS_CODES if counts.get(name))
    took = f" in {elapsed:.1f} s" if elapsed is not None else ""
    print(f"{out}: {len(table)} jobs — {parts}{took}", file=stream)
    if counts.get("failed"):
        print(f"see `dipcohort status {out}` for the failed jobs and their logs", file=stream)
    return dict(counts)


# ---------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------
def dry_run(manifest_path: str | Path, out: str | Path, stream=None) -> int:
    """Print what a run would do; write nothing."""
    from pipeline import store as st
    from pipeline.manifest import load_manifest

    stream = stream or sys.stdout
    manifest = load_manifest(manifest_path)
    jobs = manifest.jobs
    out = Path(out)
    seeds = sorted({len(c.seeds) for c in manifest.configs})
    print(f"cohort {manifest.cohort!r}: {len(manifest.scans)} scans × {len(manifest.configs)} solver "
          f"configurations × {'/'.join(map(str, seeds))} seed(s) = {len(jobs)} jobs", file=stream)
    if _is_store(out):
        placed = _reopen(out, manifest, st)
        todo = st.jobs_to_run(st.open_store(out), placed)
        print(f"{out} exists: {len(todo)} of {len(jobs)} jobs still to run (failed ones only with --retry-failed)",
              file=stream)
    _print_resources(manifest, stream)
    shapes, errors = _probe(manifest, stream, dry=True)
    ok = [j for j in jobs if j.scan.id in shapes]
    if ok:
        placed, groups = st.assign_image_groups(ok, shapes)
        est = st.estimate(placed, groups, len(st.metric_names_for(c.solver for c in manifest.configs)))
        print(f"image groups: {', '.join(f'{k} ({sum(j.image_group == k for j in placed)} jobs)' for k in groups)}",
              file=stream)
        print(f"storage estimate: {_bytes(est['bytes'])} uncompressed (upper bound), {est['files']} files "
              f"({est['files_per_job']} per job)", file=stream)
        print(f"work files: {st.work_dir(out)} (one log per job; checkpoints while jobs run)", file=stream)
    print("dry run: nothing written", file=stream)
    return 0


def _print_resources(manifest, stream) -> None:
    print("per-job resources (solver configuration: jobs, steps, GPUs, CPUs, memory, time limit):", file=stream)
    per: Counter = Counter(j.config for j in manifest.jobs)
    total_gpu_h = 0.0
    for cfg in manifest.configs:
        r = cfg.resources
        n = per[cfg.config]
        total_gpu_h += n * r.gpus * r.time_min / 60
        print(f"  {cfg.label} [{cfg.config}]: {n} jobs, {cfg.steps} steps, gpus {r.gpus:g}, cpus {r.cpus}, "
              f"mem {r.mem_gb:g} GB, time {r.time_min:g} min", file=stream)
    if total_gpu_h:
        print(f"  at most {total_gpu_h:.1f} GPU-hours (time limits × GPUs)", file=stream)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
