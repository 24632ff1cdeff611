"""The results store (Zarr v3, plain xarray): its schema, atomic creation, the ledger, checksums.

Layout version 3 (version 2 stores open and run too: their ledger columns keep one chunk per
job). Every data group opens with `xarray.open_zarr(STORE, group=...)` and the
whole store with `xarray.open_datatree(STORE, engine="zarr")`; metadata is consolidated in the
root `zarr.json` (rewritten after every metadata change).

    STORE/                 root attrs: cohort, manifest, manifest_path (relative to STORE), packages
                           and status_codes (JSON text), git_commit, created, metric_names,
                           summary_fields, image_groups, max_steps, layout_version, work_dir
      jobs/    (job)       job: the job ids (dimension coordinate); coordinates scan_id task solver
                           config seed params(json) source steps image_group image_index, written
                           whole by the driver; the ledger columns status attempts runtime_s
                           device error log_path heartbeat threads host node ray_node_id checksum,
                           chunks of LEDGER_BLOCK jobs written only by the driver (`settle`); entry:
                           each job's live ledger entry (JSON of those fields), one chunk (file) per
                           job, the only ledger file a worker writes
      metrics/ values (job, metric, step) float32, chunk (1, M, S) (after a run: shards of
                           LEDGER_BLOCK jobs of such chunks, see below), fill NaN; coordinates job,
                           metric (names), metric_units, step and the job labels; attrs
                           metric_definitions (JSON text {task: definition of psnr, ssim, ...})
      summary/ values (job, field) float64, chunk (1, F) (after a run: sharded), fill NaN; coordinates
                           field, field_units
      images/<c{C}_{H}x{W}>/  final early_stopped ema (job, channel, y, x), reference degraded
                           (job, display_channel, y, x) float32, chunk one image (after a run:
                           sharded); job_index (job) points at the job's row of `jobs`
      .rebuild/            only while the driver compacts or expands (`pipeline.compaction`)
      aggregate/           written by pipeline.aggregate

The driver creates every group and array before a worker starts (`create_store`, which builds
the store beside its name and renames it into place when complete); a worker writes only its
own job's chunks (so no locks) and never creates anything.

The ledger has two tiers so that a job costs one ledger file while it runs and none after: a
worker (and the driver marking a job no worker runs) rewrites the job's whole entry, one file
replaced atomically; readers take an entry over the columns. When a run ends the driver, still
holding the lease and with no worker left, folds the entries into the columns and removes them
(`settle`). Readers read the entries before the columns and `settle` writes the columns before
it removes an entry, so a reader never misses a value; a driver killed mid-settle leaves the
entries, which still win. Late image groups (`place_late_jobs`)
are new groups: arrays other workers write are never resized. Paths in the store are relative to
it; logs and checkpoints live beside it in `<STORE>.work/`.

The data arrays have two tiers too (`pipeline.compaction`): while jobs run, one chunk file per
job and array (7 a job: metrics, summary, 5 images); when a run ends the driver, after `settle`,
rebuilds each as a Zarr v3 sharded array (shards of LEDGER_BLOCK jobs, inner chunks of one job:
reading one job still decodes one inner chunk), and before a run that writes rows of a compacted
array it expands that array back to one chunk per job (workers never write shards:
`JobWriter` refuses). Each rebuild is built beside the store's tree in `.rebuild/` and swapped in
by a directory exchange; a killed driver leaves every array whole, and the next one repairs.
A damaged shard is damage to each of its jobs: messages name the shard file and its rows
(`chunk_label`). Measured (100 jobs of 32 px, one image group, 10 steps): 606 files in the store
before compaction (6.1 a job), 111 after (1.1 a job, almost all of them fixed metadata).
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from pipeline.errors import UsageError
from pipeline.jobs import FINISHED, STATUS_CODES, STATUS_NAMES, Job, Pack
from pipeline.lease import pid_alive
from recon.solvers.loop import LOOP_METRICS, SUMMARY_FIELDS

LAYOUT_VERSION = 3
READABLE_LAYOUTS = (2, 3)          # 2: ledger columns of one chunk per job, no live entries until first opened
LEDGER_BLOCK = 1024                # jobs per ledger column chunk: 12 files per 1,024 jobs; a damaged chunk costs 1,024 entries
ENTRY = "entry"                    # jobs/entry: the live ledger entries
JOBS, METRICS, SUMMARY, IMAGES, AGGREGATE = "jobs", "metrics", "summary", "images", "aggregate"
VALUES = "values"                  # the data array of metrics/ and summary/
JOB = "job"                        # the dimension (and dimension coordinate: job ids) of every data group
# the metrics every run records and its summary fields (recon.solvers.loop); solvers' loss terms are appended
BASE_METRICS = LOOP_METRICS
LABELS = ("scan_id", "task", "solver", "config", "seed")      # coordinates along job in every data group
COORDS = ("scan_id", "task", "solver", "config", "params", "source", "image_group")   # text, in jobs/
INT_COORDS = ("seed", "steps", "image_index")
# heartbeat: Unix time the worker last said it is alive (a "running" job whose heartbeat is old
# belongs to a dead worker); threads: torch threads the job ran with; host: where it ran;
# node: the scheduler's name of the node (Slurm: SLURMD_NODENAME; Ray: the node's name, by default its IP;
# else the host name);
# ray_node_id: the Ray node's id (hex; "" off Ray: several Ray nodes may share one host and name);
# checksum: JSON {part: digest} of what the job wrote (see `data_digest`), written before status
LEDGER = {"status": "int8", "attempts": "int32", "runtime_s": "float64", "device": str, "error": str,
          "log_path": str, "heartbeat": "float64", "threads": "int32", "host": str, "node": str, "ray_node_id": str,
          "checksum": str}
IMAGE_ARRAYS = ("final", "early_stopped", "ema", "reference", "degraded")
DISPLAY_IMAGES = ("reference", "degraded")                    # magnitude channels; the others network format
PACKAGES = ("dipcohort", "torch", "numpy", "scipy", "scikit-image", "zarr", "xarray", "dask", "pydantic")
CREATING = ".creating-"            # STORE.creating-<host>-<pid>: a store being built beside its name
ENDED = ("done", "diverged", "failed")  # a job in one of these has recorded its outcome
DAMAGED = -1                       # status code shown for a job whose ledger chunk cannot be read
STALE_AFTER_S = 600.0              # a running job without a heartbeat for this long is shown as stale

LONG_NAMES = {
    "job": "job id (hash of scan, solver, params, seed, steps)", "scan_id": "scan id", "task": "task",
    "solver": "solver", "config": "solver configuration (hash of solver and params)", "seed": "seed",
    "params": "solver parameters (JSON)", "source": "scan source", "steps": "step budget of the job",
    "image_group": "image group of the job", "image_index": "row of the job in its image group",
    "status": "job status (see status_codes)", "attempts": "number of times the job was started",
    "runtime_s": "wall time of the whole job", "device": "device the job ran on", "error": "error message",
    "log_path": "job log, relative to the store", "heartbeat": "last heartbeat of the worker",
    "threads": "torch threads of the job", "host": "host the job ran on",
    "node": "node the job ran on (the scheduler's node name, else the host name)", "ray_node_id": "Ray node id the job ran on",
    "checksum": "digests of what the job wrote (JSON)",
    "entry": "live ledger entry of the job (JSON of the ledger fields; supersedes the columns until the driver settles it)",
    "metric": "per-step metric", "field": "summary field",
    "step": "optimiser step", "final": "reconstruction returned by the solver",
    "early_stopped": "reconstruction at the early-stopping step", "ema": "exponential moving average image",
    "reference": "ground-truth image (display channels)", "degraded": "degraded image (display channels)",
    "job_index": "row of the job in the jobs group",
}


class StoreError(UsageError):
    """A store that cannot be used as asked (the message says what to do); the CLI exits 2."""


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
        """Uncompressed bytes of one job's five images (float32)."""
        hw = self.height * self.width * 4
        return 3 * self.channels * hw + 2 * self.display_channels * hw


def units_of(name: str) -> str:
    """CF units of a metric or summary field, from its name (PSNR in dB, times in s, others 1)."""
    if "psnr" in name:
        return "dB"
    if name.endswith("per_s"):
        return "s-1"
    if name.endswith("_s"):
        return "s"
    return "1"                     # SSIM, losses, step counts, flags: dimensionless


# ---------------------------------------------------------------------------------------------
# paths of the work files beside the store; paths stored in the store are relative to it
# ---------------------------------------------------------------------------------------------
def work_dir(store_path: str | Path) -> Path:
    p = Path(store_path).resolve()
    return p.parent / f"{p.name}.work"


def log_path(store_path: str | Path, job_id: str) -> Path:
    return work_dir(store_path) / "logs" / f"{job_id}.log"


def checkpoint_path(store_path: str | Path, job_id: str) -> Path:
    return work_dir(store_path) / "checkpoints" / f"{job_id}.pt"


def relative_to_store(store_path: str | Path, path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(store_path).resolve())


def resolve_in_store(store_path: str | Path, stored: str) -> str:
    """A path as stored (relative to the store) made absolute; '' stays ''."""
    return str((Path(store_path).resolve() / stored).resolve()) if stored else ""


# ---------------------------------------------------------------------------------------------
# creation (driver)
# ---------------------------------------------------------------------------------------------
def metric_names_for(solvers: Iterable[str]) -> list[str]:
    """The loop's metrics, then the union of the solvers' loss terms in first-seen order."""
    from recon.solvers import get_solver

    names = list(BASE_METRICS)
    for solver in solvers:
        for term in get_solver(solver).terms:
            if term not in names:
                names.append(term)
    return names


def assign_image_groups(jobs: Sequence[Job], shapes: dict[str, ImageShape]) -> tuple[list[Job], dict[str, ImageShape]]:
    """Give each job its image group (by its scan's shape) and row; returns jobs and group shapes."""
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
                 manifest_text: str, manifest_path: str | Path, metric_names: Sequence[str],
                 stream=None) -> zarr.Group:
    """Create every group and array of the store (jobs must already carry image_group/index).

    The store is built as `STORE.creating-<host>-<pid>` and renamed to STORE when complete, so a
    store under its name is always whole; a half-built sibling left by a dead creator is removed
    (one line on `stream`, default stderr). A full disk or a read-only directory leaves nothing
    under the name and raises StoreError saying so.
    """
    path = Path(path)
    building = _begin_creation(path, stream or sys.stderr)
    _check_space(path, len(jobs), len(groups))
    try:
        root = zarr.open_group(str(building), mode="w-")
        root.attrs.update(_root_attrs(path, groups, cohort, manifest_text, manifest_path, metric_names,
                                      max(job.steps for job in jobs)))
        _create_jobs(root, jobs, path)
        _create_data(root, jobs, metric_names)
        images = root.create_group(IMAGES)
        for name, shape in groups.items():
            _create_image_group(images, name, shape, [j for j in jobs if j.image_group == name])
        consolidate(building)
        _publish(building, path)
    except OSError as err:
        _discard(building)
        raise StoreError(_creation_failed(path, err)) from None
    except BaseException:
        _discard(building)
        raise
    return open_store(path, mode="r+")


def _discard(building: Path) -> None:
    """Remove a half-built store once zarr's writes still in flight have ended (one failed write
    leaves its siblings running on zarr's I/O loop; they would recreate files after the removal)."""
    import asyncio

    async def settle() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)   # retrieved: no noise at exit

    try:
        from zarr.core.sync import _get_loop   # zarr's I/O event loop (private; guarded)

        asyncio.run_coroutine_threadsafe(settle(), _get_loop()).result(timeout=60)
    except Exception:  # noqa: BLE001 - without it, removing twice catches late writes
        time.sleep(1.0)
    shutil.rmtree(building, ignore_errors=True)


def _root_attrs(path: Path, groups, cohort, manifest_text, manifest_path, metric_names, steps) -> dict:
    return {
        "cohort": cohort, "manifest": manifest_text, "manifest_path": relative_to_store(path, manifest_path),
        "packages": json.dumps(package_versions(), sort_keys=True), "git_commit": git_commit() or "",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status_codes": json.dumps(STATUS_CODES), "metric_names": list(metric_names),
        "summary_fields": list(SUMMARY_FIELDS), "image_groups": sorted(groups), "max_steps": int(steps),
        "layout_version": LAYOUT_VERSION, "work_dir": relative_to_store(path, work_dir(path)),
        "Conventions": "CF-1.10",
    }


def _check_space(path: Path, n_jobs: int, n_groups: int) -> None:
    """Refuse before writing when the empty store cannot fit, with room for each job's first
    write (its ledger entry): ~100 metadata and coordinate files plus one file per job, each
    taking at least a 4 KiB block."""
    need = (n_jobs + 100 + 20 * n_groups) * 4096
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise StoreError(f"{path}: could not create the results store (no space left on the device: "
                         f"{free / 2**20:.1f} MiB free, the empty store needs about {need / 2**20:.1f} MiB); "
                         f"nothing was left under that name. Free space or choose another --out, then run again")


def _creation_failed(path: Path, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        why = "no space left on the device"
    elif err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        why = "the directory is not writable"
    else:
        why = f"{err.strerror or err}"
    return (f"{path}: could not create the results store ({why}: {err.filename or path}); nothing was left "
            f"under that name. Free space or choose another --out, then run again")


def _begin_creation(path: Path, stream) -> Path:
    """Clear dead half-built siblings of `path`; refuse when a live process is building it."""
    for sibling, host, pid in creating_siblings(path):
        if host == socket.gethostname() and not (pid > 0 and pid_alive(pid)):
            shutil.rmtree(sibling, ignore_errors=True)
            print(f"removed {sibling.name}: a half-built store left by an interrupted run (pid {pid})", file=stream)
        else:
            raise StoreError(f"{path}: another dipcohort run (pid {pid} on {host}) is creating this store "
                             f"({sibling.name}); wait for it, or stop it and remove {sibling}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f"{path.name}{CREATING}{socket.gethostname()}-{os.getpid()}"


def creating_siblings(path: str | Path) -> list[tuple[Path, str, int]]:
    """(directory, host, pid) of each `STORE.creating-<host>-<pid>` beside `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    out = []
    for sibling in path.parent.glob(f"{path.name}{CREATING}*"):
        host, _, pid = sibling.name[len(path.name) + len(CREATING):].rpartition("-")
        out.append((sibling, host, int(pid) if pid.isdigit() else -1))
    return out


def _publish(building: Path, path: Path) -> None:
    try:
        os.rename(building, path)          # replaces an empty directory; never a non-empty one
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            shutil.rmtree(building, ignore_errors=True)
            raise StoreError(f"{path}: appeared while this run was creating it (another dipcohort run?); "
                             f"use `dipcohort status {path}` to see it, or choose another --out") from None
        raise


def consolidate(path: str | Path) -> None:
    """Rewrite the root's consolidated metadata (after creating or changing any group or array)."""
    with warnings.catch_warnings():  # zarr notes that consolidated metadata is not in the v3 spec yet
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        # the staging directory of a compaction (`pipeline.compaction`), not a node: rightly skipped
        warnings.filterwarnings("ignore", message=r"Object at \.rebuild is not recognized")
        zarr.consolidate_metadata(str(path))


def new_array(group: zarr.Group, name: str, values=None, *, shape=None, chunks=None, dtype=None, dims=(JOB,),
              fill=None, coordinates: str = "", attrs: dict | None = None, shards=None) -> zarr.Array:
    """One array with its CF attributes; `values` (written whole, one chunk) or an empty shape."""
    if values is not None:
        values = np.asarray(values)
        if values.dtype.kind in ("U", "O", "T"):
            dtype, fill = str, ""
        shape, dtype = values.shape, dtype or values.dtype
        chunks = chunks or tuple(max(n, 1) for n in values.shape)
    if fill is None:
        fill = "" if dtype is str else (np.nan if np.dtype(dtype).kind == "f" else (-1 if np.dtype(dtype).kind == "i" else 0))
    a = {"long_name": LONG_NAMES.get(name, name), **(attrs or {})}
    if coordinates:
        a["coordinates"] = coordinates
    arr = group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill,
                             dimension_names=dims, attributes=a)
    if values is not None and values.size:
        arr[...] = values.astype(str) if dtype is str else values
    return arr


def _label_coords(group: zarr.Group, jobs: Sequence[Job]) -> str:
    """The job ids and labels as coordinates of `group`; returns the `coordinates` attribute text."""
    new_array(group, JOB, [j.job_id for j in jobs])
    values = {"scan_id": [j.scan.id for j in jobs], "task": [j.scan.task for j in jobs],
              "solver": [j.solver for j in jobs], "config": [j.config for j in jobs],
              "seed": np.asarray([j.seed for j in jobs], dtype=np.int64)}
    for name in LABELS:
        new_array(group, name, np.asarray(values[name]) if len(jobs) else np.asarray([], dtype=str if name != "seed" else np.int64))
    return " ".join(LABELS)


def _create_jobs(root: zarr.Group, jobs: Sequence[Job], path: Path) -> None:
    g = root.create_group(JOBS)
    labels = _label_coords(g, jobs)
    info = {"params": [json.dumps(j.params, sort_keys=True) for j in jobs], "source": [j.scan.source for j in jobs],
            "image_group": [j.image_group for j in jobs], "steps": np.asarray([j.steps for j in jobs], dtype=np.int64),
            "image_index": np.asarray([j.image_index if j.image_group else -1 for j in jobs], dtype=np.int64)}
    for name, values in info.items():
        new_array(g, name, np.asarray(values) if len(jobs) else np.asarray([], dtype=np.asarray(values).dtype))
    coordinates = " ".join([labels, *info])
    n = len(jobs)
    block = min(LEDGER_BLOCK, max(n, 1))
    for name in LEDGER:
        _new_ledger_array(g, name, n, coordinates, block)
    _new_entry_array(g, n, coordinates)
    # log paths are known up front: written here, whole, they cost no file per job
    if n:
        g["log_path"][:] = np.asarray([relative_to_store(path, log_path(path, j.job_id)) for j in jobs], dtype=str)


def _new_ledger_array(g: zarr.Group, name: str, n: int, coordinates: str, block: int) -> zarr.Array:
    """One ledger column, chunks of `block` jobs (the driver writes them; workers write entries)."""
    units = {"runtime_s": {"units": "s"}, "heartbeat": {"units": "seconds since 1970-01-01T00:00:00Z"}}
    fill = 0 if name in ("status", "attempts", "threads") else None
    return new_array(g, name, shape=(n,), chunks=(block,), dtype=LEDGER[name], fill=fill, coordinates=coordinates,
                     attrs=units.get(name) or ({"flag_values": json.dumps(STATUS_CODES)} if name == "status" else None))


def _new_entry_array(g: zarr.Group, n: int, coordinates: str) -> zarr.Array:
    """The live entries, chunk (1,): each job owns its entry file ('' = none: the columns hold the job)."""
    return new_array(g, ENTRY, shape=(n,), chunks=(1,), dtype=str, coordinates=coordinates)


def _add_missing_ledger_fields(path: Path, root: zarr.Group, mode: str) -> zarr.Group:
    """A store made before a ledger field existed (e.g. `node`, or layout 2 without `entry`)
    gets it, empty, so stores keep working across such additions; a read-only store is read
    with the field empty. New columns take the chunking of the store's others."""
    missing = [name for name in (*LEDGER, ENTRY) if name not in root[JOBS]]
    if not missing:
        return root
    try:
        g = zarr.open_group(str(path), mode="r+")[JOBS]
        coordinates = g["status"].attrs.get("coordinates", "")
        for name in missing:
            if name == ENTRY:
                _new_entry_array(g, g["status"].shape[0], coordinates)
            else:
                _new_ledger_array(g, name, g["status"].shape[0], coordinates, g["status"].chunks[0])
        consolidate(path)
    except (OSError, zarr.errors.ContainsArrayError):  # read-only, or another process added it first
        return root
    return zarr.open_group(str(path), mode=mode)


def _create_data(root: zarr.Group, jobs: Sequence[Job], metric_names: Sequence[str]) -> None:
    from recon.tasks import metric_definition

    n, steps = len(jobs), max(job.steps for job in jobs)
    m = root.create_group(METRICS)
    # what psnr / ssim (/ psnr_full, ssim_full) mean for each task of the cohort: mask, data range,
    # convention (recon.tasks.<task>.metric_definition); JSON text so to_netcdf takes it
    tasks = sorted({job.scan.task for job in jobs})
    m.attrs["metric_definitions"] = json.dumps({task: metric_definition(task) for task in tasks})
    labels = _label_coords(m, jobs)
    new_array(m, "metric", list(metric_names), dims=("metric",))
    new_array(m, "metric_units", [units_of(name) for name in metric_names], dims=("metric",))
    new_array(m, "step", np.arange(steps, dtype=np.int64), dims=("step",))
    new_array(m, VALUES, shape=(n, len(metric_names), steps), chunks=(1, len(metric_names), steps), dtype="float32",
           dims=(JOB, "metric", "step"), coordinates=f"{labels} metric_units",
           attrs={"long_name": "per-step metrics of each job (units: metric_units)", "metric_names": list(metric_names)})
    s = root.create_group(SUMMARY)
    labels = _label_coords(s, jobs)
    new_array(s, "field", list(SUMMARY_FIELDS), dims=("field",))
    new_array(s, "field_units", [units_of(name) for name in SUMMARY_FIELDS], dims=("field",))
    new_array(s, VALUES, shape=(n, len(SUMMARY_FIELDS)), chunks=(1, len(SUMMARY_FIELDS)), dtype="float64",
           dims=(JOB, "field"), coordinates=f"{labels} field_units",
           attrs={"long_name": "summary of each job's run (units: field_units)", "summary_fields": list(SUMMARY_FIELDS)})


def _create_image_group(images: zarr.Group, name: str, shape: ImageShape, jobs: Sequence[Job]) -> None:
    """The group `images/<name>` for `jobs` (their image rows in this order)."""
    g = images.create_group(name, attributes={"channels": shape.channels, "display_channels": shape.display_channels,
                                              "height": shape.height, "width": shape.width})
    labels = _label_coords(g, jobs)
    new_array(g, "job_index", np.asarray([j.index for j in jobs], dtype=np.int64), coordinates=labels)
    k = len(jobs)
    for arr in IMAGE_ARRAYS:
        c, cdim = (shape.display_channels, "display_channel") if arr in DISPLAY_IMAGES else (shape.channels, "channel")
        new_array(g, arr, shape=(k, c, shape.height, shape.width), chunks=(1, c, shape.height, shape.width),
               dtype="float32", dims=(JOB, cdim, "y", "x"), coordinates=f"{labels} job_index")


def group_shape(g: zarr.Group) -> ImageShape:
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
    """Uncompressed bytes and file count of a store for these jobs (an upper bound: zstd shrinks it).

    files: after a run, its ledger settled and its data compacted (`pipeline.compaction`: a shard
    of LEDGER_BLOCK jobs per data array); files_uncompacted: the same before compaction (and
    after a run stopped by a signal, until the next run compacts); files_per_job: the data
    chunks each job writes while it runs (metrics, summary, images), plus its ledger entry."""
    steps = max(job.steps for job in jobs)
    per_job = {name: n_metrics * steps * 4 + len(SUMMARY_FIELDS) * 8 + 64 for name in groups}
    nbytes = sum(per_job[j.image_group] + groups[j.image_group].image_bytes() for j in jobs)
    files_per_job = 2 + len(IMAGE_ARRAYS)
    labels = 1 + len(LABELS)
    blocks = lambda n: math.ceil(n / LEDGER_BLOCK)  # noqa: E731 - chunks (or shards) of LEDGER_BLOCK jobs
    fixed = (5 + len(LEDGER) + 1 + len(LEDGER) * blocks(len(jobs)) + 2 * (labels + len(COORDS) + len(INT_COORDS))
             + 2 * (labels + 4) + len(groups) * (1 + labels + 1 + len(IMAGE_ARRAYS)) * 2)
    shards = 2 * blocks(len(jobs)) + len(IMAGE_ARRAYS) * sum(
        blocks(sum(j.image_group == name for j in jobs)) for name in groups)
    return {"bytes": int(nbytes), "files": shards + fixed, "files_uncompacted": len(jobs) * files_per_job + fixed,
            "files_per_job": files_per_job}


# ---------------------------------------------------------------------------------------------
# late image groups (driver, before its workers start)
# ---------------------------------------------------------------------------------------------
def place_late_jobs(path: str | Path, jobs: Sequence[Job], shapes: dict[str, ImageShape]) -> list[Job]:
    """Give image rows to jobs that have none or whose scan's shape changed (a fixed file of
    another size); returns the jobs with their new places.

    Each call makes new groups `images/<shape>_late<k>` (never resizing arrays that running
    workers write), then rewrites the one-chunk coordinates `jobs/image_group` / `image_index`
    (each chunk file is replaced atomically) and the moved jobs' old `job_index` rows (-1).
    """
    root = _open_for_metadata(path)
    images = root[IMAGES]
    current = {name: group_shape(images[name]) for name in images.group_keys()}
    moving = [j for j in jobs if current.get(j.image_group) != shapes[j.scan.id]]
    by_shape: dict[ImageShape, list[Job]] = {}
    for job in moving:
        by_shape.setdefault(shapes[job.scan.id], []).append(job)
    placed: dict[str, Job] = {}
    for shape, members in by_shape.items():
        k = 1
        while f"{shape.group}_d{shape.display_channels}_late{k}" in current:
            k += 1
        name = f"{shape.group}_d{shape.display_channels}_late{k}"
        members = [replace(j, image_group=name, image_index=row) for row, j in enumerate(members)]
        _create_image_group(images, name, shape, members)
        current[name] = shape
        placed.update({j.job_id: j for j in members})
    if placed:
        _unlink_old_rows(root, moving)
        g = root[JOBS]
        group_col, index_col = as_text(g["image_group"][:]).astype(object), g["image_index"][:]
        for job in placed.values():
            group_col[job.index], index_col[job.index] = job.image_group, job.image_index
        g["image_index"][:] = index_col
        g["image_group"][:] = group_col.astype(str)
        root.attrs["image_groups"] = sorted(current)
        consolidate(path)
    return [placed.get(j.job_id, j) for j in jobs]


def _unlink_old_rows(root: zarr.Group, moving: Sequence[Job]) -> None:
    for name in {j.image_group for j in moving if j.image_group and j.image_group in root[IMAGES]}:
        ji = root[IMAGES][name]["job_index"]
        rows = ji[:]
        rows[[j.image_index for j in moving if j.image_group == name]] = -1
        ji[:] = rows


# ---------------------------------------------------------------------------------------------
# opening, resuming
# ---------------------------------------------------------------------------------------------
def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """The store's root group; StoreError (one line saying what to do) for anything else."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(_not_a_store(path))
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as err:  # noqa: BLE001 - garbage or truncated metadata
        raise StoreError(f"{path}/zarr.json cannot be read ({type(err).__name__}: {err}); the store's metadata is "
                         f"damaged: run the manifest again into a new --out") from None
    version = root.attrs.get("layout_version")
    if JOBS not in root or "status_codes" not in root.attrs or version is None:
        raise StoreError(f"{path}: a Zarr group but not a dipcohort results store (no 'jobs' group)")
    if version not in READABLE_LAYOUTS:
        raise StoreError(f"{path}: store layout {version} was written by another dipcohort version; this one "
                         f"reads layouts {', '.join(map(str, READABLE_LAYOUTS))} only: run the manifest again "
                         f"into a new --out")
    _refuse_a_half_swap(path, root)
    return _add_missing_ledger_fields(path, root, mode)


def _refuse_a_half_swap(path: Path, root: zarr.Group) -> None:
    from pipeline.compaction import missing_arrays

    missing = missing_arrays(path, root)
    if missing:
        raise StoreError(f"{path}: {missing[0]} is being swapped by an interrupted compaction (its new copy is "
                         f"complete in {path}/.rebuild); run `dipcohort run` on this store again, which finishes it")


def _not_a_store(path: Path) -> str:
    leftovers = creating_siblings(path)
    if leftovers:
        sibling, host, pid = leftovers[0]
        return (f"{path}: the store was never completed: {sibling.name} is a store being built (pid {pid} on "
                f"{host}) or one whose creation was interrupted; run `dipcohort run MANIFEST --out {path}` "
                f"again to create it")
    if not path.exists():
        return f"{path}: no results store there; expected the --out of `dipcohort run`"
    return f"{path}: not a dipcohort results store (no zarr.json); expected the --out of `dipcohort run`"


def _open_for_metadata(path: str | Path) -> zarr.Group:
    """The root for changing metadata: read from each zarr.json, not the consolidated copy."""
    open_store(path)
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


def root_attr(root: zarr.Group, name: str, default: Any = None) -> Any:
    """A root attribute, JSON-decoded where the store keeps it as JSON text (packages, status_codes)."""
    value = root.attrs.get(name, default)
    if name in ("packages", "status_codes") and isinstance(value, str):
        return json.loads(value)
    return value


def as_text(values: np.ndarray) -> np.ndarray:
    """Zarr's variable-length strings (numpy StringDType) as a fixed-width str array; others unchanged."""
    if values.dtype.kind not in ("T", "U", "O"):
        return values
    return np.array(values.tolist(), dtype=str) if values.size else np.array([], dtype=str)


def job_coords(root: zarr.Group) -> dict[str, np.ndarray]:
    """The driver-written arrays of `jobs` (job ids under 'job', labels, params, image places)."""
    g = root[JOBS]
    out = {}
    for name in (JOB, *COORDS, *INT_COORDS):
        out[name] = as_text(_read_whole(g[name], f"{JOBS}/{name}"))
    return out


def _read_whole(arr: zarr.Array, name: str) -> np.ndarray:
    try:
        return arr[...]
    except Exception as err:  # noqa: BLE001 - a damaged chunk: name it instead of a decoder traceback
        raise StoreError(f"array {name} cannot be read ({type(err).__name__}: {err}); the store is damaged "
                         f"beyond a job's data: run the manifest again into a new --out") from None


def stored_jobs(root: zarr.Group) -> dict[str, tuple[int, str, int]]:
    """job_id → (index, image_group, image_index) as created (or placed late)."""
    c = job_coords(root)
    return {str(j): (i, str(grp), int(r)) for i, (j, grp, r) in enumerate(zip(c[JOB], c["image_group"],
                                                                             c["image_index"]))}


def match_jobs(root: zarr.Group, jobs: Sequence[Job], store_path: str | Path) -> list[Job]:
    """The manifest's jobs placed at their rows of an existing store; error if some are missing."""
    known = stored_jobs(root)
    missing = [j for j in jobs if j.job_id not in known]
    if missing:
        examples = ", ".join(f"{j.job_id} ({j.label})" for j in missing[:3])
        raise StoreError(f"{store_path}: the manifest has {len(missing)} job(s) that this store was not created "
                         f"for (e.g. {examples}); the manifest changed since the store was made. Write the "
                         f"results to a new --out, or restore the manifest")
    return [replace(j, index=known[j.job_id][0], image_group=known[j.job_id][1], image_index=known[j.job_id][2])
            for j in jobs]


def jobs_to_run(root: zarr.Group, jobs: Sequence[Job], retry_failed: bool = False) -> list[Job]:
    """Jobs not finished: pending, running (interrupted) and damaged always, failed only when asked."""
    codes = statuses(root)
    skip = {STATUS_CODES[s] for s in FINISHED}
    if not retry_failed:
        skip.add(STATUS_CODES["failed"])
    return [j for j in jobs if int(codes[j.index]) not in skip]


def remove_store(path: str | Path) -> None:
    """Delete a store and its work files (tests and `--overwrite`-style cleanups)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(work_dir(path), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading chunks by job, naming the job and chunk of any that cannot be read
# ---------------------------------------------------------------------------------------------
def chunk_name(arr: zarr.Array, row: int) -> str:
    """The store path of the file holding `row` of an array chunked by job (whole in the other
    dimensions): its chunk, or on a compacted (sharded) array its shard."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((row // _file_rows(arr),) + (0,) * (arr.ndim - 1))}"


def _file_rows(arr: zarr.Array) -> int:
    """Rows per file: the shard's on a compacted array (`pipeline.compaction`), else the chunk's."""
    return (arr.shards or arr.chunks)[0]


def chunk_label(arr: zarr.Array, row: int) -> str:
    """The file holding `row` as messages name it: 'chunk PATH', or for a shard 'shard PATH
    (rows a-b: the jobs it holds)', since damage to it is damage to each of those jobs."""
    if arr.shards is None:
        return f"chunk {chunk_name(arr, row)}"
    a = row // arr.shards[0] * arr.shards[0]
    b = min(a + arr.shards[0], arr.shape[0]) - 1
    return f"shard {chunk_name(arr, row)} (rows {a}-{b} of {arr.path}: the {b - a + 1} jobs it holds)"


def chunk_file(root: zarr.Group, arr: zarr.Array, row: int) -> Path | None:
    """That chunk's file on a local store (None for other stores)."""
    store = root.store
    return Path(str(store.root)) / chunk_name(arr, row) if isinstance(store, zarr.storage.LocalStore) else None


def read_rows(arr: zarr.Array, a: int, b: int) -> tuple[np.ndarray, dict[int, str]]:
    """Rows [a, b) of an array chunked by job; rows whose chunk cannot be decoded are the fill
    value and listed as {row: 'chunk <path>: <error>'}. Text arrays come back as object or
    StringDType arrays (`as_text` makes either str)."""
    codecs = _job_chunk_codecs(arr)
    if codecs is not None:
        return _read_job_chunks(arr, range(a, b), *codecs)
    try:
        return arr[a:b], {}
    except Exception:  # noqa: BLE001 - find the damaged chunk(s) one by one
        pass
    text = arr.dtype.kind in ("T", "U", "O")
    out = np.full((b - a, *arr.shape[1:]), "" if text else arr.fill_value, dtype=object if text else arr.dtype)
    bad = {}
    for i in range(a, b):
        try:
            out[i - a] = arr[i]
        except Exception as err:  # noqa: BLE001
            bad[i] = f"{chunk_label(arr, i)} cannot be decoded ({type(err).__name__}: {err})"
    return out, bad


def _job_chunk_codecs(arr: zarr.Array):
    """(decoders) when `arr` is a local array of one chunk per job with the codecs the store
    writes (bytes or vlen-utf8, then zstd), else None.

    zarr spends ~0.5 ms of CPU per chunk on its async machinery (a thread hop per file, a task
    per chunk); the aggregation and `verify` read ~100,000 such chunks for 10,000 jobs, so for
    this one layout the files are read here and decoded with the same numcodecs codecs zarr
    itself calls (~0.05 ms a chunk). Any other layout goes through zarr (tested equal).
    """
    from zarr.codecs import BytesCodec, VLenUTF8Codec, ZstdCodec

    md = arr.metadata
    if (not isinstance(arr.store, zarr.storage.LocalStore) or getattr(md, "zarr_format", 3) != 3
            or arr.chunks[0] != 1 or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or len(md.codecs) != 2
            or not isinstance(md.codecs[1], ZstdCodec)):
        return None
    first = md.codecs[0]
    if isinstance(first, VLenUTF8Codec):
        return "text", None
    if isinstance(first, BytesCodec) and arr.dtype.kind in "biuf":
        order = "<" if first.endian is None or first.endian.value == "little" else ">"
        return "numbers", arr.dtype.newbyteorder(order) if arr.dtype.itemsize > 1 else arr.dtype
    return None


def _read_job_chunks(arr: zarr.Array, rows: Sequence[int], kind: str, dtype) -> tuple[np.ndarray, dict[int, str]]:
    """read_rows for the layout `_job_chunk_codecs` accepts, for any rows (out[k] is rows[k]):
    an absent chunk is the fill value (zarr does not write chunks equal to it), one that cannot
    be decoded is listed."""
    from numcodecs import VLenUTF8, Zstd

    zstd, vlen = Zstd(), VLenUTF8()
    text = kind == "text"
    out = np.full((len(rows), *arr.shape[1:]), "" if text else arr.fill_value, dtype=object if text else arr.dtype)
    folder = Path(str(arr.store.root)) / arr.path
    tail = (0,) * (arr.ndim - 1)
    bad = {}
    for k, i in enumerate(rows):
        key = arr.metadata.encode_chunk_key((i,) + tail)
        try:
            raw = (folder / key).read_bytes()
        except FileNotFoundError:
            continue
        try:
            data = zstd.decode(raw)
            out[k] = vlen.decode(data)[0] if text else np.frombuffer(data, dtype=dtype).reshape(arr.shape[1:])
        except Exception as err:  # noqa: BLE001 - garbage bytes, a truncated file
            bad[i] = f"chunk {arr.path}/{key} cannot be decoded ({type(err).__name__}: {err})"
    return out, bad


def statuses(root: zarr.Group) -> np.ndarray:
    """Status code per job row; DAMAGED (-1) where the job's status cannot be read."""
    return read_ledger(root, fields=("status",))[0]["status"]


def status_name(code: int) -> str:
    return "damaged" if code == DAMAGED else STATUS_NAMES.get(int(code), f"unknown({int(code)})")


def read_ledger(root: zarr.Group, rows: Sequence[int] | None = None, fields: Sequence[str] = tuple(LEDGER)
                ) -> tuple[dict[str, np.ndarray], dict[int, list[str]]]:
    """Ledger fields of job `rows` (default all; value k is rows[k]), text as str, status DAMAGED
    where unreadable, and per job row the chunks that could not be read. A job's live entry
    supersedes the columns; the entries are read first (see the module docstring)."""
    g = root[JOBS]
    rows = range(g["status"].shape[0]) if rows is None else rows
    entries, damage = read_entries(g, rows)
    unknown = set(damage)                    # rows whose status cannot be read: their entry, or the column
    out = {}
    for name in fields:
        values, bad = _column_rows(g, name, rows)
        for row, why in bad.items():
            if row not in entries:           # an entry holds every field: the column is not needed
                damage.setdefault(row, []).append(why)
                unknown |= {row} if name == "status" else set()
        out[name] = _with_entries(values, name, rows, entries)
    if "status" in out:
        out["status"] = out["status"].astype(np.int8)
        out["status"][[k for k, row in enumerate(rows) if row in unknown]] = DAMAGED
    return out, damage


def _column_rows(g: zarr.Group, name: str, rows: Sequence[int]) -> tuple[np.ndarray, dict[int, str]]:
    """One ledger column at `rows` (a range: chunk by chunk; others: only their chunks)."""
    n = len(rows)
    if name not in g:  # a read-only store older than this field (_add_missing_ledger_fields)
        return (np.full(n, "") if LEDGER[name] is str else np.zeros(n, dtype=LEDGER[name])), {}
    arr = g[name]
    if isinstance(rows, range) and rows.step == 1:
        return read_rows(arr, rows.start, rows.stop)
    try:
        return arr.get_coordinate_selection(np.asarray(rows, dtype=np.int64)), {}
    except Exception:  # noqa: BLE001 - a damaged chunk: one row at a time names it
        parts = [_column_rows(g, name, range(r, r + 1)) for r in rows]
        return np.concatenate([v for v, _ in parts]), {k: why for _, bad in parts for k, why in bad.items()}


def _with_entries(values: np.ndarray, name: str, rows: Sequence[int], entries: dict[int, dict]) -> np.ndarray:
    values = as_text(np.asarray(values)) if LEDGER[name] is str else np.asarray(values)
    if entries:
        values = values.astype(object) if LEDGER[name] is str else values.copy()
        for k, row in enumerate(rows):
            if row in entries:
                values[k] = entries[row][name]
        values = values.astype(str) if LEDGER[name] is str else values
    return values


def read_entries(g: zarr.Group, rows: Sequence[int]) -> tuple[dict[int, dict], dict[int, list[str]]]:
    """The live entries among `rows` ({row: every ledger field}) and those that cannot be read."""
    texts, damage = _entry_texts(g, rows)
    entries = {}
    for row, text in texts.items():
        try:
            entries[row] = _entry_fields(json.loads(text))
        except (ValueError, TypeError, KeyError) as err:
            damage[row] = [f"chunk {chunk_name(g[ENTRY], row)} cannot be decoded (not a ledger entry: {err})"]
    return entries, damage


def _entry_texts(g: zarr.Group, rows: Sequence[int]) -> tuple[dict[int, str], dict[int, list[str]]]:
    """The entries' JSON text among `rows` and the rows whose entry chunk cannot be decoded."""
    if ENTRY not in g:                       # a read-only layout-2 store: no entries yet
        return {}, {}
    arr = g[ENTRY]
    present = _entry_rows(arr, rows)
    codecs = _job_chunk_codecs(arr)
    if codecs is not None:
        texts, bad = _read_job_chunks(arr, present, *codecs)
    else:
        texts, bad = arr.get_coordinate_selection(np.asarray(present, dtype=np.int64)), {}
    found = {row: str(text) for row, text in zip(present, texts) if row not in bad and text}
    return found, {row: [why] for row, why in bad.items()}


def _entry_rows(arr: zarr.Array, rows: Sequence[int]) -> list[int]:
    """Those of `rows` that may have an entry (on a local store with many rows: whose chunk file
    exists, one directory listing instead of a failed open per row)."""
    if not isinstance(arr.store, zarr.storage.LocalStore) or len(rows) <= 64:
        return list(rows)
    folder = Path(str(arr.store.root)) / arr.path / "c"
    try:
        names = {int(name) for name in os.listdir(folder) if name.isdigit()}
    except FileNotFoundError:
        return []
    return [row for row in rows if row in names]


def _entry_fields(value: dict) -> dict:
    """An entry's fields with their column types (KeyError / TypeError when it is not an entry);
    a field added to the ledger after the entry was written takes its column's fill value."""
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, found {type(value).__name__}")
    missing = {"status": value["status"], "attempts": value["attempts"], "runtime_s": math.nan,
               "heartbeat": math.nan, "threads": 0}
    return {name: (str(value.get(name, "")) if kind is str else np.dtype(kind).type(value.get(name, missing.get(name))))
            for name, kind in LEDGER.items()}


def ledger_table(path_or_root: str | Path | zarr.Group, store_path: str | Path | None = None):
    """The ledger with its coordinates as a pandas DataFrame (one row per job, status as names,
    log_path absolute, `damaged`: the chunks of the job's ledger that could not be read)."""
    import pandas as pd

    if isinstance(path_or_root, zarr.Group):
        root, store_path = path_or_root, store_path or path_or_root.store.root
    else:
        root, store_path = open_store(path_or_root), path_or_root
    cols: dict[str, Any] = {"job_id": None}
    coords = job_coords(root)
    cols["job_id"] = coords.pop(JOB)
    cols.update(coords)
    ledger, damage = read_ledger(root)
    cols.update(ledger)
    cols["status"] = [status_name(c) for c in ledger["status"]]
    cols["log_path"] = [resolve_in_store(store_path, p) for p in ledger["log_path"]]
    cols["damaged"] = ["; ".join(damage.get(i, [])) for i in range(len(ledger["status"]))]
    return pd.DataFrame({k: (v.astype(object) if isinstance(v, np.ndarray) and v.dtype.kind == "U" else v)
                         for k, v in cols.items()})


def job_ids_with_status(path_or_root: str | Path | zarr.Group, *names: str) -> list[str]:
    root = path_or_root if isinstance(path_or_root, zarr.Group) else open_store(path_or_root)
    wanted = {STATUS_CODES[n] for n in names}
    ids = job_coords(root)[JOB]
    return [str(ids[i]) for i, c in enumerate(statuses(root)) if int(c) in wanted]


def done_job_ids(path_or_root) -> list[str]:
    return job_ids_with_status(path_or_root, "done")


def failed_job_ids(path_or_root) -> list[str]:
    return job_ids_with_status(path_or_root, "failed")


# ---------------------------------------------------------------------------------------------
# the ledger API of drivers and schedulers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """Status code and attempt count of some job rows (only their chunks are read)."""

    rows: dict[int, tuple[int, int]]  # job index -> (status code, attempts)

    def of(self, job: Job) -> tuple[str, int]:
        code, attempts = self.rows.get(job.index, (0, 0))
        return STATUS_NAMES.get(code, "pending"), attempts


def snapshot(store_path: str | Path, jobs: Sequence[Job | Pack]) -> Snapshot:
    """The ledger entries of `jobs`: their live entries and only the column chunks holding them;
    an entry that cannot be read counts as pending, never started. A pack's entry is its
    members' together (`pack_entry`), under the pack's index."""
    if not jobs:
        return Snapshot({})
    rows = sorted({m.index for job in jobs for m in (job.members if isinstance(job, Pack) else [job])})
    ledger, damage = read_ledger(open_store(store_path), rows, fields=("status", "attempts"))
    entries = {row: (0, 0) if row in damage else (int(c), int(a))
               for row, c, a in zip(rows, ledger["status"], ledger["attempts"])}
    return Snapshot({job.index: pack_entry([entries[m.index] for m in job.members]) if isinstance(job, Pack)
                     else entries[job.index] for job in jobs})


def pack_entry(entries: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """A pack's (status code, attempts) from its members' entries: attempts add up (any member
    started: the pack started), and the status is an outcome only once every member has one
    (the worst of them), so `ended_since` holds for a pack exactly when all its members ended."""
    codes = [code for code, _ in entries]
    attempts = sum(a for _, a in entries)
    ended = [STATUS_CODES[s] for s in ENDED]
    if all(code in ended for code in codes):
        worst = next(STATUS_CODES[s] for s in ("failed", "diverged", "done") if STATUS_CODES[s] in codes)
        return worst, attempts
    running = STATUS_CODES["running"]
    return (running if running in codes else next(c for c in codes if c not in ended)), attempts


def ended_since(before: Snapshot, now: Snapshot, job: Job) -> str | None:
    """The job's outcome if a new attempt recorded one after `before` was taken, else None."""
    status, attempts = now.of(job)
    return status if status in ENDED and attempts > before.of(job)[1] else None


def started_since(before: Snapshot, now: Snapshot, job: Job) -> bool:
    return now.of(job)[1] > before.of(job)[1]


def mark(store_path: str | Path, jobs: Sequence[Job | int], status: str, error: str = "") -> None:
    """Set the status (and error message) of jobs (or job rows) that no worker is running;
    attempts are kept.

    For the driver (scans that cannot be loaded: 'failed'; a lease taken over: 'interrupted')
    and `verify --repair` ('pending': run again). The checksum is cleared: it no longer vouches
    for the data.
    """
    root = open_store(store_path, mode="r+")
    for job in jobs:
        i = job if isinstance(job, (int, np.integer)) else job.index
        write_entry(root, int(i), {**current_entry(root, int(i)), "error": error, "checksum": "",
                                   "status": STATUS_CODES[status]})


def set_log_path(store_path: str | Path, job: Job | Pack, path: str | Path) -> None:
    """Point the job's ledger entry (a pack's: each member's) at the log it writes to (a file it
    shares with other jobs). Called by the process running the job, its entry's one writer."""
    root = open_store(store_path, mode="r+")
    for member in job.jobs if isinstance(job, Pack) else [job]:
        entry = current_entry(root, member.index)
        write_entry(root, member.index, {**entry, "log_path": relative_to_store(store_path, path)})


def current_entry(root: zarr.Group, row: int) -> dict:
    """Job `row`'s ledger fields as they stand (its entry, else the columns; unreadable: empty)."""
    ledger, _ = read_ledger(root, [row])
    return {name: values[0] for name, values in ledger.items()} | (
        {"status": STATUS_CODES["pending"]} if int(ledger["status"][0]) == DAMAGED else {})


def write_entry(root: zarr.Group, row: int, fields: dict) -> None:
    """Replace job `row`'s live entry with `fields` (every ledger field): one file, written
    atomically (zarr's local store writes beside it and renames)."""
    entry = {name: (str(fields[name]) if kind is str else _number(fields[name])) for name, kind in LEDGER.items()}
    root[JOBS][ENTRY][row] = json.dumps(entry, sort_keys=True)


def _number(value) -> int | float:
    value = value.item() if isinstance(value, np.generic) else value
    return value if isinstance(value, (int, float)) else float(value)


def job_log_text(store_path: str | Path, job_id: str) -> str:
    """The log the ledger names for `job_id` ('' while there is none); the caller picks the
    job's section of a shared log (pipeline.worker.log_section)."""
    root = open_store(store_path)
    ids = list(as_text(root[JOBS][JOB][:]))
    if job_id not in ids:
        raise StoreError(f"{store_path}: no job {job_id!r} (`dipcohort status {store_path}` lists the jobs)")
    stored = read_ledger(root, [ids.index(job_id)], fields=("log_path",))[0]["log_path"][0]
    path = Path(resolve_in_store(store_path, str(stored)))
    return path.read_text(errors="replace") if path.is_file() else ""


def record_lost(job: Job | Pack, store_path: str | Path, reason: str) -> None:
    """Mark a job failed in the ledger when its process died before it could record anything
    (a pack: each of its members that has no outcome yet)."""
    if isinstance(job, Pack):
        ledger = snapshot(store_path, list(job.jobs))
        for member in job.jobs:
            if ledger.of(member)[0] not in ENDED:
                record_lost(member, store_path, f"{reason} (in {job.job_id}, a pack of {len(job.jobs)} jobs)")
        return
    try:
        JobWriter(store_path, job).finish("failed", math.nan, reason)
        path = log_path(store_path, job.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(f"scheduler: {reason}\n")
    except Exception as err:  # noqa: BLE001 - the ledger stays 'running'; the next run picks the job up
        print(f"could not record the failure of job {job.job_id}: {err}")


def heartbeat_age(heartbeat: np.ndarray, now: float | None = None) -> np.ndarray:
    """Seconds since each job's last heartbeat (inf where none was ever written)."""
    now = time.time() if now is None else now
    return np.where(np.isfinite(heartbeat), now - heartbeat, np.inf)


# ---------------------------------------------------------------------------------------------
# checksums: what a finished job wrote, and the fingerprints of the ledger
# ---------------------------------------------------------------------------------------------
def data_digest(values: np.ndarray) -> str:
    """Digest of an array's bytes, dtype and shape (as written and as read back decoded)."""
    a = np.ascontiguousarray(values)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def job_parts(root: zarr.Group, index: int, image_group: str, image_index: int) -> dict[str, tuple[zarr.Array, int]]:
    """The chunks job row `index` writes: part name ('metrics', 'summary', 'images/final', ...)
    → (array, row of that array)."""
    parts = {"metrics": (root[METRICS][VALUES], index), "summary": (root[SUMMARY][VALUES], index)}
    if image_group and image_group in root[IMAGES]:
        g = root[IMAGES][image_group]
        parts.update({f"images/{name}": (g[name], image_index) for name in IMAGE_ARRAYS})
    return parts


def part_problem(root: zarr.Group, arr: zarr.Array, row: int, expected: str, values=None) -> str | None:
    """What is wrong with one chunk a finished job wrote (None: it matches its checksum).
    `values`: the row already read (the aggregation reads blocks of jobs)."""
    name = chunk_label(arr, row)
    path = chunk_file(root, arr, row)
    if path is not None and not path.is_file():
        return f"{name} is missing"
    if values is None:
        try:
            values = arr[row]
        except Exception as err:  # noqa: BLE001 - garbage bytes, truncated file
            return f"{name} cannot be decoded ({type(err).__name__}: {err})"
    if data_digest(values) != expected:
        return f"{name} does not match the job's checksum" + (" (its inner chunk of this job)" if arr.shards else "")
    return None


def parse_checksum(text: str) -> dict[str, str]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def ledger_digests(root: zarr.Group) -> list[bytes]:
    """Per job, a digest of its (status, attempts): changes whenever the job is (re)run. Read
    from the entries and the column chunks (a few files for a settled store of 10,000 jobs)."""
    ledger, _ = read_ledger(root, fields=("status", "attempts"))
    digest = lambda data: hashlib.blake2b(data, digest_size=8).digest()  # noqa: E731
    return [digest(np.int8(s).tobytes() + np.int32(a).tobytes()) for s, a in zip(ledger["status"], ledger["attempts"])]


def fingerprint(digests: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def live_fingerprint(root: zarr.Group) -> str:
    """The fingerprint of the ledger now (compare with the aggregate's `ledger_fingerprint`)."""
    return fingerprint(ledger_digests(root))


# ---------------------------------------------------------------------------------------------
# per-job writes (worker): only this job's chunks, never metadata
# ---------------------------------------------------------------------------------------------
def node_name() -> str:
    """The node this process runs on as its scheduler names it: several Slurm nodes may share a
    host (or a node's name differ from its host name), so Slurm's name when there is one."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class JobWriter:
    """Writes one job's chunks into an existing store and its ledger entry (one file, rewritten
    whole); `finish` writes the entry with the checksum of what was written and the status, after
    every data chunk."""

    def __init__(self, store_path: str | Path, job: Job):
        self.root = open_store(store_path, mode="r+")
        self.job = job
        self.i = job.index
        self.digests: dict[str, str] = {}
        self.entry: dict | None = None   # the entry as this writer last wrote it

    def _write(self, **fields) -> None:
        self.entry = {**(self.entry or current_entry(self.root, self.i)), **fields}
        write_entry(self.root, self.i, self.entry)

    def start(self, device: str, threads: int = 0, node: str = "", ray_node_id: str = "") -> int:
        """Mark running, count the attempt, record where (node: default the host); returns the attempt number.
        A damaged entry (verify found it) counts from its repair: attempt 1."""
        self.entry = current_entry(self.root, self.i)     # read once: the columns, or a previous entry
        attempts = int(self.entry["attempts"]) + 1
        self._write(attempts=attempts, device=device, threads=int(threads), host=socket.gethostname(),
                    node=node or node_name(), ray_node_id=ray_node_id, heartbeat=time.time(), checksum="",
                    status=STATUS_CODES["running"])
        return attempts

    def heartbeat(self) -> None:
        """Say the job is still alive (`status` tells running jobs from stale ones by this)."""
        self._write(heartbeat=time.time())

    def metrics(self, history: dict[str, np.ndarray]) -> None:
        arr = self.root[METRICS][VALUES]
        names = list(as_text(self.root[METRICS]["metric"][:]))
        block = np.full(arr.shape[1:], np.nan, dtype=np.float32)  # the whole chunk: no read-modify-write
        for name, values in history.items():
            if name in names:
                n = min(len(values), block.shape[1])
                block[names.index(name), :n] = np.asarray(values[:n], dtype=np.float32)
        _per_job(arr)[self.i] = block
        self.digests["metrics"] = data_digest(block)

    def summary(self, values: dict[str, float]) -> None:
        row = np.array([float(values.get(f, np.nan)) for f in SUMMARY_FIELDS], dtype=np.float64)
        _per_job(self.root[SUMMARY][VALUES])[self.i] = row
        self.digests["summary"] = data_digest(row)

    def images(self, **images: np.ndarray | None) -> None:
        """final, early_stopped, ema (C, H, W); reference, degraded (Cd, H, W); None leaves NaN."""
        g = self.root[IMAGES][self.job.image_group]
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
            _per_job(arr)[self.job.image_index] = image
            self.digests[f"images/{name}"] = data_digest(image)

    def finish(self, status: str, runtime_s: float, error: str = "", device: str | None = None) -> None:
        """LAST, after the data: 'done' (with the checksum, in the same file) means every other write is complete."""
        where = {} if device is None else {"device": device}
        self._write(runtime_s=float(runtime_s), error=error, **where, status=STATUS_CODES[status],
                    checksum=json.dumps(self.digests, sort_keys=True) if status in FINISHED else "")


def _per_job(arr: zarr.Array) -> zarr.Array:
    """`arr`, refused when compacted: a worker writing a shard rewrites its other jobs' rows,
    and two at once lose one's (the driver expands arrays before it runs their jobs)."""
    if arr.shards is not None:
        raise StoreError(f"{arr.path} is compacted (shards of {arr.shards[0]} jobs): workers write only arrays "
                         f"of one chunk per job; run the job through `dipcohort run`, which expands it first")
    return arr


# ---------------------------------------------------------------------------------------------
# settling the ledger (driver, holding the lease, once no worker can write)
# ---------------------------------------------------------------------------------------------
def settle(store_path: str | Path) -> int:
    """Fold the live entries into the ledger columns and remove them; returns how many.

    Only for the driver when its run has ended (it holds the lease; no worker is left). Entries
    of jobs still 'running' (a worker lost without trace) and of column chunks that cannot be
    read are kept: the entries still win, and `verify` names the chunk. An entry is removed only
    when its file still holds what was folded.
    """
    root = open_store(store_path, mode="r+")
    g = root[JOBS]
    if ENTRY not in g:
        return 0
    texts, _ = _entry_texts(g, range(g[ENTRY].shape[0]))
    entries, _ = read_entries(g, sorted(texts))
    rows = {row for row, e in entries.items() if int(e["status"]) != STATUS_CODES["running"]}
    folded = set()
    for a, b in _blocks(g["status"].chunks[0], g["status"].shape[0], rows):
        if _fold_block(g, a, b, {row: entries[row] for row in rows}):
            folded |= {row for row in rows if a <= row < b}
    _remove_entries(g, {row: texts[row] for row in folded})
    return len(folded)


def _blocks(size: int, n: int, rows: Iterable[int]) -> list[tuple[int, int]]:
    """The column chunks [a, b) holding `rows`."""
    starts = sorted({row // size * size for row in rows})
    return [(a, min(a + size, n)) for a in starts]


def _fold_block(g: zarr.Group, a: int, b: int, entries: dict[int, dict]) -> bool:
    """Write the column chunks [a, b) with the block's entries taken in (each chunk replaced
    whole, atomically); False, writing nothing, when one cannot be read."""
    columns = {}
    for name in LEDGER:
        values, bad = _column_rows(g, name, range(a, b))
        if bad:
            return False
        columns[name] = _with_entries(values, name, range(a, b), entries)
    for name, values in columns.items():
        g[name][a:b] = values
    return True


def _remove_entries(g: zarr.Group, folded: dict[int, str]) -> None:
    arr = g[ENTRY]
    local = isinstance(arr.store, zarr.storage.LocalStore)
    for row, text in folded.items():
        if _entry_texts(g, [row])[0].get(row) != text:
            continue                         # rewritten since it was read: it stays, and wins
        if local:                            # ~30 µs instead of zarr's ~1 ms a chunk
            (Path(str(arr.store.root)) / chunk_name(arr, row)).unlink(missing_ok=True)
        else:
            arr[row] = ""
