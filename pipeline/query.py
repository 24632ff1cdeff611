"""Open a results store as xarray: per-job results, images (lazy, Dask) and the aggregate.

    ds = open_results("results/demo.zarr")        # (job, step) metrics, per-job summaries, ledger
    agg = open_aggregate("results/demo.zarr")     # (group, step) statistics, Table-2 columns
    img = load_image("results/demo.zarr", job_id) # one reconstruction, lazy until .values

Names: the dimension `job` is indexed by job id; coordinates along it are scan_id, task,
solver, config, params (JSON), seed, step_budget (the job's step budget), image_group and
image_index. Per-step metrics (loss, psnr, ssim, movvar and the solvers' loss terms) are Dask
arrays over (job, step). Summaries are the solver's (peak_psnr, ..., steps = steps run,
runtime_s = the solver loop's time). The ledger gives status (names), status_code, attempts,
job_runtime_s (the whole job: loading, solving, writing), device, error and log_path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from pipeline.aggregate import (COMPACT, GROUP, STATS, aggregate_state, as_text, layout, live_fingerprint,
                                read_coords)
from pipeline.jobs import STATUS_NAMES
from pipeline.store import LEDGER, StoreError, open_store

RENAMED = {"steps": "step_budget"}         # job coordinate names that clash with summary fields
LEDGER_NAMES = {"runtime_s": "job_runtime_s"}
LIVE_JOB_CHUNK = 64                        # jobs per Dask chunk when reading per-job chunk files
USE_COMPACT = ("auto", "always", "never")


class StaleAggregateWarning(UserWarning):
    """The aggregate was computed before some jobs were (re)run."""


def open_results(store: str | Path, *, use_compact: str = "auto") -> xr.Dataset:
    """The store as an xarray Dataset over (job, step); metrics lazy through Dask.

    use_compact: 'auto' reads the aggregate's compact copy (chunks of 256 jobs) when its ledger
    fingerprint matches the live ledger (a hash of every job's status and attempts chunk files:
    well under a second for 10,000 jobs) and warns and reads the per-job chunks when it does
    not; 'always' reads the compact copy without checking; 'never' reads the per-job chunks.
    """
    if use_compact not in USE_COMPACT:
        raise ValueError(f"use_compact={use_compact!r}: expected one of {', '.join(USE_COMPACT)}")
    root = open_store(store)
    lay = layout(root, store)
    source = _source(root, use_compact)
    if source == "compact":
        c = root[COMPACT]
        metrics, summary, ledger = c["metrics"], c["summary"], c["ledger"]
        chunks = (metrics.chunks[0], 1, metrics.chunks[2])
    else:
        metrics, summary, ledger = root["metrics/values"], root["summary/values"], root["jobs"]
        chunks = (max(1, min(LIVE_JOB_CHUNK, lay.n_jobs)), 1, lay.n_steps)
    values = da.from_zarr(metrics, chunks=chunks)
    data: dict[str, tuple] = {name: (("job", "step"), values[:, i, :]) for i, name in enumerate(lay.metric_names)}
    table = summary[:]
    data.update({name: (("job",), table[:, k]) for k, name in enumerate(lay.summary_fields)})
    data.update(_ledger(ledger))
    ds = xr.Dataset(data, coords=_job_coords(root, lay.n_steps))
    ds.attrs.update(provenance(root, store))
    ds.attrs["read_from"] = source
    return ds


def _source(root: zarr.Group, use_compact: str) -> str:
    state = aggregate_state(root)
    if use_compact == "never" or state is None:
        return "live"
    if use_compact == "always" or state.get("ledger_fingerprint") == live_fingerprint(root):
        return "compact"
    warnings.warn("the aggregate's compact copy is older than the ledger (jobs ran since `dipcohort aggregate`); "
                  "reading the per-job chunks instead — rerun `dipcohort aggregate` to refresh it",
                  StaleAggregateWarning, stacklevel=3)
    return "live"


def _ledger(group: zarr.Group) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for name in LEDGER:
        values = as_text(group[name][:])
        if name == "status":
            out["status_code"] = (("job",), values.astype(np.int8))
            values = np.array([STATUS_NAMES.get(int(c), f"unknown({int(c)})") for c in values], dtype=str)
        out[LEDGER_NAMES.get(name, name)] = (("job",), values)
    return out


def _job_coords(root: zarr.Group, n_steps: int) -> dict[str, tuple | np.ndarray]:
    coords = read_coords(root)
    out: dict[str, tuple | np.ndarray] = {"job": coords.pop("job_id"), "step": np.arange(n_steps)}
    for name, values in coords.items():
        out[RENAMED.get(name, name)] = ("job", values)
    return out


def provenance(root: zarr.Group, store: str | Path) -> dict:
    """Root attributes worth carrying on every Dataset (manifest text, versions, commit)."""
    keep = ("cohort", "manifest", "manifest_path", "packages", "git_commit", "created", "layout_version")
    attrs = {k: root.attrs[k] for k in keep if k in root.attrs and root.attrs[k] is not None}
    attrs["store"] = str(Path(store).resolve())
    return attrs


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def image_groups(store: str | Path) -> list[str]:
    root = open_store(store)
    return sorted(root["images"].group_keys()) if "images" in root else []


def open_images(store: str | Path, group: str | None = None) -> xr.Dataset | dict[str, xr.Dataset]:
    """Images of one image group (or a dict of all groups) as lazy Dask-backed Datasets.

    Dims (job, channel, y, x) for final and early_stopped (network format: 2 channels for MRI)
    and (job, display_channel, y, x) for reference and degraded (magnitude for MRI).
    """
    root = open_store(store)
    names = sorted(root["images"].group_keys()) if "images" in root else []
    if group is None:
        return {name: _images(root, store, name) for name in names}
    if group not in names:
        raise KeyError(f"{store}: no image group {group!r}; expected one of {', '.join(names) or '(none)'}")
    return _images(root, store, group)


def _images(root: zarr.Group, store, name: str) -> xr.Dataset:
    g = root["images"][name]
    coords = read_coords(root)
    rows = g["job_index"][:] if "job_index" in g else _rows_of_group(coords, name)
    data = {}
    for arr, cdim in (("final", "channel"), ("early_stopped", "channel"), ("reference", "display_channel"),
                      ("degraded", "display_channel")):
        if arr in g:
            data[arr] = (("job", cdim, "y", "x"), da.from_zarr(g[arr], chunks=g[arr].chunks))
    job_coords = {RENAMED.get(k, k): ("job", v[rows]) for k, v in coords.items() if k != "job_id"}
    ds = xr.Dataset(data, coords={"job": coords["job_id"][rows], **job_coords})
    ds.attrs.update({**provenance(root, store), **dict(g.attrs), "image_group": name})
    return ds


def _rows_of_group(coords: dict[str, np.ndarray], name: str) -> np.ndarray:
    rows = np.flatnonzero(coords["image_group"] == name)
    return rows[np.argsort(coords["image_index"][rows])]


def load_image(store: str | Path, job_id: str, which: str = "final", display: bool = False) -> xr.DataArray:
    """One job's image as a lazy DataArray (channel, y, x); `.values` reads its one chunk.

    which: final, early_stopped, reference or degraded. display=True gives the image people
    look at: the magnitude of a 2-channel (real, imag) MRI image.
    """
    root = open_store(store)
    coords = read_coords(root)
    hits = np.flatnonzero(coords["job_id"] == job_id)
    if hits.size == 0:
        raise KeyError(f"{store}: no job with id {job_id!r}")
    i = int(hits[0])
    name = str(coords["image_group"][i])
    if not name:
        raise StoreError(f"{store}: job {job_id} has no images (its scan could not be loaded when the store was made)")
    g = root["images"][name]
    if which not in g:
        raise KeyError(f"image {which!r}: expected one of {', '.join(sorted(g.array_keys()))}")
    arr = g[which]
    image = da.from_zarr(arr, chunks=arr.chunks)[int(coords["image_index"][i])]
    cdim = "channel" if which in ("final", "early_stopped") else "display_channel"
    out = xr.DataArray(image, dims=(cdim, "y", "x"), name=which,
                       attrs={"job_id": job_id, "image_group": name,
                              **{k: _scalar(coords[k][i]) for k in ("scan_id", "task", "solver", "config", "seed")
                                 if k in coords}})
    return display_image(out) if display else out


def display_image(image: xr.DataArray) -> xr.DataArray:
    """Magnitude of a 2-channel (real, imag) image, as the loop's metrics see it; other images
    keep their values. The channel dimension becomes `display_channel` either way."""
    cdim = image.dims[-3]
    if image.sizes[cdim] != 2:
        return image.rename({cdim: "display_channel"}) if cdim != "display_channel" else image
    mag = np.sqrt((image ** 2).sum(cdim, keepdims=True))
    return mag.rename({cdim: "display_channel"}).assign_attrs(image.attrs)


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------
def open_aggregate(store: str | Path, *, check_fresh: bool = True) -> xr.Dataset:
    """The statistics `dipcohort aggregate` wrote (see pipeline.aggregate), loaded in memory.

    Dims (group, step): `group` is 'task/label' (label: the solver, plus the params that tell
    its configurations apart); coordinates task, solver, config, params, label along group.
    check_fresh warns (StaleAggregateWarning) when jobs ran after the aggregation.
    """
    root = open_store(store)
    state = aggregate_state(root)
    if state is None:
        what = "was interrupted" if GROUP in root else "does not exist yet"
        raise StoreError(f"{store}: the aggregate {what}; run `dipcohort aggregate {store}`")
    if check_fresh and state.get("ledger_fingerprint") != live_fingerprint(root):
        warnings.warn(f"{store}: jobs ran after the aggregate was computed; rerun `dipcohort aggregate {store}`",
                      StaleAggregateWarning, stacklevel=2)
    ds = xr.open_zarr(str(store), group=STATS, consolidated=False).load()
    for name in list(ds.coords):
        if ds[name].dtype.kind in ("T", "O"):
            ds[name] = ds[name].copy(data=as_text(ds[name].values))
    ds.attrs.update({k: v for k, v in provenance(root, store).items() if k not in ds.attrs})
    return ds
