"""Cohort aggregation (Dask): statistics per task × solver configuration, and a compact copy.

`aggregate(STORE)` writes the store's own group `aggregate`, replaced on every run:

    aggregate/                  attrs: complete, created, ledger_fingerprint, n_jobs, step_block, ...
      compact/                  an xarray Dataset over (job, metric, step), coordinates as in metrics/:
        metrics                 (job, metric, step) float32, chunks (256 jobs, 1 metric, B steps)
                                inside one shard (file) per 256 jobs
        summary                 (job, field) float64, one chunk
        status attempts ...     the ledger (every pipeline.store.LEDGER array), one chunk each
      stats/                    an xarray Dataset over (group, step): see `build_stats`; with the
                                seed and scan spreads of pipeline.compare (<field>_seed_std, ...)
      paired/                   paired comparisons of solver configs over (pair, metric): pipeline.compare

Every finished job copied is checked against the checksum it recorded (metrics and summary): a
missing, undecodable or changed chunk stops the aggregation with an error naming the job and
chunk (`dipcohort verify --repair` and a run redo them). A 10,000-job copy is ~40 metrics shards
plus ~100 small files, where the per-job store holds ~150,000.

Compaction: workers write one chunk file per job and array (no locks, DESIGN.md), which makes a
10,000-job store hold ~100,000 small files; reading them back costs ~0.5 ms each in zarr. The
compact copy holds the same values in chunks of 256 jobs, so `pipeline.query.open_results`
reads it instead whenever it is up to date: `ledger_fingerprint` is a hash of every job's
(status, attempts) taken before the copy (`ledger_digests`), which changes whenever a job is
(re)run. A job's data change only when it runs, and every run increments its attempts, so
aggregating again copies only the blocks of 256 jobs whose digests changed since the last copy
(`block_fingerprints`; `full=True` / `dipcohort aggregate --full` rebuilds everything); the
stats group is always recomputed.

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
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import dask
import numpy as np
import zarr

from pipeline import store as st
from pipeline.jobs import STATUS_CODES
from pipeline.store import (AGGREGATE, LEDGER, StoreError, as_text, fingerprint, ledger_digests,  # noqa: F401
                            live_fingerprint, open_store)

GROUP = AGGREGATE
COMPACT = f"{AGGREGATE}/compact"
STATS = f"{AGGREGATE}/stats"
JOB_CHUNK = 256                    # jobs per compact shard (one file): ~40 files instead of 10,000 per array
BLOCK_BYTES = 32 * 2 ** 20         # float32 bytes of one statistics block (all jobs × B steps)
# jobs from which processes beat threads: zarr handles every chunk file in Python on one event-loop
# thread per process, so only processes spread that per-file work over the CPUs
PROCESS_THRESHOLD = 2000
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
    values = root[st.METRICS][st.VALUES]
    names = tuple(as_text(root[st.METRICS]["metric"][:]))
    fields = tuple(as_text(root[st.SUMMARY]["field"][:]))
    if len(names) != values.shape[1]:
        raise StoreError(f"{path}: metrics/values has {values.shape[1]} metrics but its coordinate `metric` "
                         f"lists {names!r}; expected one name per metric")
    if len(fields) != root[st.SUMMARY][st.VALUES].shape[1]:
        raise StoreError(f"{path}: summary/values does not match its coordinate `field` {fields!r}")
    for metric in STAT_METRICS:
        if metric not in names:
            raise StoreError(f"{path}: metric {metric!r} missing from the metric names {names!r}")
    return Layout(str(path), int(values.shape[0]), int(values.shape[2]), names, fields)


def aggregate_state(root: zarr.Group) -> dict | None:
    """Attributes of a complete aggregate group, or None when there is none (or it was interrupted)."""
    if GROUP not in root:
        return None
    # from the group's own zarr.json: the consolidated copy may predate an interrupted aggregation
    attrs = dict(zarr.open_group(root.store, path=GROUP, mode="r", use_consolidated=False).attrs)
    return attrs if attrs.get("complete") else None


# ---------------------------------------------------------------------------------------------
# the aggregation
# ---------------------------------------------------------------------------------------------
def aggregate(store_path: str | Path, *, workers: int | None = None, scheduler: str | None = None,
              onset_drop_db: float = ONSET_DROP_DB, full: bool = False, client=None):
    """Compact the store and compute the cohort statistics; returns the stats xarray Dataset.

    The stats are always recomputed; the compact copy is brought up to date incrementally (only
    blocks of 256 jobs holding a job whose status or attempts changed are copied again) unless
    `full` or the previous aggregate is missing or was interrupted. Every finished job copied is
    checked against its checksum: a missing or damaged chunk raises StoreError naming the job.
    scheduler: 'threads', 'processes' or 'synchronous' (default: processes from
    PROCESS_THRESHOLD jobs on when workers > 1, else threads); workers: default all CPUs.
    client: a dask.distributed Client whose cluster runs the tasks (pipeline.dask_cluster);
    without one and without `scheduler`, an active client (`Client(...)` made current) is used.
    The workers open the store by its path: they must see this file system.
    """
    path = str(Path(store_path))
    open_store(path)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)   # the aggregate changes metadata
    lay = layout(root, path)
    if lay.n_jobs == 0:
        raise StoreError(f"{path}: the store has no jobs to aggregate")
    coords = st.job_coords(root)
    digests = ledger_digests(root)       # before reading any job: a job that runs meanwhile makes it stale
    reuse, job_chunk, block, before = _prepare(root, lay, coords, full)
    spans = [(a, min(a + job_chunk, lay.n_jobs)) for a in range(0, lay.n_jobs, job_chunk)]
    blocks_now = [fingerprint(digests[a:b]) for a, b in spans]
    # incremental: copy again only the blocks of jobs whose ledger changed since the last copy
    todo = [span for k, span in enumerate(spans) if not reuse or k >= len(before) or before[k] != blocks_now[k]]
    times = {"start": time.perf_counter()}
    with dask_options(scheduler, workers, lay.n_jobs, client) as opts:
        copied = dask.compute(*[dask.delayed(compact_jobs)(path, a, b) for a, b in todo], **opts)
        _raise_damage(path, coords, [c["problems"] for c in copied])
        status, per_job = _write_small_arrays(root, lay, todo, copied, reuse)
        times["compact"] = time.perf_counter()
        groups = job_groups(coords, status)
        idx = [lay.metric_names.index(m) for m in STAT_METRICS]
        blocks = dask.compute(*[dask.delayed(step_stats)(path, idx, s, min(s + block, lay.n_steps), groups.members)
                                for s in range(0, lay.n_steps, block)], **opts)
        times["stats"] = time.perf_counter()
    per_step = np.concatenate([b[0] for b in blocks], axis=-1)           # (metric, group, stat, step)
    per_job["peak_ssim"] = np.fmax.reduce(np.stack([b[1] for b in blocks], axis=1), axis=1)  # NaN: no SSIM
    ds = build_stats(groups, status, per_step, per_job, root.attrs, onset_drop_db, fingerprint(digests))
    compaction = {"mode": "incremental" if reuse else "full", "job_blocks": len(spans), "job_blocks_copied": len(todo)}
    ds.attrs["compaction"] = json.dumps(compaction)
    ds = write_comparisons(path, ds, coords, status, per_job)
    ds.to_zarr(path, group=STATS, mode="w", consolidated=False)
    end = time.perf_counter()
    seconds = {"compact": times["compact"] - times["start"], "stats": times["stats"] - times["compact"],
               "table_and_write": end - times["stats"]}
    ds.attrs["seconds"] = json.dumps(seconds)
    root[GROUP].attrs.update({"complete": True, "ledger_fingerprint": fingerprint(digests),
                              "seconds": json.dumps(seconds), "compaction": json.dumps(compaction),
                              "block_fingerprints": blocks_now,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    st.consolidate(path)
    return ds


def write_comparisons(path: str, ds, coords: dict[str, np.ndarray], status: np.ndarray, per_job: dict):
    """Seed and scan spreads into the stats; the paired comparison of solver configs into its own
    group, aggregate/paired (see pipeline.compare). Returns the stats with the spreads."""
    from pipeline import compare          # here: compare imports this module's labels

    jobs = compare.summary_dataset(coords, status, per_job)
    compare.paired_comparison(jobs).to_zarr(path, group=compare.PAIRED, mode="w", consolidated=False)
    return ds.assign(compare.spread_variables(jobs, ds.task.values, ds.config.values))


def _raise_damage(path: str, coords: dict[str, np.ndarray], problems: Sequence[dict[int, list[str]]]) -> None:
    """StoreError naming each job whose data (or ledger entry) the compaction found damaged."""
    rows = sorted({row for p in problems for row in p})
    if not rows:
        return
    why = {row: "; ".join(msg for p in problems for msg in p.get(row, [])) for row in rows}
    lines = [f"job {coords['job'][r]} ({coords['scan_id'][r]}/{coords['solver'][r]}/seed{coords['seed'][r]}): {why[r]}"
             for r in rows[:10]]
    more = f"; ... {len(rows) - 10} more" if len(rows) > 10 else ""
    raise StoreError(f"{path}: {len(rows)} job(s) have missing or damaged data: {'; '.join(lines)}{more}. "
                     f"Run `dipcohort verify {path} --repair`, then `dipcohort run` to redo them")


def _write_small_arrays(root: zarr.Group, lay: Layout, todo, copied, reuse: bool):
    """The compact ledger and summary (one chunk each), patched with the blocks copied now.
    Returns the status codes and the per-job table columns."""
    c = root[COMPACT]
    names = (*LEDGER, "summary")
    whole = {name: (as_text(c[name][:]) if reuse else _empty(c[name])) for name in names}
    for (a, b), part in zip(todo, copied):
        for name in names:
            whole[name][a:b] = part[name]
    for name in names:
        c[name][...] = whole[name].astype(str) if whole[name].dtype.kind in "UO" else whole[name]
    per_job = dict(zip(lay.summary_fields, whole["summary"].T))
    per_job["job_runtime_s"] = whole["runtime_s"]
    return whole["status"].astype(np.int8), per_job


def _empty(arr: zarr.Array) -> np.ndarray:
    if arr.dtype.kind in ("T", "U", "O"):
        return np.full(arr.shape, "", dtype=object)
    return np.full(arr.shape, arr.fill_value, dtype=arr.dtype)


def _prepare(root: zarr.Group, lay: Layout, coords, full: bool) -> tuple[bool, int, int, list[str]]:
    """Keep a matching compact copy (incremental) or start afresh; the aggregate is marked
    incomplete until the end, so an interrupted run is rebuilt in full next time.
    Returns (reuse, jobs per block, steps per block, the copy's block fingerprints)."""
    if full or not compact_matches(root, lay):
        job_chunk, block = min(JOB_CHUNK, lay.n_jobs), step_block(lay.n_jobs, lay.n_steps)
        _reset(root, lay, coords, job_chunk, block)
        return False, job_chunk, block, []
    g = root[GROUP]
    g.attrs["complete"] = False
    if "stats" in g:
        del g["stats"]
    st.consolidate(root.store.root)
    return True, int(g.attrs["job_chunk"]), int(g.attrs["step_block"]), list(g.attrs.get("block_fingerprints", []))


def compact_matches(root: zarr.Group, lay: Layout) -> bool:
    """Whether a complete previous compact copy has this store's shapes, names and chunking."""
    state = aggregate_state(root)
    if state is None or "compact" not in root[GROUP]:
        return False
    c = root[COMPACT]
    try:
        metrics, summary = c["metrics"], c["summary"]
        shapes_ok = (metrics.shape == (lay.n_jobs, len(lay.metric_names), lay.n_steps)
                     and summary.shape == (lay.n_jobs, len(lay.summary_fields))
                     and all(c[name].shape == (lay.n_jobs,) for name in LEDGER))
        names_ok = (tuple(as_text(c["metric"][:])) == lay.metric_names
                    and tuple(as_text(c["field"][:])) == lay.summary_fields)
    except KeyError:
        return False
    return (shapes_ok and names_ok and metrics.chunks[0] == state.get("job_chunk")
            and metrics.chunks[2] == state.get("step_block"))


def step_block(n_jobs: int, n_steps: int) -> int:
    """Steps per statistics block: the largest power of two with n_jobs × B × 4 bytes ≤ BLOCK_BYTES."""
    b = 16
    while b < 1024 and n_jobs * (2 * b) * 4 <= BLOCK_BYTES:
        b *= 2
    return max(1, min(b, n_steps))


def _reset(root: zarr.Group, lay: Layout, coords: dict[str, np.ndarray], job_chunk: int, block: int) -> None:
    """Replace any previous aggregate with empty compact arrays (complete=False until the end).

    metrics: chunks of (jobs, 1 metric, B steps), so the statistics read PSNR and SSIM without
    decoding the other metrics, inside one shard (file) per block of jobs: a compaction task
    writes whole shards, and 10,000 jobs are ~40 files. Ledger and summary: one chunk each.
    """
    if GROUP in root:
        del root[GROUP]
    g = root.create_group(GROUP, attributes={"complete": False, "n_jobs": lay.n_jobs, "step_block": block,
                                             "job_chunk": job_chunk, "counted_statuses": list(COUNTED)})
    c = g.create_group("compact", attributes={"description": "the per-job arrays in large chunks (a copy)"})
    for name in (st.JOB, *st.LABELS):
        st.new_array(c, name, coords[name])
    st.new_array(c, "metric", list(lay.metric_names), dims=("metric",))
    st.new_array(c, "metric_units", [st.units_of(m) for m in lay.metric_names], dims=("metric",))
    st.new_array(c, "step", np.arange(lay.n_steps, dtype=np.int64), dims=("step",))
    st.new_array(c, "field", list(lay.summary_fields), dims=("field",))
    st.new_array(c, "field_units", [st.units_of(f) for f in lay.summary_fields], dims=("field",))
    labels = " ".join(st.LABELS)
    padded = -(-lay.n_steps // block) * block
    st.new_array(c, "metrics", shape=(lay.n_jobs, len(lay.metric_names), lay.n_steps), chunks=(job_chunk, 1, block),
                 shards=(job_chunk, len(lay.metric_names), padded), dtype="float32", dims=(st.JOB, "metric", "step"),
                 coordinates=f"{labels} metric_units", attrs={"long_name": "per-step metrics (units: metric_units)"})
    st.new_array(c, "summary", shape=(lay.n_jobs, len(lay.summary_fields)), chunks=(lay.n_jobs, len(lay.summary_fields)),
                 dtype="float64", dims=(st.JOB, "field"), coordinates=f"{labels} field_units",
                 attrs={"long_name": "summary of each job's run (units: field_units)"})
    for name, dtype in LEDGER.items():
        st.new_array(c, name, shape=(lay.n_jobs,), chunks=(lay.n_jobs,), dtype=dtype,
                     fill=0 if name in ("status", "attempts", "threads") else None, coordinates=labels)
    st.consolidate(root.store.root)


@contextmanager
def dask_options(scheduler: str | None, workers: int | None, n_jobs: int, client=None) -> Iterator[dict]:
    """Keyword arguments for dask.compute; one process pool shared by both passes. A
    distributed client (given, or active when no scheduler is named) takes every task."""
    from pipeline.dask_cluster import active_client

    if client is not None and scheduler is not None:
        raise ValueError(f"scheduler={scheduler!r} and a client: give one of them")
    client = client if client is not None else (active_client() if scheduler is None else None)
    if client is not None:
        yield {"scheduler": client}
        return
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


def compact_jobs(path: str, a: int, b: int) -> dict:
    """Copy the metrics of jobs [a, b) into their compact shard; return their ledger entries,
    summary rows and the problems found ({row: [message]}: a chunk that cannot be decoded, or a
    finished job's metrics or summary that do not match its checksum).

    The ledger is read first: a worker writes status last, so 'done' read here means the data
    read after it are complete.
    """
    root = zarr.open_group(path, mode="r+")
    ledger, damage = st.read_ledger(root, range(a, b))      # live entries over the settled columns
    out: dict = dict(ledger)
    problems: dict[int, list[str]] = {row: list(why) for row, why in damage.items()}
    metrics, bad_m = st.read_rows(root[st.METRICS][st.VALUES], a, b)
    summary, bad_s = st.read_rows(root[st.SUMMARY][st.VALUES], a, b)
    counted = {STATUS_CODES[s] for s in COUNTED}
    # the arrays once per block: a group lookup costs zarr ~0.4 ms, once per job it was a third of the copy
    parts = {"metrics": (root[st.METRICS][st.VALUES], metrics, bad_m),
             "summary": (root[st.SUMMARY][st.VALUES], summary, bad_s)}
    for k, row in enumerate(range(a, b)):
        if row in problems or int(out["status"][k]) not in counted:
            continue
        for why in _check_finished(root, row, k, out["checksum"][k], parts):
            problems.setdefault(row, []).append(why)
    root[COMPACT]["metrics"][a:b] = metrics
    out["summary"] = summary
    out["problems"] = problems
    return out


def _check_finished(root: zarr.Group, row: int, k: int, checksum: str, parts: dict) -> list[str]:
    """Problems of a finished job's metrics and summary chunks (already read: `parts` holds
    part -> (array, the block's values, undecodable rows); the job is row k of the block)
    against its checksum."""
    sums = st.parse_checksum(checksum)
    if not sums:
        return [f"no checksum recorded (chunk {st.chunk_name(root[st.JOBS]['checksum'], row)})"]
    out = []
    for part, (arr, values, bad) in parts.items():
        if part not in sums:
            continue
        if row in bad:
            out.append(bad[row])
            continue
        why = st.part_problem(root, arr, row, sums[part], values[k])
        if why:
            out.append(why)
    return out


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
    arr = zarr.open_group(path, mode="r", use_consolidated=False)[COMPACT]["metrics"]
    x = arr.get_orthogonal_selection((slice(None), list(metric_index), slice(s0, s1)))  # (job, 2, B) float32
    out = np.stack([group_stats(x[:, k, :], members) for k in range(len(metric_index))])
    ssim = x[:, STAT_METRICS.index("ssim"), :].astype(np.float64)
    ssim[~np.isfinite(ssim)] = np.nan
    return out, np.fmax.reduce(ssim, axis=1)                          # NaN-skipping max; NaN if none


def group_stats(block: np.ndarray, members: Sequence[np.ndarray]) -> np.ndarray:
    """(group, stat, step): mean, std, median, q10, q90 and count of finite values over jobs.

    Steps without any finite value stay NaN; they are left out of the numpy calls rather than
    silenced, because warning filters are process-global and these run in threads.
    """
    out = np.full((len(members), len(STAT_NAMES), block.shape[1]), np.nan)
    for g, rows in enumerate(members):
        v = block[rows].astype(np.float64)
        v[~np.isfinite(v)] = np.nan
        count = np.sum(~np.isnan(v), axis=0)
        out[g, 5] = count
        some = count > 0
        if not some.any():
            continue
        v = v[:, some]
        out[g, 0, some] = np.nanmean(v, axis=0)
        out[g, 1, some] = np.nanstd(v, axis=0)
        out[g, 2:5, some] = nan_quantiles(v, QUANTILES).T
    return out


def nan_quantiles(v: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """(len(qs), columns): np.nanquantile(v, qs, axis=0) with numpy's default 'linear' method.

    Vectorised over columns (one sort) because np.nanquantile loops over columns in Python,
    which made it most of the aggregation's time; every column needs a finite value. Same
    interpolation formula as numpy's _lerp, so the results are identical (tested).
    """
    s = np.sort(v.T, axis=1)                                          # NaN sort last
    n = np.sum(~np.isnan(s), axis=1)
    cols = np.arange(s.shape[0])
    out = np.empty((len(qs), s.shape[0]))
    for k, q in enumerate(qs):
        pos = q * (n - 1)
        lo = np.floor(pos).astype(np.int64)
        t = pos - lo
        a, b = s[cols, lo], s[cols, np.minimum(lo + 1, n - 1)]
        diff = b - a
        out[k] = np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
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
                root_attrs, drop_db: float, ledger_fp: str):
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
             "ledger_fingerprint": ledger_fp, "counted_statuses": " ".join(COUNTED), "std_ddof": 0,
             "quantile_method": "linear (numpy default)", "onset_drop_db": float(drop_db),
             "description": "per-step statistics over the done and diverged jobs of each task × solver config"}
    return xr.Dataset(data, coords=coords, attrs=attrs)
