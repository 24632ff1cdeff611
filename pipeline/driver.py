"""The driver of a cohort run: check, take the lease, create or reopen the store, run, summarize.

The command line (`dipcohort run`, `dipcohort demo`), tests and benchmarks call these steps; the
backend that runs the jobs is built by the caller (pipeline never imports schedulers) and handed in,
with the job function it runs (`pipeline.worker.run_job`). Nothing is written before the manifest,
its scans and solver configurations (`pipeline.preflight`) and the backend (`backend.preflight`)
are checked; one driver at a time holds the store (`pipeline.lease`); SIGINT / SIGTERM stop the
running jobs at a step boundary and are recorded, a second signal stops at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import Interrupted, UsageError
from pipeline.jobs import STATUS_CODES, Job


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_cohort(manifest_path: str | Path, out: str | Path, backend, *, resume: bool = False,
               retry_failed: bool = False, progress: str = "auto", stream=None, allow_missing: bool = False,
               wait_lock: float | None = None, stale_after: float | None = None,
               pack: int | str | None = None) -> dict[str, int]:
    """Run a manifest into `out` with `backend` (a schedulers.Backend); returns counts per status.

    Order: validate everything (manifest, scans and solver configurations, the backend) before
    writing anything; take the store's lease (one driver at a time); create or reopen the store;
    run; summarize. Ctrl-C / SIGTERM while jobs run: they stop at a step boundary, are recorded
    'interrupted', and `pipeline.errors.Interrupted` is raised (exit code 128 + signal).
    `pack` (`--pack`: N or 'auto') overrides the manifest's resources.pack (`pipeline.packing`).
    """
    from pipeline.lease import STALE_AFTER_S, Lease
    from pipeline.manifest import load_manifest
    from pipeline.preflight import check_manifest

    stream = stream or sys.stdout
    out = Path(out)
    manifest = load_manifest(manifest_path)  # ManifestError (exit 2) before anything is written
    existing = _is_store(out)
    if not existing:
        if resume:
            raise UsageError(f"--resume: {out} is not an existing results store")
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out}: exists and is not a results store; choose a new directory")
    backend.preflight(manifest.jobs)  # cheap: before loading every scan
    check = None if existing else check_manifest(manifest, allow_missing=allow_missing)
    with Lease(out, stale_after=stale_after or STALE_AFTER_S).acquire(wait=wait_lock) as lease:
        if lease.took_over:
            print(f"took over the lease of a driver that is gone ({lease.stale_reason}"
                  f"{'; it was ' + lease.taken_over.describe() if lease.taken_over else ''})", file=stream)
        with _signals_stop(out, backend) as stopping:
            jobs = _open_or_create(out, manifest, check, stream)
            if lease.took_over:
                mark_interrupted(out, jobs, "its driver was gone (lease taken over)", stream)
            counts = _run(out, jobs, backend, retry_failed, progress, stream, stopping, pack)
    return counts


def _open_or_create(out: Path, manifest, check, stream) -> list[Job]:
    from pipeline import compaction

    if _is_store(out):
        compaction.repair(out, stream)  # a rebuild a killed driver left: finished or discarded first
        jobs = _reopen(out, manifest)
        print(f"resuming {out} ({len(jobs)} jobs of cohort {manifest.cohort!r})", file=stream)
        return jobs
    return create_cohort_store(out, manifest, stream, check=check)


def _run(out: Path, jobs: list[Job], backend, retry_failed: bool, progress: str, stream, stopping,
         pack: int | str | None = None) -> dict[str, int]:
    from pipeline import store as st
    from pipeline.lease import clear_stop
    from pipeline.progress import make_progress
    from pipeline.worker import run_job

    root = st.open_store(out)
    todo = st.jobs_to_run(root, jobs, retry_failed=retry_failed)
    if any(not j.image_group for j in todo):
        todo = _place_late(out, todo, stream)
    print(f"{len(todo)} of {len(jobs)} jobs to run on backend {backend.name}", file=stream)
    _expand(out, todo, stream)
    units = _units(jobs, todo, pack, backend.device, stream)
    clear_stop(out)  # a stop request left by a driver that was killed while stopping
    reporter = make_progress(progress)
    t0 = time.monotonic()
    reporter.start(len(todo))
    stopping.graceful = True
    watch = _StopWhenUnwritable(reporter, backend, stopping)
    try:
        backend.run(units, out, _EachJob(watch, out) if units is not todo else watch, run_job)
    except KeyboardInterrupt:  # a second signal: stopped at once
        stopping.signum = stopping.signum or signal.SIGINT
    finally:
        stopping.graceful = False
        reporter.close()
        clear_stop(out)
    if stopping.signum is not None:
        if not backend.detached:
            mark_interrupted(out, todo, f"stopped by signal {stopping.name}", stream=None)
            settle_ledger(out, stream)
        summarize(out, stream, elapsed=time.monotonic() - t0)
        print(f"stopped by {stopping.name}: interrupted jobs continue when you rerun the same command",
              file=sys.stderr)
        raise Interrupted(stopping.signum)
    if watch.unwritable:
        try:
            mark_interrupted(out, todo, "its results could not be written", stream=None)
            summarize(out, stream, elapsed=time.monotonic() - t0)
        except OSError:
            pass  # still full: the message below says what to do
        raise UsageError(f"{out}: {watch.unwritable} job(s) could not write to the store (no space left, quota "
                         f"or read-only file system: see the messages above); the run stopped there. Free "
                         f"space (or fix the file system) and rerun the same command: they continue, and "
                         f"what was done is kept")
    if not backend.detached:
        settle_ledger(out, stream)
        compact_data(out, stream)
    return summarize(out, stream, elapsed=time.monotonic() - t0)


def _expand(out: Path, todo: list[Job], stream) -> None:
    """The compacted arrays `todo` write made one chunk per job again, before any worker starts."""
    from pipeline import compaction

    try:
        expanded = compaction.expand_for(out, todo)
    except OSError as err:             # e.g. no space for the copy: every array stays whole, nothing is lost
        raise UsageError(f"{out}: could not expand the compacted arrays this run's jobs write ({err}); no job ran "
                         f"and no result was lost: free space (or fix the file system) and run the same command "
                         f"again") from None
    if expanded:
        print(f"expanded {len(expanded)} compacted array(s) to one chunk per job for this run's jobs "
              f"(compacted again when the run ends)", file=stream)


def compact_data(out: Path, stream) -> None:
    """Rebuild the per-job data arrays as shards of LEDGER_BLOCK jobs (`pipeline.compaction`):
    after `settle_ledger`, on a run's normal end (a stopped run is compacted by the next one).
    A failure (e.g. no space for the copy) leaves the arrays as they were, which stay readable."""
    from pipeline import compaction

    try:
        compaction.compact_store(out, stream)
    except OSError as err:
        try:
            compaction.repair(out, stream)
        except OSError:
            pass               # the next run repairs it
        print(f"warning: {out}: the data were not compacted ({err}); the next run does it", file=stream)


def settle_ledger(out: Path, stream) -> None:
    """Fold the jobs' ledger entries into the ledger's columns: one file per job fewer. Only
    once the backend has returned (no worker left) and under the lease; a failure leaves the
    entries, which still hold the ledger, and the next run settles them."""
    from pipeline import store as st

    try:
        st.settle(out)
    except OSError as err:
        print(f"warning: {out}: the ledger's entries were not folded into its columns ({err}); the next "
              f"run does it", file=stream)


def _units(jobs: list[Job], todo: list[Job], pack, device, stream) -> list:
    """What the backend runs: the jobs, or (packing asked for) packs and jobs alone."""
    from pipeline.packing import form_units, unit_sizes

    lines: list[str] = []
    units = form_units(jobs, todo, pack, device, lines)
    packed = not all(isinstance(u, Job) for u in units)
    if packed or lines:
        print(f"packing: {unit_sizes(units)}", file=stream)
    for line in lines:
        print(f"  {line}", file=stream)
    return units if packed else todo


class _Wrapping:
    """A progress reporter around another: what it does not define is the inner one's."""

    _OWN: tuple[str, ...] = ()

    def __getattr__(self, name: str):
        return getattr(self._reporter, name)

    def __setattr__(self, name: str, value) -> None:  # e.g. a backend's `progress.running -= 1`
        if name.startswith("_") or name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._reporter, name, value)


class _EachJob(_Wrapping):
    """The progress reporter of a packed run, told about each job of a pack: its outcome from
    the ledger (the unit's status where the ledger has none, e.g. a pack lost or stopped)."""

    def __init__(self, reporter, out: Path) -> None:
        self._reporter, self._out = reporter, out

    def job_started(self, unit) -> None:
        from pipeline.jobs import jobs_of

        for job in jobs_of(unit):
            self._reporter.job_started(job)

    def job_finished(self, unit, status: str) -> None:
        from pipeline.jobs import STATUS_NAMES, jobs_of
        from pipeline.store import snapshot

        if isinstance(unit, Job):
            self._reporter.job_finished(unit, status)
            return
        ledger = snapshot(self._out, list(jobs_of(unit)))
        for job in jobs_of(unit):
            recorded = STATUS_NAMES.get(ledger.rows.get(job.index, (0, 0))[0])
            outcome = recorded if recorded in ("done", "diverged", "failed", "interrupted") else status
            self._reporter.job_finished(job, outcome)


class _StopWhenUnwritable(_Wrapping):
    """The run's progress reporter, watching for jobs that return 'interrupted' with no stop asked:
    their store could not be written (full disk, quota, read-only): hand out no more jobs."""

    def __init__(self, reporter, backend, stopping) -> None:
        self._reporter, self._backend, self._stopping = reporter, backend, stopping
        self.unwritable = 0

    _OWN = ("unwritable",)

    def job_finished(self, job: Job, status: str) -> None:
        self._reporter.job_finished(job, status)
        if status == "interrupted" and self._stopping.signum is None:
            self.unwritable += 1
            self._backend.request_stop()


class _Stopping:
    """What the signal handler saw: the first signal stops gracefully while jobs run, else at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextmanager
def _signals_stop(out: Path, backend):
    """SIGINT / SIGTERM: ask running jobs to stop at a step boundary; a second signal stops at once."""
    from pipeline.lease import request_stop

    state = _Stopping()

    def handler(signum, frame):
        if state.signum is not None or not state.graceful:  # stop at once (unwinds like Ctrl-C)
            state.signum = state.signum or signum
            raise KeyboardInterrupt
        state.signum = signum
        print(f"\n{state.name}: stopping; running jobs stop at their next step and are recorded as interrupted "
              f"(again to stop at once)", file=sys.stderr, flush=True)
        if not backend.detached:
            request_stop(out, f"{state.name} to the driver (pid {os.getpid()})")
        backend.request_stop()

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield state
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    except KeyboardInterrupt:
        signum = state.signum or signal.SIGINT
        print(f"\nstopped by {signal.Signals(signum).name}", file=sys.stderr)
        raise Interrupted(signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def mark_interrupted(out: Path, jobs: list[Job], reason: str, stream=None) -> list[Job]:
    """Record as 'interrupted' those of `jobs` the ledger still says are running (their worker is gone)."""
    from pipeline import store as st
    from pipeline.jobs import STATUS_CODES

    codes = st.statuses(st.open_store(out))
    left = [j for j in jobs if int(codes[j.index]) == STATUS_CODES["running"]]
    for job in left:
        st.JobWriter(out, job).finish("interrupted", float("nan"), f"interrupted: {reason}")
    if left and stream is not None:
        shown = ", ".join(j.label for j in left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        print(f"{len(left)} job(s) were left running ({reason}): {shown}; recorded as interrupted, they run again",
              file=stream)
    return left


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _reopen(out: Path, manifest) -> list[Job]:
    from pipeline import store as st

    try:
        root = st.open_store(out)
        return st.match_jobs(root, manifest.jobs, out)
    except st.StoreError as err:
        raise UsageError(str(err)) from None


def create_cohort_store(out: str | Path, manifest, stream=None, check=None) -> list[Job]:
    """Create the store from the pre-flight's shapes; jobs of scans that cannot be loaded are recorded failed.

    `check` is `pipeline.preflight.check_manifest`'s result (computed here, with unloadable
    scans allowed, when not given). Returns the manifest's jobs placed at their rows and image groups.
    """
    from pipeline import store as st
    from pipeline.preflight import check_manifest

    stream = stream or sys.stdout
    check = check or check_manifest(manifest, allow_missing=True)
    shapes, errors = check.shapes, check.unloadable
    for scan_id, err in errors.items():
        print(f"warning: scan {scan_id}: {err.splitlines()[0]} (its jobs are recorded as failed)", file=stream)
    jobs = manifest.jobs
    ok = [j for j in jobs if j.scan.id in shapes]
    placed, groups = st.assign_image_groups(ok, shapes)
    by_id = {j.job_id: j for j in placed}
    jobs = [by_id.get(j.job_id, j) for j in jobs]  # unloadable scans keep image_group ''
    st.create_store(out, jobs, groups, cohort=manifest.cohort, manifest_text=manifest.text,
                    manifest_path=manifest.path, metric_names=st.metric_names_for(c.solver for c in manifest.configs))
    for job in jobs:
        if job.scan.id in errors:
            st.mark(out, [job], "failed", f"scan could not be loaded when the store was created: {errors[job.scan.id]}")
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
    for job in late:
        if job.scan.id in errors:
            st.mark(out, [job], "failed", f"scan could not be loaded: {errors[job.scan.id]}")
    return [placed.get(j.job_id, j) for j in todo if j.image_group or j.job_id in placed]


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
def dry_run(manifest_path: str | Path, out: str | Path, stream=None, pack: int | str | None = None,
            device: str | None = None) -> int:
    """Print what a run would do (`pack`, `device`: as the run would be given them); write nothing."""
    from pipeline import store as st
    from pipeline.manifest import load_manifest
    from pipeline.preflight import check_manifest

    stream = stream or sys.stdout
    manifest = load_manifest(manifest_path)
    jobs = manifest.jobs
    out = Path(out)
    seeds = sorted({len(c.seeds) for c in manifest.configs})
    print(f"cohort {manifest.cohort!r}: {len(manifest.scans)} scans × {len(manifest.configs)} solver "
          f"configurations × {'/'.join(map(str, seeds))} seed(s) = {len(jobs)} jobs", file=stream)
    todo = None
    if _is_store(out):
        placed = _reopen(out, manifest)
        todo = st.jobs_to_run(st.open_store(out), placed)
        print(f"{out} exists: {len(todo)} of {len(jobs)} jobs still to run (failed ones only with --retry-failed)",
              file=stream)
    _print_resources(manifest, stream)
    check = check_manifest(manifest, allow_missing=True)  # an invalid parameter or configuration: exit 2
    shapes = check.shapes
    for scan_id, err in check.unloadable.items():
        print(f"warning: scan {scan_id}: {err.splitlines()[0]} (a run stops here unless --allow-missing, "
              f"which records its jobs as failed)", file=stream)
    ok = [j for j in jobs if j.scan.id in shapes]
    if ok:
        placed, groups = st.assign_image_groups(ok, shapes)
        est = st.estimate(placed, groups, len(st.metric_names_for(c.solver for c in manifest.configs)))
        print(f"image groups: {', '.join(f'{k} ({sum(j.image_group == k for j in placed)} jobs)' for k in groups)}",
              file=stream)
        print(f"storage estimate: {_bytes(est['bytes'])} uncompressed (upper bound); files: "
              f"{est['files_uncompacted']} while jobs run ({est['files_per_job']} per job, and one more while it runs: "
              f"its ledger entry), {est['files']} once the run ends (entries folded into the ledger's columns, "
              f"data compacted into shards of {st.LEDGER_BLOCK} jobs)", file=stream)
        _print_work_files(out, len(jobs), est, stream)
        _print_packing(placed, placed if todo is None else todo, pack, device, stream)
    print("dry run: nothing written", file=stream)
    return 0


def _print_packing(jobs: list[Job], todo: list[Job], pack, device, stream) -> None:
    from pipeline.packing import form_units, unit_sizes

    lines: list[str] = []
    units = form_units(jobs, todo, pack, device, lines)
    print(f"packing: {unit_sizes(units)}" + ("" if lines else " (each job alone: --pack N, --pack auto or "
                                                                "resources.pack to run jobs together)"), file=stream)
    for line in lines:
        print(f"  {line}", file=stream)


def _print_work_files(out: Path, n_jobs: int, est: dict, stream) -> None:
    """Every file a run creates beside the store (in `<STORE>.work/`), and the total per job."""
    from pipeline import store as st

    work = n_jobs + 2  # a log per job, the driver's lease and stop files
    print(f"work files in {st.work_dir(out)} after a run: at most {work} — logs/<job>.log (one per job; on Slurm one "
          f"log per array task instead, in slurm/ with its sbatch file per array and 2 submitit pickles per "
          f"task while it is queued, removed after), checkpoints/<job>.pt (one per running job, removed "
          f"when it ends), driver.lease, stop", file=stream)
    total, n = est["files"] + work, max(1, n_jobs)
    print(f"files in all after a run: at most {total} ({total / n:.1f} per job): the store {est['files']} "
          f"({est['files'] / n:.2f} per job; before compaction {est['files_uncompacted']}, "
          f"{est['files_uncompacted'] / n:.2f} per job), work files {work}", file=stream)


def _print_resources(manifest, stream) -> None:
    print("per-job resources (solver configuration: jobs, steps, GPUs, CPUs, memory, time limit, pack):",
          file=stream)
    per: Counter = Counter(j.config for j in manifest.jobs)
    total_gpu_h = 0.0
    for cfg in manifest.configs:
        r = cfg.resources
        n = per[cfg.config]
        total_gpu_h += n * r.gpus * r.time_min / 60
        print(f"  {cfg.label} [{cfg.config}]: {n} jobs, {cfg.steps} steps, gpus {r.gpus:g}, cpus {r.cpus}, "
              f"mem {r.mem_gb:g} GB, time {r.time_min:g} min, pack {r.pack}", file=stream)
    if total_gpu_h:
        print(f"  at most {total_gpu_h:.1f} GPU-hours (time limits × GPUs)", file=stream)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
