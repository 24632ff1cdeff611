"""Cost of the seed / scan spreads and paired comparisons (pipeline.compare) for a large cohort.

    python benchmarks/compare_scale.py [--scans 250] [--configs 5] [--seeds 4] [--tasks 2]

Builds a job Dataset in memory as `pipeline.open_results` gives it (the default: 2 tasks × 250
scans × 5 solver configurations × 4 seeds = 10,000 jobs, 10 summary fields, 5 % of jobs failed)
and prints the wall time of `spread_variables` and `paired_comparison` on it. They read the
summary vectors only, so the store's per-step arrays do not matter here. Not a test: prints figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import compare  # noqa: E402


def cohort(tasks: int, scans: int, configs: int, seeds: int, rng: np.random.Generator) -> xr.Dataset:
    t, s, c, e = np.meshgrid(np.arange(tasks), np.arange(scans), np.arange(configs), np.arange(seeds), indexing="ij")
    t, s, c, e = (a.ravel() for a in (t, s, c, e))
    n = t.size
    scan_effect = rng.normal(0, 2, (tasks, scans))[t, s]
    data = {f: ("job", 25 + scan_effect + 0.3 * c + rng.normal(0, 0.5, n)) for f in compare.FIELDS}
    data["status"] = ("job", np.where(rng.uniform(size=n) < 0.05, "failed", "done"))
    coords = {"job": [f"j{i}" for i in range(n)], "task": ("job", np.array([f"task{k}" for k in t])),
              "scan_id": ("job", np.array([f"scan{k}" for k in s])), "config": ("job", np.array([f"cfg{k}" for k in c])),
              "solver": ("job", np.array([f"solver{k}" for k in c])), "params": ("job", np.full(n, "{}")),
              "seed": ("job", e)}
    return xr.Dataset(data, coords=coords)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--scans", type=int, default=250)
    p.add_argument("--configs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args()
    jobs = cohort(a.tasks, a.scans, a.configs, a.seeds, np.random.default_rng(0))
    groups = compare.config_groups(jobs)
    t0 = time.perf_counter()
    spread = compare.spread_variables(jobs, groups.task, groups.config)
    t1 = time.perf_counter()
    paired = compare.paired_comparison(jobs)
    t2 = time.perf_counter()
    print(f"{jobs.sizes['job']} jobs, {len(groups)} groups, {len(compare.FIELDS)} fields: "
          f"spread_variables {t1 - t0:.3f} s ({len(spread)} variables), "
          f"paired_comparison {t2 - t1:.3f} s ({paired.sizes['pair']} pairs × {paired.sizes['metric']} metrics)")


if __name__ == "__main__":
    main()
