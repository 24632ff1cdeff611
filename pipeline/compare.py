"""Seeds and uncertainty: seed vs scan spread per group, and paired comparisons of solver configs.

Both work on the per-job summaries (one number per job: final_psnr, final_ssim, peak_psnr, ...),
never on per-step arrays, so they cost milliseconds for 10,000 jobs. Input: a Dataset over `job`
with coordinates scan_id, task, solver, config, params, seed, a `status` variable (names) and the
summary variables, as `pipeline.open_results(store)` returns (or `summary_dataset`, which the
aggregation builds from what it already read). Non-finite values (±inf, NaN) count as missing.

Spread (`spread_variables`; written into `aggregate/stats` as `<field>_seed_std`,
`<field>_scan_std`, `n_scans`, `n_seeds`), per task × solver configuration, over the same jobs
as the table's mean ± std (done and diverged):
- seed std: the pooled std over seeds within a scan, sqrt(Σ_scans (n_i − 1) s_i² / Σ (n_i − 1))
  with s_i the sample std (ddof = 1) of scan i's n_i seeds: one-way ANOVA's within-scan std,
  the RMS of the per-scan stds when every scan has the same seeds. Scans with one seed add
  nothing; with one seed everywhere it is NaN (no seed variability was measured), not 0.
- scan std: the sample std (ddof = 1) over scans of each scan's mean over its seeds; NaN with
  fewer than two scans. (The table's ± std is numpy's population std over all jobs, ddof = 0.)

Paired comparison (`paired_comparison`; written as the group `aggregate/paired`, dims
(pair, metric), pair labelled 'task: b vs a'): within each task, every pair (a, b) of solver configurations, a listed before b
in the manifest, difference b − a. Only jobs with status done enter; jobs are matched on
(scan_id, seed); a (scan, seed) missing or non-finite on either side is dropped, and `n_pairs`
says how many entered, per metric. Interval: the paired t-interval, mean ± t_{(1+c)/2, n−1} ·
sd / √n with sd the sample std (ddof = 1) of the n differences, c = 0.95 (scipy.stats.t). With
fewer than two pairs there is no interval (ci_low, ci_high NaN, significant False). A difference
is `significant` when its interval excludes 0; the report marks the others "not significant".
Every (scan, seed) pair counts as one independent draw: when several seeds share a scan and the
difference varies more between scans than between seeds, this interval is narrower than one over
scans would be. There is no correction for multiple comparisons: each interval is a 95 %
interval on its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from pipeline.aggregate import GROUP, as_text, config_labels
from pipeline.jobs import STATUS_NAMES

PAIRED = f"{GROUP}/paired"
CONFIDENCE = 0.95
# summary fields compared and spread, where the Dataset has them (peak_ssim: the aggregate's own)
FIELDS = ("final_psnr", "final_ssim", "peak_psnr", "peak_ssim", "es_psnr", "es_ssim", "ema_psnr", "ema_ssim",
          "final_psnr_full", "final_ssim_full")
SPREAD_STATUSES = ("done", "diverged")     # as the table's mean ± std (pipeline.aggregate.COUNTED)
PAIRED_STATUSES = ("done",)
KEYS = ("task", "config", "scan_id", "seed")


def summary_dataset(coords: dict[str, np.ndarray], status_codes: np.ndarray,
                    per_job: dict[str, np.ndarray]) -> xr.Dataset:
    """The job Dataset this module needs, from arrays already in memory (the aggregation's)."""
    names = np.array([STATUS_NAMES.get(int(c), "unknown") for c in status_codes], dtype=str)
    data = {name: ("job", np.asarray(v, dtype=np.float64)) for name, v in per_job.items()}
    data["status"] = ("job", names)
    keep = ("scan_id", "task", "solver", "config", "params", "seed")
    return xr.Dataset(data, coords={k: ("job", coords[k]) for k in keep if k in coords})


def present_fields(jobs: xr.Dataset, fields: Sequence[str] | None = None) -> list[str]:
    return [f for f in (fields or FIELDS) if f in jobs]


def job_frame(jobs: xr.Dataset, fields: Sequence[str], statuses: Sequence[str]) -> pd.DataFrame:
    """One row per job with the given statuses: task, config, scan_id, seed and the fields (NaN if not finite)."""
    keep = np.isin(jobs["status"].values, list(statuses))
    frame = pd.DataFrame({k: np.asarray(jobs[k].values)[keep] for k in KEYS})
    for f in fields:
        v = np.asarray(jobs[f].values, dtype=np.float64)[keep]
        frame[f] = np.where(np.isfinite(v), v, np.nan)
    return frame


def config_groups(jobs: xr.Dataset) -> pd.DataFrame:
    """(task, config) in order of first appearance, with solver and the aggregate's label."""
    first = pd.DataFrame({k: np.asarray(jobs[k].values) for k in ("task", "config", "solver")})
    first["params"] = np.asarray(jobs["params"].values) if "params" in jobs else "{}"
    first = first.drop_duplicates(["task", "config"]).reset_index(drop=True)
    first["label"] = config_labels(list(first.solver), list(first.params), list(first.config))
    return first


# ---------------------------------------------------------------------------------------------
# seed vs scan spread
# ---------------------------------------------------------------------------------------------
def spread_variables(jobs: xr.Dataset, tasks: Sequence[str], configs: Sequence[str],
                     fields: Sequence[str] | None = None,
                     statuses: Sequence[str] = SPREAD_STATUSES) -> dict[str, tuple]:
    """{name: (('group',), values)} for the groups (tasks[g], configs[g]): `<field>_seed_std`,
    `<field>_scan_std` per field, `n_scans` and `n_seeds` (distinct, among the counted jobs)."""
    fields = present_fields(jobs, fields)
    frame = job_frame(jobs, fields, statuses)
    groups = pd.MultiIndex.from_arrays([np.asarray(tasks, dtype=str), np.asarray(configs, dtype=str)])
    at = lambda series: series.reindex(groups).to_numpy(dtype=np.float64)  # noqa: E731 - absent group: NaN
    by_group = frame.groupby(["task", "config"])
    out: dict[str, tuple] = {
        "n_scans": (("group",), np.nan_to_num(at(by_group["scan_id"].nunique())).astype(np.int64)),
        "n_seeds": (("group",), np.nan_to_num(at(by_group["seed"].nunique())).astype(np.int64)),
    }
    # count, var and mean skip NaN: one pass over the jobs for every field
    per_scan = frame.groupby(["task", "config", "scan_id"])[fields].agg(["count", "var", "mean"])
    for f in fields:
        dof = (per_scan[(f, "count")] - 1).clip(lower=0)
        squares = (dof * per_scan[(f, "var")]).where(dof > 0, 0.0)     # var is NaN for one seed
        pooled_dof = dof.groupby(level=[0, 1]).sum()
        pooled_var = squares.groupby(level=[0, 1]).sum() / pooled_dof.where(pooled_dof > 0)
        out[f"{f}_seed_std"] = (("group",), np.sqrt(at(pooled_var)))
        out[f"{f}_scan_std"] = (("group",), at(per_scan[(f, "mean")].groupby(level=[0, 1]).std(ddof=1)))
    return out


def seed_scan_spread(jobs: xr.Dataset, fields: Sequence[str] | None = None,
                     statuses: Sequence[str] = SPREAD_STATUSES) -> xr.Dataset:
    """The spread variables over `group` ('task/label', as in the aggregate), for use in a notebook."""
    groups = config_groups(jobs)
    data = spread_variables(jobs, groups.task, groups.config, fields, statuses)
    coords = {"group": [f"{t}/{lab}" for t, lab in zip(groups.task, groups.label)],
              **{k: ("group", groups[k].to_numpy(dtype=str)) for k in ("task", "config", "solver", "label")}}
    return xr.Dataset(data, coords=coords)


# ---------------------------------------------------------------------------------------------
# paired comparison
# ---------------------------------------------------------------------------------------------
def paired_comparison(jobs: xr.Dataset, fields: Sequence[str] | None = None, confidence: float = CONFIDENCE,
                      statuses: Sequence[str] = PAIRED_STATUSES) -> xr.Dataset:
    """Dataset over (pair, metric): mean_diff (b − a), ci_low, ci_high, std_diff, mean_a, mean_b,
    n_pairs, significant; coordinates task, a, b (labels), config_a/b, solver_a/b along pair."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a number between 0 and 1")
    fields = present_fields(jobs, fields)
    frame = job_frame(jobs, fields, statuses)
    _check_unique(frame)
    groups = config_groups(jobs)
    blocks, pairs = [], []
    for task, mine in groups.groupby("task", sort=False):
        configs = list(mine.config)
        i, j = np.triu_indices(len(configs), 1)
        if not i.size:
            continue
        wide = frame[frame.task == task].set_index(["scan_id", "seed", "config"])[fields].unstack("config")
        values = np.stack([wide[f].reindex(columns=configs).to_numpy(dtype=np.float64) if f in wide
                           else np.full((len(wide), len(configs)), np.nan) for f in fields])   # (field, row, config)
        blocks.append(paired_stats(values[:, :, i], values[:, :, j], confidence))
        rows = mine.reset_index(drop=True)
        pairs += [(task, rows.iloc[a], rows.iloc[b]) for a, b in zip(i, j)]
    return _paired_dataset(blocks, pairs, fields, confidence, statuses)


def paired_stats(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """Paired t statistics of b − a along axis 1 of (metric, row, pair) arrays; NaN marks a missing
    value. Returns (pair, metric) arrays; no interval (NaN) with fewer than two pairs."""
    diff = b - a
    ok = np.isfinite(diff)
    n = ok.sum(axis=1)
    mean = _masked_mean(diff, ok, n)
    centred = np.where(ok, diff - mean[:, None, :], 0.0)
    var = np.divide((centred ** 2).sum(axis=1), n - 1, out=np.full(n.shape, np.nan), where=n > 1)
    sd = np.sqrt(var)
    t = np.full(n.shape, np.nan)
    t[n > 1] = scipy.stats.t.ppf(0.5 + confidence / 2, n[n > 1] - 1)
    half = t * sd / np.sqrt(np.maximum(n, 1))
    low, high = mean - half, mean + half
    out = {"mean_diff": mean, "ci_low": low, "ci_high": high, "std_diff": sd,
           "mean_a": _masked_mean(a, ok, n), "mean_b": _masked_mean(b, ok, n), "n_pairs": n,
           "significant": (low > 0) | (high < 0)}                      # NaN compares False: no interval
    return {k: v.T for k, v in out.items()}


def _masked_mean(x: np.ndarray, ok: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.divide(np.where(ok, x, 0.0).sum(axis=1), n, out=np.full(n.shape, np.nan), where=n > 0)


def _check_unique(frame: pd.DataFrame) -> None:
    dup = frame.duplicated(list(KEYS), keep=False)
    if dup.any():
        row = frame[dup].iloc[0]
        raise ValueError(f"paired comparison: {int(dup.sum())} jobs share (task, config, scan_id, seed), e.g. "
                         f"task {row.task!r}, config {row.config!r}, scan {row.scan_id!r}, seed {row.seed}; "
                         "expected one job per scan × solver configuration × seed")


def _paired_dataset(blocks: list[dict], pairs: list, fields: list[str], confidence: float,
                    statuses: Sequence[str]) -> xr.Dataset:
    names = ("mean_diff", "ci_low", "ci_high", "std_diff", "mean_a", "mean_b", "n_pairs", "significant")
    empty = {"n_pairs": np.int64, "significant": bool}
    data = {k: (("pair", "metric"), np.concatenate([blk[k] for blk in blocks]) if blocks
                else np.zeros((0, len(fields)), dtype=empty.get(k, np.float64))) for k in names}
    text = lambda values: np.array(values, dtype=object)  # noqa: E731 - variable-length UTF-8 in zarr v3
    coords = {"pair": text([f"{t}: {b.label} vs {a.label}" for t, a, b in pairs]), "metric": text(fields),
              "task": ("pair", text([t for t, _, _ in pairs]))}
    for side, k in (("a", 1), ("b", 2)):
        coords[side] = ("pair", text([p[k].label for p in pairs]))
        coords[f"config_{side}"] = ("pair", text([p[k].config for p in pairs]))
        coords[f"solver_{side}"] = ("pair", text([p[k].solver for p in pairs]))
    attrs = {"difference": "b − a (b listed after a in the manifest)", "confidence": float(confidence),
             "interval": "paired t-interval: mean ± t((1+confidence)/2, n−1) · sd/√n, sd with ddof=1; "
                         "NaN with fewer than 2 pairs",
             "matched_on": ["scan_id", "seed"], "statuses": list(statuses),
             "significant": "the interval excludes 0 (False where there is no interval)",
             "multiple_comparisons": "none: each interval is a 95 % interval on its own"}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def open_paired(store: str | Path) -> xr.Dataset | None:
    """The paired comparison the aggregation wrote (`aggregate/paired`), or None if it has none."""
    from pipeline.store import open_store

    if PAIRED not in open_store(store):
        return None
    ds = xr.open_zarr(str(store), group=PAIRED, consolidated=False).load()
    for name in list(ds.coords):
        if ds[name].dtype.kind in ("T", "O"):
            ds[name] = ds[name].copy(data=as_text(ds[name].values))
    return ds
