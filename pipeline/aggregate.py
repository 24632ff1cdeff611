"""Cohort aggregation (Dask): statistics per task × solver configuration, and a compact copy.

`aggregate(STORE)` writes the store's own group `aggregate`, replaced on every run:

    aggregate/                  attrs: complete, created, ledger_fingerprint, n_jobs, step_block, ...
      compact/metrics           (job, metric, step) float32, chunks (256 jobs, M, B steps)
      compact/summary           (job, field) float64, chunks (256, F)
      compact/ledger/<name>     status attempts runtime_s device error log_path, chunks (256,)
      stats/                    an xarray Dataset over (group, step): see `build_stats`

Compaction: workers write one chunk file per job and array (no locks, DESIGN.md), which makes a
10,000-job store hold ~100,000 small files; reading them back costs ~0.5 ms each in zarr. The
compact copy holds the same values in chunks of 256 jobs, so `pipeline.query.open_results`
reads it instead whenever it is up to date: `ledger_fingerprint` is a hash of every job's
(status, attempts), which changes whenever a job is (re)run.

Which jobs count: status done and diverged. A diverged job's metrics are NaN after the step
whose loss was not finite, so it counts up to there; its final PSNR/SSIM are NaN and drop out
of the final columns (its peak still counts). Failed, pending and running jobs never count
(their data are absent or incomplete); they appear only in the n_* counts. Statistics skip
NaN and ±inf values; std is numpy's default population std (ddof=0); quantiles use numpy's
default linear interpolation. Early-stopped runs (ES-DIP) are NaN after their stopping step,
so the per-step `*_count` variables show how many jobs each step's statistics are over.

Memory bound: a compaction task holds one block of 256 jobs × M × S float32 (25 MB for M=6,
S=4000) plus zarr's buffers; a statistics task holds all N jobs × 2 metrics × B steps float32
(N × B × 8 bytes) plus float64 per-group copies for mean / std / quantiles, about 5 × N × B × 8
bytes in all, with B chosen so that N × B × 4 ≤ 32 MiB (B = 512 for N = 10,000: ~200 MiB per
task), times `workers`. Nothing holds N × S values at once; the stats written are groups × S.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import dask
import numpy as np
import zarr

from pipeline.jobs import STATUS_CODES
from pipeline.store import LEDGER, StoreError, open_store

GROUP = "aggregate"
COMPACT = "aggregate/compact"
STATS = "aggregate/stats"
JOB_CHUNK = 256                    # jobs per compact chunk: ~40 files instead of 10,000 per array
BLOCK_BYTES = 32 * 2 ** 20         # float32 bytes of one statistics block (all jobs × B steps)
PROCESS_THRESHOLD = 2000           # jobs from which processes beat threads (zarr's per-file cost holds the GIL)
COUNTED = ("done", "diverged")
STAT_METRICS = ("psnr", "ssim")
STAT_NAMES = ("mean", "std", "median", "q10", "q90", "count")
QUANTILES = (0.5, 0.1, 0.9)        # median, q10, q90 in STAT_NAMES order
ONSET_DROP_DB = 1.0                # overfitting onset: mean PSNR this far below its peak (issue 3)
# summary fields reported as mean ± std per group (Table 2 of the DIP-for-CT chapter: peak, ES,
# final; of the aSeqDIP paper: PSNR, SSIM, run-time); peak_ssim and job_runtime_s are added here
TABLE_FIELDS = ("peak_psnr", "peak_step", "peak_ssim", "es_psnr", "es_ssim", "es_step", "final_psnr",
                "final_ssim", "runtime_s", "steps_per_s", "job_runtime_s")


@dataclass(frozen=True)
class Layout:
    path: str
    n_jobs: int
    n_steps: int
    metric_names: tuple[str, ...]
    summary_fields: tuple[str, ...]


def layout(root: zarr.Group, path: str | Path) -> Layout:
    """Shapes and names of a store, validated against each other."""
    values = root["metrics/values"]
    names = values.attrs.get("metric_names") or root.attrs.get("metric_names")
    fields = root["summary/values"].attrs.get("summary_fields") or root.attrs.get("summary_fields")
    if not names or len(names) != values.shape[1]:
        raise StoreError(f"{path}: metrics/values has {values.shape[1]} metrics but attribute metric_names "
                         f"lists {names!r}; expected one name per metric")
    if not fields or len(fields) != root["summary/values"].shape[1]:
        raise StoreError(f"{path}: summary/values does not match its attribute summary_fields {fields!r}")
    for metric in STAT_METRICS:
        if metric not in names:
            raise StoreError(f"{path}: metric {metric!r} missing from metric_names {names!r}")
    return Layout(str(path), int(values.shape[0]), int(values.shape[2]), tuple(names), tuple(fields))


def read_coords(root: zarr.Group) -> dict[str, np.ndarray]:
    """Every array of `jobs` that is not ledger (written whole by the driver), strings as str."""
    g = root["jobs"]
    out = {}
    for name in sorted(g.array_keys()):
        if name in LEDGER:
            continue
        out[name] = as_text(g[name][:])
    return out


def as_text(values: np.ndarray) -> np.ndarray:
    """Zarr's variable-length strings (numpy StringDType) as a fixed-width str array; others unchanged."""
    if values.dtype.kind not in ("T", "U", "O"):
        return values
    return np.array(values.tolist(), dtype=str) if values.size else np.array([], dtype=str)


def ledger_fingerprint(status: np.ndarray, attempts: np.ndarray) -> str:
    """Hash of every job's (status, attempts): changes whenever any job is (re)run."""
    h = hashlib.sha256(np.ascontiguousarray(status, dtype=np.int8).tobytes())
    h.update(np.ascontiguousarray(attempts, dtype=np.int32).tobytes())
    return h.hexdigest()


def live_fingerprint(root: zarr.Group) -> str:
    return ledger_fingerprint(root["jobs/status"][:], root["jobs/attempts"][:])


def aggregate_state(root: zarr.Group) -> dict | None:
    """Attributes of a complete aggregate group, or None when there is none (or it was interrupted)."""
    if GROUP not in root:
        return None
    attrs = dict(root[GROUP].attrs)
    return attrs if attrs.get("complete") else None


# ---------------------------------------------------------------------------------------------
# the aggregation
# ---------------------------------------------------------------------------------------------
def aggregate(store_path: str | Path, *, workers: int | None = None, scheduler: str | None = None,
              onset_drop_db: float = ONSET_DROP_DB):
    """Compact the store and compute the cohort statistics; returns the stats xarray Dataset.

    scheduler: 'threads', 'processes' or 'synchronous' (default: processes from
    PROCESS_THRESHOLD jobs on when workers > 1, else threads); workers: default all CPUs.
    """
    path = str(Path(store_path))
    root = open_store(path, mode="r+")
    lay = layout(root, path)
    if lay.n_jobs == 0:
        raise StoreError(f"{path}: the store has no jobs to aggregate")
    coords = read_coords(root)
    block = step_block(lay.n_jobs, lay.n_steps)
    _reset(root, lay, block)
    with dask_options(scheduler, workers, lay.n_jobs) as opts:
        parts = dask.compute(*[dask.delayed(compact_jobs)(path, a, min(a + JOB_CHUNK, lay.n_jobs))
                               for a in range(0, lay.n_jobs, JOB_CHUNK)], **opts)
        status = np.concatenate([p[0] for p in parts])
        attempts = np.concatenate([p[1] for p in parts])
        groups = job_groups(coords, status)
        idx = [lay.metric_names.index(m) for m in STAT_METRICS]
        blocks = dask.compute(*[dask.delayed(step_stats)(path, idx, s, min(s + block, lay.n_steps), groups.members)
                                for s in range(0, lay.n_steps, block)], **opts)
    per_step = np.concatenate([b[0] for b in blocks], axis=-1)           # (metric, group, stat, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                # all-NaN rows: jobs with no SSIM
        peak_ssim = np.nanmax(np.stack([b[1] for b in blocks], axis=1), axis=1)
    compact = root[COMPACT]
    per_job = dict(zip(lay.summary_fields, compact["summary"][:].T))
    per_job["peak_ssim"] = peak_ssim
    per_job["job_runtime_s"] = compact["ledger/runtime_s"][:]
    fingerprint = ledger_fingerprint(status, attempts)
    ds = build_stats(groups, status, per_step, per_job, root.attrs, onset_drop_db, fingerprint)
    ds.to_zarr(path, group=STATS, mode="w", consolidated=False)
    root[GROUP].attrs.update({"complete": True, "ledger_fingerprint": fingerprint,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return ds


def step_block(n_jobs: int, n_steps: int) -> int:
    """Steps per statistics block: the largest power of two with n_jobs × B × 4 bytes ≤ BLOCK_BYTES."""
    b = 16
    while b < 1024 and n_jobs * (2 * b) * 4 <= BLOCK_BYTES:
        b *= 2
    return max(1, min(b, n_steps))


def _reset(root: zarr.Group, lay: Layout, block: int) -> None:
    """Replace any previous aggregate with empty compact arrays (complete=False until the end)."""
    if GROUP in root:
        del root[GROUP]
    g = root.create_group(GROUP, attributes={"complete": False, "n_jobs": lay.n_jobs, "step_block": block,
                                             "job_chunk": JOB_CHUNK, "counted_statuses": list(COUNTED)})
    c = g.create_group("compact")
    jc = min(JOB_CHUNK, lay.n_jobs)
    c.create_array("metrics", shape=(lay.n_jobs, len(lay.metric_names), lay.n_steps),
                   chunks=(jc, len(lay.metric_names), block), dtype="float32", fill_value=np.nan,
                   dimension_names=("job", "metric", "step"), attributes={"metric_names": list(lay.metric_names)})
    c.create_array("summary", shape=(lay.n_jobs, len(lay.summary_fields)), chunks=(jc, len(lay.summary_fields)),
                   dtype="float64", fill_value=np.nan, dimension_names=("job", "field"),
                   attributes={"summary_fields": list(lay.summary_fields)})
    led = c.create_group("ledger")
    for name, dtype in LEDGER.items():
        fill = "" if dtype is str else (np.nan if dtype == "float64" else 0)
        led.create_array(name, shape=(lay.n_jobs,), chunks=(jc,), dtype=dtype, fill_value=fill,
                         dimension_names=("job",))


@contextmanager
def dask_options(scheduler: str | None, workers: int | None, n_jobs: int) -> Iterator[dict]:
    """Keyword arguments for dask.compute; one process pool shared by both passes."""
    workers = max(1, int(workers or os.cpu_count() or 1))
    if scheduler is None:
        scheduler = "processes" if workers > 1 and n_jobs >= PROCESS_THRESHOLD else "threads"
    if scheduler not in ("threads", "processes", "synchronous"):
        raise ValueError(f"scheduler {scheduler!r}: expected threads, processes or synchronous")
    if scheduler != "processes":
        yield {"scheduler": scheduler, "num_workers": workers}
        return
    # spawn: forking a process whose zarr event-loop thread is running is unsafe
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield {"scheduler": "processes", "pool": pool}


def compact_jobs(path: str, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy jobs [a, b) into the compact arrays; returns their (status, attempts).

    The ledger is read first: a worker writes status last, so 'done' read here means the data
    read after it are complete.
    """
    root = zarr.open_group(path, mode="r+")
    src, dst = root["jobs"], root[COMPACT]
    status, attempts = src["status"][a:b], src["attempts"][a:b]
    dst["metrics"][a:b] = root["metrics/values"][a:b]
    dst["summary"][a:b] = root["summary/values"][a:b]
    for name in LEDGER:
        if name not in ("status", "attempts"):
            dst["ledger"][name][a:b] = src[name][a:b]
    dst["ledger/status"][a:b] = status
    dst["ledger/attempts"][a:b] = attempts
    return np.asarray(status, dtype=np.int8), np.asarray(attempts, dtype=np.int32)


@dataclass(frozen=True)
class Groups:
    """Jobs grouped by (task, config) in order of first appearance."""

    task: list[str]
    config: list[str]
    solver: list[str]
    params: list[str]
    label: list[str]
    of_job: np.ndarray                  # group index of every job
    members: list[np.ndarray]           # rows of counted jobs (done, diverged) per group


def job_groups(coords: dict[str, np.ndarray], status: np.ndarray) -> Groups:
    keys: dict[tuple[str, str], int] = {}
    of_job = np.empty(len(status), dtype=np.int64)
    first: list[int] = []
    for i, key in enumerate(zip(coords["task"], coords["config"])):
        if key not in keys:
            keys[key] = len(keys)
            first.append(i)
        of_job[i] = keys[key]
    counted = np.isin(status, [STATUS_CODES[s] for s in COUNTED])
    members = [np.flatnonzero((of_job == g) & counted) for g in range(len(keys))]
    solver = [str(coords["solver"][i]) for i in first]
    params = [str(coords["params"][i]) if "params" in coords else "{}" for i in first]
    config = [str(coords["config"][i]) for i in first]
    labels = config_labels(solver, params, config)
    return Groups([str(coords["task"][i]) for i in first], config, solver, params, labels, of_job, members)


def config_labels(solvers: Sequence[str], params: Sequence[str], configs: Sequence[str]) -> list[str]:
    """'dip' when a solver has one configuration, else 'aseqdip lambda=0.5' (the params that differ)."""
    by_solver: dict[str, dict[str, dict]] = {}
    for s, p, c in zip(solvers, params, configs):
        by_solver.setdefault(s, {})[c] = json.loads(p) if p else {}
    out = []
    for s, c in zip(solvers, configs):
        variants = by_solver[s]
        if len(variants) == 1:
            out.append(s)
            continue
        keys = sorted({k for v in variants.values() for k in v})
        differ = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in variants.values()}) > 1]
        mine = variants[c]
        text = " ".join(f"{k}={json.dumps(mine.get(k))}" for k in differ)
        out.append(f"{s} {text}" if text else f"{s} [{c[:8]}]")
    return out


def step_stats(path: str, metric_index: Sequence[int], s0: int, s1: int,
               members: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of steps [s0, s1) for every group; plus each job's largest SSIM in the block.

    Returns (metric, group, stat, step) float64 and (job,) float64.
    """
    arr = zarr.open_group(path, mode="r")[COMPACT]["metrics"]
    x = arr.get_orthogonal_selection((slice(None), list(metric_index), slice(s0, s1)))  # (job, 2, B) float32
    out = np.stack([group_stats(x[:, k, :], members) for k in range(len(metric_index))])
    ssim = x[:, STAT_METRICS.index("ssim"), :].astype(np.float64)
    ssim[~np.isfinite(ssim)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                # all-NaN: steps without SSIM
        job_max = np.nanmax(ssim, axis=1)
    return out, job_max


def group_stats(block: np.ndarray, members: Sequence[np.ndarray]) -> np.ndarray:
    """(group, stat, step): mean, std, median, q10, q90 and count of finite values over jobs."""
    out = np.full((len(members), len(STAT_NAMES), block.shape[1]), np.nan)
    for g, rows in enumerate(members):
        v = block[rows].astype(np.float64)
        v[~np.isfinite(v)] = np.nan
        out[g, 5] = np.sum(~np.isnan(v), axis=0)
        if v.shape[0] == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)            # all-NaN steps give NaN, as wanted
            out[g, 0] = np.nanmean(v, axis=0)
            out[g, 1] = np.nanstd(v, axis=0)
            out[g, 2:5] = np.nanquantile(v, QUANTILES, axis=0)
    return out


def overfitting_onset(curve: np.ndarray, drop_db: float = ONSET_DROP_DB) -> tuple[float, float, float]:
    """(peak step, peak value, onset step) of a mean PSNR curve; onset = first step after the
    peak where the curve is at least `drop_db` below the peak, NaN if it never is."""
    if not np.any(np.isfinite(curve)):
        return np.nan, np.nan, np.nan
    c = np.where(np.isfinite(curve), curve, -np.inf)
    p = int(np.argmax(c))
    below = np.flatnonzero(c[p + 1:] <= c[p] - drop_db)
    below = below[np.isfinite(c[p + 1:][below])]                      # a missing step is not a fall
    return float(p), float(c[p]), float(p + 1 + below[0]) if below.size else np.nan


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    return (float(np.mean(v)), float(np.std(v))) if v.size else (np.nan, np.nan)


def build_stats(groups: Groups, status: np.ndarray, per_step: np.ndarray, per_job: dict[str, np.ndarray],
                root_attrs, drop_db: float, fingerprint: str):
    """The stats Dataset: per-step statistics over (group, step) and the per-group table."""
    import xarray as xr

    n_groups, n_steps = len(groups.task), per_step.shape[-1]
    data: dict[str, tuple] = {}
    for m, metric in enumerate(STAT_METRICS):
        for s, stat in enumerate(STAT_NAMES):
            values = per_step[m, :, s, :]
            data[f"{metric}_{stat}"] = (("group", "step"), values.astype(np.int64) if stat == "count" else values)
    for name, code in (("done", "done"), ("diverged", "diverged"), ("failed", "failed")):
        data[f"n_{name}"] = (("group",), np.array([np.sum((groups.of_job == g) & (status == STATUS_CODES[code]))
                                                  for g in range(n_groups)]))
    data["n_jobs"] = (("group",), np.bincount(groups.of_job, minlength=n_groups))
    data["n_unfinished"] = (("group",), data["n_jobs"][1] - data["n_done"][1] - data["n_diverged"][1]
                            - data["n_failed"][1])
    for name in TABLE_FIELDS:
        if name not in per_job:
            continue
        ms = np.array([_mean_std(per_job[name][rows]) for rows in groups.members]).reshape(n_groups, 2)
        data[f"{name}_mean"], data[f"{name}_std"] = (("group",), ms[:, 0]), (("group",), ms[:, 1])
    onset = np.array([overfitting_onset(data["psnr_mean"][1][g], drop_db) for g in range(n_groups)])
    onset = onset.reshape(n_groups, 3)
    data["curve_peak_step"], data["curve_peak_psnr"], data["onset_step"] = ((("group",), onset[:, k]) for k in range(3))
    text = lambda values: np.array(values, dtype=object)  # noqa: E731 - variable-length UTF-8 in zarr v3
    coords = {"group": text([f"{t}/{lab}" for t, lab in zip(groups.task, groups.label)]),
              "step": np.arange(n_steps), "task": ("group", text(groups.task)),
              "solver": ("group", text(groups.solver)), "config": ("group", text(groups.config)),
              "params": ("group", text(groups.params)), "label": ("group", text(groups.label))}
    attrs = {"cohort": root_attrs.get("cohort", ""), "manifest_path": root_attrs.get("manifest_path", ""),
             "git_commit": root_attrs.get("git_commit") or "", "store_created": root_attrs.get("created", ""),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "ledger_fingerprint": fingerprint, "counted_statuses": list(COUNTED), "std_ddof": 0,
             "quantile_method": "linear (numpy default)", "onset_drop_db": float(drop_db),
             "description": "per-step statistics over the done and diverged jobs of each task × solver config"}
    return xr.Dataset(data, coords=coords, attrs=attrs)
