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

import json
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from pipeline import store as st
from pipeline.aggregate import COMPACT, GROUP, STATS, aggregate_state, layout
from pipeline.store import LEDGER, StoreError, as_text, live_fingerprint, open_store

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
        metrics, table = c["metrics"], c["summary"][:]
        chunks = (metrics.chunks[0], 1, metrics.chunks[2])
        ledger = {name: as_text(c[name][:]) for name in LEDGER}
    else:
        metrics, table = root[st.METRICS][st.VALUES], _summary_rows(root, store)
        chunks = (max(1, min(LIVE_JOB_CHUNK, lay.n_jobs)), 1, lay.n_steps)
        ledger = st.read_ledger(root)[0]
    values = da.from_zarr(metrics, chunks=chunks) if source == "compact" else _live_metrics(metrics, store, root, chunks, ledger)
    data: dict[str, tuple] = {name: (("job", "step"), values[:, i, :], _cf(name)) for i, name in enumerate(lay.metric_names)}
    data.update({name: (("job",), table[:, k], _cf(name)) for k, name in enumerate(lay.summary_fields)})
    data.update(_ledger(ledger, store))
    ds = xr.Dataset(data, coords=_job_coords(root, lay.n_steps))
    ds.attrs.update(provenance(root, store))
    ds.attrs["read_from"] = source
    return ds


def _cf(name: str) -> dict:
    return {"units": st.units_of(name), "long_name": name.replace("_", " ")}


def _summary_rows(root, store) -> np.ndarray:
    """The live summary table; a chunk that cannot be decoded is named (with its job)."""
    values, bad = st.read_rows(root[st.SUMMARY][st.VALUES], 0, root[st.SUMMARY][st.VALUES].shape[0])
    if bad:
        raise _damaged(store, st.job_coords(root)[st.JOB], bad)
    return values


def _damaged(store, ids: np.ndarray, bad: dict[int, str]) -> StoreError:
    row, why = next(iter(bad.items()))
    return StoreError(f"{store}: job {ids[row]}: {why} ({len(bad)} job(s) damaged); run "
                      f"`dipcohort verify {store} --repair`, then `dipcohort run` to redo them")


class _LiveRows:
    """A per-job array (metrics, images; `ids`: the job of each row) for Dask (`da.from_array`):
    a block that cannot be decoded raises StoreError naming its job and chunk (or shard) when it
    is computed, instead of the decoder's traceback from inside Dask."""

    def __init__(self, arr: zarr.Array, store, ids: np.ndarray):
        self.arr, self.store, self.ids = arr, str(store), ids
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        a, b, step = key[0].indices(self.shape[0])        # Dask asks for blocks: slices (fancy=False)
        values, bad = st.read_rows(self.arr, a, b)
        if bad:
            raise _damaged(self.store, self.ids, bad)
        return values[(slice(None, None, step), *key[1:])]


def _live_metrics(arr: zarr.Array, store, root: zarr.Group, chunks, ledger: dict) -> da.Array:
    from dask.base import tokenize

    # named by the store and its ledger: a job that reran since is another array to Dask
    name = f"live-metrics-{tokenize(str(Path(store).resolve()), ledger['status'], ledger['attempts'])}"
    return da.from_array(_LiveRows(arr, store, st.job_coords(root)[st.JOB]), chunks=chunks, name=name,
                         asarray=False, fancy=False, meta=np.empty((0, 0, 0), dtype=arr.dtype))


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


def _ledger(ledger: dict[str, np.ndarray], store) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for name in LEDGER:
        values = ledger[name]
        attrs = {"long_name": st.LONG_NAMES[name]}
        if name == "status":
            out["status_code"] = (("job",), values.astype(np.int8), {"flag_values": json.dumps(st.STATUS_CODES)})
            values = np.array([st.status_name(c) for c in values], dtype=str)
        elif name == "log_path":
            values = np.array([st.resolve_in_store(store, p) for p in values], dtype=str)
            attrs["long_name"] = "job log"
        elif name == "runtime_s":
            attrs["units"] = "s"
        out[LEDGER_NAMES.get(name, name)] = (("job",), values, attrs)
    return out


def _job_coords(root: zarr.Group, n_steps: int) -> dict[str, tuple | np.ndarray]:
    coords = st.job_coords(root)
    out: dict[str, tuple | np.ndarray] = {"job": coords.pop(st.JOB), "step": np.arange(n_steps)}
    for name, values in coords.items():
        out[RENAMED.get(name, name)] = ("job", values)
    return out


def provenance(root: zarr.Group, store: str | Path) -> dict:
    """Root attributes worth carrying on every Dataset (manifest text, versions as JSON, commit)
    and the metrics' definitions per task; strings and numbers only, so `to_netcdf` takes them."""
    keep = ("cohort", "manifest", "manifest_path", "packages", "git_commit", "created", "layout_version")
    attrs = {k: root.attrs[k] for k in keep if k in root.attrs and root.attrs[k] is not None}
    attrs["manifest_path"] = st.resolve_in_store(store, attrs.get("manifest_path", ""))
    attrs["store"] = str(Path(store).resolve())
    definitions = root[st.METRICS].attrs.get("metric_definitions") if st.METRICS in root else None
    if definitions is not None:   # what each task's psnr / ssim mean (JSON text {task: definition})
        attrs["metric_definitions"] = definitions
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
    coords = st.job_coords(root)
    rows = g["job_index"][:]
    keep = np.flatnonzero(rows >= 0)          # -1: a job placed again in a later group
    data = {}
    ids = _image_row_ids(coords[st.JOB], rows)
    for arr in st.IMAGE_ARRAYS:
        cdim = "display_channel" if arr in st.DISPLAY_IMAGES else "channel"
        data[arr] = (("job", cdim, "y", "x"), _image_rows(g[arr], store, ids)[keep],
                     {"long_name": st.LONG_NAMES[arr]})
    rows = rows[keep]
    job_coords = {RENAMED.get(k, k): ("job", v[rows]) for k, v in coords.items() if k != st.JOB}
    ds = xr.Dataset(data, coords={"job": coords[st.JOB][rows], **job_coords})
    ds.attrs.update({**provenance(root, store), **dict(g.attrs), "image_group": name})
    return ds


def load_image(store: str | Path, job_id: str, which: str = "final", display: bool = False) -> xr.DataArray:
    """One job's image as a lazy DataArray (channel, y, x); `.values` reads its one chunk.

    which: final, early_stopped, ema, reference or degraded. display=True gives the image people
    look at: the magnitude of a 2-channel (real, imag) MRI image.
    """
    root = open_store(store)
    coords = st.job_coords(root)
    hits = np.flatnonzero(coords[st.JOB] == job_id)
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
    image = _image_rows(arr, store, _image_row_ids(coords[st.JOB], g["job_index"][:]))[int(coords["image_index"][i])]
    cdim = "display_channel" if which in st.DISPLAY_IMAGES else "channel"
    out = xr.DataArray(image, dims=(cdim, "y", "x"), name=which,
                       attrs={"job_id": job_id, "image_group": name,
                              **{k: _scalar(coords[k][i]) for k in ("scan_id", "task", "solver", "config", "seed")
                                 if k in coords}})
    return display_image(out) if display else out


def _image_row_ids(ids: np.ndarray, job_index: np.ndarray) -> np.ndarray:
    """The job id of each row of an image group ('' where a row's job moved to a later group)."""
    return np.array([str(ids[r]) if r >= 0 else "" for r in job_index], dtype=object)


def _image_rows(arr: zarr.Array, store, ids: np.ndarray) -> da.Array:
    """An image array for Dask, one job per block (its chunk, or its inner chunk of a shard); a
    block that cannot be decoded raises StoreError naming its job and file (`_LiveRows`)."""
    return da.from_array(_LiveRows(arr, store, ids), chunks=arr.chunks, name=False, asarray=False, fancy=False,
                         meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


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
    ds = xr.open_zarr(str(store), group=STATS).load()
    for name in list(ds.coords):
        if ds[name].dtype.kind in ("T", "O"):
            ds[name] = ds[name].copy(data=as_text(ds[name].values))
    ds.attrs.update({k: v for k, v in provenance(root, store).items() if k not in ds.attrs})
    return ds
