"""The results store (Zarr v3): layout, creation by the driver, per-job writes, reading helpers.

Layout (shared contract; E2's aggregate/query and F's schedulers read it):

    STORE/                       root attrs: cohort, manifest, manifest_path, packages, git_commit,
                                 created, status_codes, metric_names, summary_fields, image_groups,
                                 max_steps, layout_version
      jobs/   (dim job)          job_id scan_id task solver config params(json) seed steps source
                                 image_group image_index     -- written whole by the driver
                                 status attempts runtime_s device error log_path
                                                             -- the ledger, chunk (1,), worker writes
      metrics/values (job, metric, step) float32, chunk (1, M, S), fill NaN
      summary/values (job, field) float64, chunk (1, F), fill NaN
      images/<c{C}_{H}x{W}>/final, early_stopped (image, channel, y, x) float32 chunk (1, C, H, W)
                            reference, degraded (image, display_channel, y, x) chunk (1, Cd, H, W)
                            job_index (image,) int64: the job row of each image row

The driver creates every group and array before a worker starts; a worker writes only the
chunks of its own job (so no locks) and never creates anything. Logs and checkpoints live
beside the store in `<STORE>.work/`.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from pipeline.jobs import FINISHED, STATUS_CODES, STATUS_NAMES, Job
from recon.solvers.loop import LOOP_METRICS, SUMMARY_FIELDS

LAYOUT_VERSION = 1
# the metrics every run records and its summary fields (recon.solvers.loop); solvers' loss terms are appended
BASE_METRICS = LOOP_METRICS
COORDS = ("job_id", "scan_id", "task", "solver", "config", "params", "source", "image_group")
INT_COORDS = ("seed", "steps", "image_index")
# heartbeat: Unix time the worker last said it is alive (a "running" job whose heartbeat is old
# belongs to a dead worker); threads: torch threads the job ran with; host: where it ran
LEDGER = {"status": "int8", "attempts": "int32", "runtime_s": "float64", "device": str, "error": str,
          "log_path": str, "heartbeat": "float64", "threads": "int32", "host": str}
IMAGE_ARRAYS = ("final", "early_stopped", "ema", "reference", "degraded")
PACKAGES = ("dipcohort", "torch", "numpy", "scipy", "scikit-image", "zarr", "xarray", "dask", "pydantic")


class StoreError(Exception):
    """A store that cannot be used for this run (message says what to do)."""


@dataclass(frozen=True)
class ImageShape:
    """Network-format channels C (2 for MRI), display channels Cd (magnitude: 1), height, width."""

    channels: int
    display_channels: int
    height: int
    width: int

    @property
    def group(self) -> str:
        return f"c{self.channels}_{self.height}x{self.width}"

    def image_bytes(self) -> int:
        """Uncompressed bytes of one job's four images (float32)."""
        hw = self.height * self.width * 4
        return 3 * self.channels * hw + 2 * self.display_channels * hw


# ---------------------------------------------------------------------------------------------
# paths of the work files beside the store
# ---------------------------------------------------------------------------------------------
def work_dir(store_path: str | Path) -> Path:
    p = Path(store_path).resolve()
    return p.parent / f"{p.name}.work"


def log_path(store_path: str | Path, job_id: str) -> Path:
    return work_dir(store_path) / "logs" / f"{job_id}.log"


def checkpoint_path(store_path: str | Path, job_id: str) -> Path:
    return work_dir(store_path) / "checkpoints" / f"{job_id}.pt"


# ---------------------------------------------------------------------------------------------
# creation (driver)
# ---------------------------------------------------------------------------------------------
def metric_names_for(solvers: Iterable[str]) -> list[str]:
    """loss, psnr, ssim, movvar, then the union of the solvers' loss terms in first-seen order."""
    from recon.solvers import get_solver

    names = list(BASE_METRICS)
    for solver in solvers:
        for term in get_solver(solver).terms:
            if term not in names:
                names.append(term)
    return names


def assign_image_groups(jobs: Sequence[Job], shapes: dict[str, ImageShape]) -> tuple[list[Job], dict[str, ImageShape]]:
    """Give each job its image group (by its scan's shape) and row; returns jobs and group shapes."""
    from dataclasses import replace

    groups: dict[str, ImageShape] = {}
    counts: dict[str, int] = {}
    out = []
    for job in jobs:
        shape = shapes[job.scan.id]
        name = shape.group
        if name in groups and groups[name] != shape:  # same C, H, W but other display channels
            name = f"{name}_d{shape.display_channels}"
        groups[name] = shape
        out.append(replace(job, image_group=name, image_index=counts.get(name, 0)))
        counts[name] = counts.get(name, 0) + 1
    return out, groups


def create_store(path: str | Path, jobs: Sequence[Job], groups: dict[str, ImageShape], *, cohort: str,
                 manifest_text: str, manifest_path: str | Path, metric_names: Sequence[str]) -> zarr.Group:
    """Create every group and array of the store (jobs must already carry image_group/index)."""
    path = Path(path)
    n = len(jobs)
    steps = max(job.steps for job in jobs)
    root = zarr.open_group(str(path), mode="w-")
    root.attrs.update({
        "cohort": cohort, "manifest": manifest_text, "manifest_path": str(Path(manifest_path).resolve()),
        "packages": package_versions(), "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status_codes": STATUS_CODES, "metric_names": list(metric_names), "summary_fields": list(SUMMARY_FIELDS),
        "image_groups": sorted(groups), "max_steps": steps, "layout_version": LAYOUT_VERSION,
        "work_dir": str(work_dir(path)),
    })
    _create_jobs(root, jobs, path)
    m = root.create_group("metrics")
    m.create_array("values", shape=(n, len(metric_names), steps), chunks=(1, len(metric_names), steps),
                   dtype="float32", fill_value=np.nan, dimension_names=("job", "metric", "step"),
                   attributes={"metric_names": list(metric_names)})
    s = root.create_group("summary")
    s.create_array("values", shape=(n, len(SUMMARY_FIELDS)), chunks=(1, len(SUMMARY_FIELDS)), dtype="float64",
                   fill_value=np.nan, dimension_names=("job", "field"), attributes={"summary_fields": list(SUMMARY_FIELDS)})
    _create_images(root, jobs, groups)
    return root


def _create_jobs(root: zarr.Group, jobs: Sequence[Job], path: Path) -> None:
    n = len(jobs)
    g = root.create_group("jobs")
    whole = (max(n, 1),)  # coordinates are written once by the driver: one chunk each
    values = {
        "job_id": [j.job_id for j in jobs], "scan_id": [j.scan.id for j in jobs], "task": [j.scan.task for j in jobs],
        "solver": [j.solver for j in jobs], "config": [j.config for j in jobs],
        "params": [json.dumps(j.params, sort_keys=True) for j in jobs], "source": [j.scan.source for j in jobs],
        "image_group": [j.image_group for j in jobs],
    }
    for name in COORDS:
        a = g.create_array(name, shape=(n,), chunks=whole, dtype=str, fill_value="", dimension_names=("job",))
        a[:] = np.asarray(values[name], dtype=object).astype(str)
    ints = {"seed": [j.seed for j in jobs], "steps": [j.steps for j in jobs],
            "image_index": [j.image_index if j.image_group else -1 for j in jobs]}
    for name in INT_COORDS:
        a = g.create_array(name, shape=(n,), chunks=whole, dtype="int64", fill_value=-1, dimension_names=("job",))
        a[:] = np.asarray(ints[name], dtype=np.int64)
    for name, dtype in LEDGER.items():  # chunk (1,): each job owns its ledger entries
        fill = "" if dtype is str else (np.nan if dtype == "float64" else 0)
        g.create_array(name, shape=(n,), chunks=(1,), dtype=dtype, fill_value=fill, dimension_names=("job",))
    # log paths are known up front; writing them here saves the worker a file per job
    g["log_path"][:] = np.asarray([str(log_path(path, j.job_id)) for j in jobs], dtype=object).astype(str)


def _create_images(root: zarr.Group, jobs: Sequence[Job], groups: dict[str, ImageShape]) -> None:
    images = root.create_group("images")
    for name, shape in groups.items():
        rows = [j.index for j in jobs if j.image_group == name]
        g = images.create_group(name)
        g.attrs.update({"channels": shape.channels, "display_channels": shape.display_channels,
                        "height": shape.height, "width": shape.width})
        k = len(rows)
        for arr, c, cdim in (("final", shape.channels, "channel"), ("early_stopped", shape.channels, "channel"),
                             ("ema", shape.channels, "channel"),
                             ("reference", shape.display_channels, "display_channel"),
                             ("degraded", shape.display_channels, "display_channel")):
            g.create_array(arr, shape=(k, c, shape.height, shape.width), chunks=(1, c, shape.height, shape.width),
                           dtype="float32", fill_value=np.nan, dimension_names=("image", cdim, "y", "x"))
        ji = g.create_array("job_index", shape=(k,), chunks=(max(k, 1),), dtype="int64", fill_value=-1,
                            dimension_names=("image",))
        ji[:] = np.asarray(rows, dtype=np.int64)


def place_late_jobs(path: str | Path, jobs: Sequence[Job], shapes: dict[str, ImageShape]) -> list[Job]:
    """Give image rows to jobs created without one (their scan could not be loaded then).

    Driver only, before workers start: grows (or creates) the image groups and rewrites the
    `image_group` / `image_index` coordinates. Returns the jobs with their new places.
    """
    from dataclasses import replace

    root = open_store(path, mode="r+")
    images = root["images"]
    groups_attr = list(root.attrs["image_groups"])
    coord_group, coord_index = root["jobs/image_group"][:].astype(object), root["jobs/image_index"][:]
    out = []
    for job in jobs:
        shape = shapes[job.scan.id]
        name = shape.group
        if name in images and _group_shape(images[name]) != shape:
            name = f"{name}_d{shape.display_channels}"
        if name not in images:
            _create_images(root, [replace(job, image_group=name)], {name: shape})
            row = 0
        else:
            g = images[name]
            row = g["job_index"].shape[0]
            for arr in (*IMAGE_ARRAYS, "job_index"):
                g[arr].resize((row + 1, *g[arr].shape[1:]))
            g["job_index"][row] = job.index  # job_index has one chunk: the driver rewrites it whole
        if name not in groups_attr:
            groups_attr.append(name)
        coord_group[job.index], coord_index[job.index] = name, row
        out.append(replace(job, image_group=name, image_index=row))
    root["jobs/image_group"][:] = coord_group.astype(str)
    root["jobs/image_index"][:] = coord_index
    root.attrs["image_groups"] = sorted(groups_attr)
    return out


def _group_shape(g: zarr.Group) -> ImageShape:
    a = g.attrs
    return ImageShape(int(a["channels"]), int(a["display_channels"]), int(a["height"]), int(a["width"]))


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """Commit of the code that made the results (None outside a git checkout or before a commit)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def estimate(jobs: Sequence[Job], groups: dict[str, ImageShape], n_metrics: int) -> dict[str, int]:
    """Uncompressed bytes and file count of a store for these jobs (an upper bound: zstd shrinks it)."""
    steps = max(job.steps for job in jobs)
    per_job = {name: n_metrics * steps * 4 + len(SUMMARY_FIELDS) * 8 + 64 for name in groups}
    nbytes = sum(per_job[j.image_group] + groups[j.image_group].image_bytes() for j in jobs)
    # per job: ledger entries (status, attempts, runtime, device, error) + metrics + summary + 4 images
    files_per_job = len(LEDGER) - 1 + 2 + len(IMAGE_ARRAYS)
    fixed = 1 + 4 + len(COORDS) + len(INT_COORDS) + 2 * len(LEDGER) + 4 + 6 * len(groups) + 1
    return {"bytes": int(nbytes), "files": len(jobs) * files_per_job + fixed, "files_per_job": files_per_job}


# ---------------------------------------------------------------------------------------------
# opening, resuming
# ---------------------------------------------------------------------------------------------
def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a dipcohort results store (no zarr.json); expected the --out of `dipcohort run`")
    root = zarr.open_group(str(path), mode=mode)
    if "jobs" not in root or "status_codes" not in root.attrs:
        raise StoreError(f"{path}: a Zarr group but not a dipcohort results store (no 'jobs' group)")
    return root


def stored_jobs(root: zarr.Group) -> dict[str, tuple[int, str, int]]:
    """job_id → (index, image_group, image_index) as created."""
    g = root["jobs"]
    ids, groups, rows = g["job_id"][:], g["image_group"][:], g["image_index"][:]
    return {str(j): (i, str(grp), int(r)) for i, (j, grp, r) in enumerate(zip(ids, groups, rows))}


def match_jobs(root: zarr.Group, jobs: Sequence[Job], store_path: str | Path) -> list[Job]:
    """The manifest's jobs placed at their rows of an existing store; error if some are missing."""
    from dataclasses import replace

    known = stored_jobs(root)
    missing = [j for j in jobs if j.job_id not in known]
    if missing:
        examples = ", ".join(f"{j.job_id} ({j.label})" for j in missing[:3])
        raise StoreError(f"{store_path}: the manifest has {len(missing)} job(s) that this store was not created "
                         f"for (e.g. {examples}); the manifest changed since the store was made. Write the "
                         f"results to a new --out, or restore the manifest")
    return [replace(j, index=known[j.job_id][0], image_group=known[j.job_id][1], image_index=known[j.job_id][2])
            for j in jobs]


def statuses(root: zarr.Group) -> np.ndarray:
    """Status code per job row."""
    return np.asarray(root["jobs/status"][:], dtype=np.int8)


def jobs_to_run(root: zarr.Group, jobs: Sequence[Job], retry_failed: bool = False) -> list[Job]:
    """Jobs not finished: pending and running (interrupted) always, failed only when asked."""
    codes = statuses(root)
    skip = {STATUS_CODES[s] for s in FINISHED}
    if not retry_failed:
        skip.add(STATUS_CODES["failed"])
    return [j for j in jobs if int(codes[j.index]) not in skip]


def ledger_table(path_or_root: str | Path | zarr.Group):
    """The ledger with its coordinates as a pandas DataFrame (one row per job, status as names)."""
    import pandas as pd

    root = path_or_root if isinstance(path_or_root, zarr.Group) else open_store(path_or_root)
    g = root["jobs"]
    cols: dict[str, Any] = {}
    for name in (*COORDS, *INT_COORDS, *LEDGER):
        values = g[name][:]
        cols[name] = values.astype(object) if values.dtype.kind in ("T", "U", "O") else values
    cols["status"] = [STATUS_NAMES.get(int(c), f"unknown({int(c)})") for c in cols["status"]]
    return pd.DataFrame(cols)


def job_ids_with_status(path_or_root: str | Path | zarr.Group, *names: str) -> list[str]:
    root = path_or_root if isinstance(path_or_root, zarr.Group) else open_store(path_or_root)
    wanted = {STATUS_CODES[n] for n in names}
    ids = root["jobs/job_id"][:]
    return [str(ids[i]) for i, c in enumerate(statuses(root)) if int(c) in wanted]


def done_job_ids(path_or_root) -> list[str]:
    return job_ids_with_status(path_or_root, "done")


def failed_job_ids(path_or_root) -> list[str]:
    return job_ids_with_status(path_or_root, "failed")


def remove_store(path: str | Path) -> None:
    """Delete a store and its work files (tests and `--overwrite`-style cleanups)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(work_dir(path), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# per-job writes (worker): only this job's chunks, never metadata
# ---------------------------------------------------------------------------------------------
class JobWriter:
    """Writes one job's chunks into an existing store; `finish` writes the ledger, status last."""

    def __init__(self, store_path: str | Path, job: Job):
        self.root = open_store(store_path, mode="r+")
        self.job = job
        self.i = job.index

    def start(self, device: str, threads: int = 0) -> int:
        """Mark running, count the attempt; returns the attempt number."""
        import socket
        import time

        g = self.root["jobs"]
        attempts = int(g["attempts"][self.i]) + 1
        g["attempts"][self.i] = attempts
        g["device"][self.i] = device
        g["threads"][self.i] = int(threads)
        g["host"][self.i] = socket.gethostname()
        g["heartbeat"][self.i] = time.time()
        g["status"][self.i] = STATUS_CODES["running"]
        return attempts

    def heartbeat(self) -> None:
        """Say the job is still alive (`status` tells running jobs from stale ones by this)."""
        import time

        self.root["jobs"]["heartbeat"][self.i] = time.time()

    def metrics(self, history: dict[str, np.ndarray]) -> None:
        arr = self.root["metrics/values"]
        names = list(self.root["metrics"]["values"].attrs["metric_names"])
        block = np.full(arr.shape[1:], np.nan, dtype=np.float32)  # the whole chunk: no read-modify-write
        for name, values in history.items():
            if name in names:
                n = min(len(values), block.shape[1])
                block[names.index(name), :n] = np.asarray(values[:n], dtype=np.float32)
        arr[self.i] = block

    def summary(self, values: dict[str, float]) -> None:
        row = np.array([float(values.get(f, np.nan)) for f in SUMMARY_FIELDS], dtype=np.float64)
        self.root["summary/values"][self.i] = row

    def images(self, **images: np.ndarray | None) -> None:
        """final, early_stopped (C, H, W); reference, degraded (Cd, H, W); None leaves NaN."""
        g = self.root["images"][self.job.image_group]
        for name, image in images.items():
            if name not in IMAGE_ARRAYS:
                raise KeyError(f"unknown image array {name!r}; expected one of {', '.join(IMAGE_ARRAYS)}")
            if image is None:
                continue
            arr = g[name]
            image = np.asarray(image, dtype=np.float32)
            if image.ndim == 4 and image.shape[0] == 1:  # network batch of one
                image = image[0]
            if image.shape != arr.shape[1:]:
                raise ValueError(f"image {name!r} of job {self.job.job_id} has shape {image.shape}; "
                                 f"the store's group {self.job.image_group!r} expects {arr.shape[1:]}")
            arr[self.job.image_index] = image

    def finish(self, status: str, runtime_s: float, error: str = "", device: str | None = None) -> None:
        g = self.root["jobs"]
        g["runtime_s"][self.i] = float(runtime_s)
        g["error"][self.i] = error
        if device is not None:
            g["device"][self.i] = device
        g["status"][self.i] = STATUS_CODES[status]  # LAST: 'done' means every other write is complete
