"""Shared pieces of the scheduler tests: a tiny cohort, its store, a reference run, comparisons.

Every backend must give the numbers of the sequential local backend, at default settings: a
job's torch threads are its resources.cpus on every backend (set by the worker), so nothing is
pinned here. On CPU torch's results depend on the thread count (reduction order), which is why
the thread count is part of the job.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline import store as st
from pipeline.jobs import STATUS_NAMES, Job
from pipeline.progress import Progress

REPO = Path(__file__).resolve().parent.parent
# scan ids and their bundled scikit-image sources (32 px, denoising: the cheapest task)
SCANS = {"cam": "skimage:camera", "moon": "skimage:moon"}


def write_manifest(path: Path, *, steps: int = 100, seeds=(0, 1), scans: dict[str, str] | None = None,
                   checkpoint_every: int = 0, cohort: str = "sched", cpus: int = 1, task: str = "denoise",
                   task_params: str = "{sigma: 25}") -> Path:
    lines = [f"cohort: {cohort}", f"steps: {steps}", f"seeds: [{', '.join(map(str, seeds))}]", "size: 32",
             "metrics: {ssim_every: 10}", f"resources: {{gpus: 0, cpus: {cpus}, mem_gb: 1, time_min: 10}}",
             f"checkpoint_every: {checkpoint_every}", "scans:"]
    for scan_id, source in (scans or SCANS).items():
        lines.append(f'  - {{id: {scan_id}, source: "{source}", task: {task}, params: {task_params}}}')
    lines += ["solvers:", "  - {name: dip, params: {network: tiny}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_store(manifest_path: Path, out: Path) -> list[Job]:
    """Create the store as `dipcohort run` does (every array, nothing run); returns the placed jobs."""
    import io

    from pipeline.driver import create_cohort_store
    from pipeline.manifest import load_manifest

    return create_cohort_store(out, load_manifest(manifest_path), stream=io.StringIO())


_REFERENCES: dict[tuple, Path] = {}


def reference_store(manifest_path: Path, base: Path) -> Path:
    """The manifest run by the sequential local backend in this process (computed once per session)."""
    from pipeline.worker import run_job
    from schedulers.local import LocalBackend

    key = (manifest_path.read_text(),)
    if key not in _REFERENCES:
        out = base / f"reference-{len(_REFERENCES)}.zarr"
        jobs = make_store(manifest_path, out)
        LocalBackend(device="cpu").run(jobs, out, Progress(), run_job)
        assert set(statuses(out).values()) == {"done"}, statuses(out)
        _REFERENCES[key] = out
    return _REFERENCES[key]


def ledger_field(store: Path, name: str) -> dict[str, object]:
    """One ledger field per job id, as the store's readers see it (live entries over the columns:
    a backend run without the driver leaves its entries unsettled)."""
    root = st.open_store(store)
    ids = st.job_coords(root)["job"]
    return {str(j): v for j, v in zip(ids, st.read_ledger(root, fields=(name,))[0][name])}


def statuses(store: Path) -> dict[str, str]:
    return {j: STATUS_NAMES[int(s)] for j, s in ledger_field(store, "status").items()}


def threads(store: Path) -> dict[str, int]:
    """The torch threads each job ran with (the ledger's record)."""
    return {j: int(t) for j, t in ledger_field(store, "threads").items()}


def attempts(store: Path) -> dict[str, int]:
    return {j: int(a) for j, a in ledger_field(store, "attempts").items()}


def assert_same_results(store: Path, reference: Path, job_ids: list[str] | None = None) -> None:
    """Same job ids in the same rows, and identical metrics, summaries (less timings) and images."""
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    ids_a, ids_b = list(a["jobs/job"][:]), list(b["jobs/job"][:])
    assert ids_a == ids_b
    rows = [ids_a.index(j) for j in job_ids] if job_ids else list(range(len(ids_a)))
    np.testing.assert_array_equal(a["metrics/values"][rows], b["metrics/values"][rows])
    fields = list(a["summary"]["values"].attrs["summary_fields"])
    keep = [i for i, f in enumerate(fields) if f not in ("runtime_s", "steps_per_s")]
    np.testing.assert_array_equal(a["summary/values"][rows][:, keep], b["summary/values"][rows][:, keep])
    for name in a.attrs["image_groups"]:
        ga, gb = a["images"][name], b["images"][name]
        image_rows = [i for i, j in enumerate(ga["job_index"][:]) if int(j) in rows]
        for arr in ("final", "reference", "degraded"):
            np.testing.assert_array_equal(ga[arr][image_rows], gb[arr][image_rows])


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds (a hang guard)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_text(store: Path, job_id: str) -> str:
    from pipeline.store import log_path

    path = log_path(store, job_id)
    return path.read_text() if path.is_file() else ""


def start_pids(store: Path, job_id: str) -> list[int]:
    """The worker process of each attempt of the job (the pid in its log's start lines)."""
    import re

    return [int(p) for p in re.findall(r"^.*start job .* pid (\d+) ", log_text(store, job_id), re.M)]


def cli(*args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`dipcohort ARGS` in a subprocess (default settings: threads come from the jobs)."""
    out = subprocess.run([sys.executable, "-m", "dipcohort", *args], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"dipcohort {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_named(fragment: str) -> list[int]:
    """Processes whose command line contains `fragment` (read from /proc)."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and fragment in cmdline(int(e.name))]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def pool_workers(pid: int) -> list[int]:
    """The local pool's worker processes started by `pid` (multiprocessing's spawned children)."""
    return [p for p in children_of(pid) if "multiprocessing.spawn" in cmdline(p)]


def kill_a_pool_worker(expected: int = 2) -> int:
    """SIGKILL one of this process's `expected` pool worker processes (they are all busy); its pid."""
    import signal

    workers = pool_workers(os.getpid())
    assert len(workers) == expected, workers
    os.kill(workers[0], signal.SIGKILL)
    return workers[0]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def have(command: str) -> bool:
    return shutil.which(command) is not None


@contextlib.contextmanager
def running_driver(*args: str):
    """start_driver(*args) for the `with` block; still running at its end (a failed test), the
    driver is killed with its process group."""
    import signal

    driver = start_driver(*args)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def signal_driver(driver: subprocess.Popen, sig: int, group: bool = True) -> tuple[str, str]:
    """Send `sig` to the driver (to its process group, as a terminal's Ctrl-C, unless group=False)
    and wait up to 180 s for it to exit: its (stdout, stderr)."""
    (os.killpg if group else os.kill)(driver.pid, sig)
    return driver.communicate(timeout=180)


def start_driver(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m dipcohort ARGS` in its own process group (a signal to the group is a terminal's Ctrl-C)."""
    return subprocess.Popen([sys.executable, "-m", "dipcohort", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)


def ledger_if_created(store: Path) -> dict[str, str]:
    """The ledger, or {} while the driver is still creating the store."""
    try:
        return statuses(store)
    except (KeyError, FileNotFoundError, ValueError, st.StoreError):  # StoreError: no zarr.json yet
        return {}


def any_log_contains(store: Path, text: str) -> bool:
    from pipeline.store import work_dir

    logs = work_dir(store) / "logs"
    return logs.is_dir() and any(text in p.read_text() for p in logs.glob("*.log"))
