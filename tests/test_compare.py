"""Seed vs scan spread and paired comparisons (pipeline.compare), checked against numpy / scipy."""
from __future__ import annotations

import itertools
import shutil
import warnings

import numpy as np
import pytest
import scipy.stats
import xarray as xr

import pipeline
import store_factory as sf
from pipeline import compare
from pipeline.aggregate import aggregate


def jobs_dataset(values: dict, statuses: dict | None = None, field: str = "final_psnr") -> xr.Dataset:
    """A job Dataset from {(task, config, scan, seed): value}; every job done unless `statuses` says."""
    keys = list(values)
    statuses = statuses or {}
    coords = {name: ("job", np.array([k[i] for k in keys])) for i, name in enumerate(("task", "config", "scan_id"))}
    coords["seed"] = ("job", np.array([k[3] for k in keys]))
    coords["solver"], coords["params"] = coords["config"], ("job", np.array(["{}"] * len(keys)))
    return xr.Dataset({field: ("job", np.array([values[k] for k in keys], dtype=float)),
                       "status": ("job", np.array([statuses.get(k, "done") for k in keys]))},
                      coords={"job": [f"j{i}" for i in range(len(keys))], **coords})


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    # 3 scans × 3 configs × 3 seeds per task; job 4 failed, job 7 diverged
    return sf.fabricate_store(tmp_path_factory.mktemp("cmp") / "res.zarr", n_scans=3, seeds=(0, 1, 2),
                              statuses={4: "failed", 7: "diverged"})


def test_spread_over_seeds_and_scans_matches_numpy(fab):
    ds = pipeline.open_results(fab.path)
    spread = compare.seed_scan_spread(ds)
    counted = np.isin(fab.status, [2, 4])                          # done, diverged: as the table
    task, config, scan, seed = (fab.coord(k) for k in ("task", "config", "scan_id", "seed"))
    for name in ("final_psnr", "peak_psnr", "final_ssim"):
        values = fab.column(name)
        for g in range(spread.sizes["group"]):
            a = spread.isel(group=g)
            mine = counted & (task == a.task.item()) & (config == a.config.item()) & np.isfinite(values)
            per_scan = [values[mine & (scan == s)] for s in dict.fromkeys(scan[mine])]
            dof = sum(len(v) - 1 for v in per_scan)
            pooled = np.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in per_scan if len(v) > 1) / dof)
            assert float(a[f"{name}_seed_std"]) == pytest.approx(pooled, rel=1e-12)
            means = [np.mean(v) for v in per_scan]
            assert float(a[f"{name}_scan_std"]) == pytest.approx(np.std(means, ddof=1), rel=1e-12)
            assert int(a.n_scans) == 3 and int(a.n_seeds) == 3
    assert spread.group.values[0] == "denoise/dip"


def test_one_seed_gives_nan_seed_spread_and_no_warning():
    values = {("t", "dip", f"s{i}", 0): 20.0 + i for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spread = compare.seed_scan_spread(jobs_dataset(values))
    assert np.isnan(spread.final_psnr_seed_std.item())
    assert spread.final_psnr_scan_std.item() == pytest.approx(np.std([20, 21, 22, 23], ddof=1))
    assert int(spread.n_seeds.item()) == 1 and int(spread.n_scans.item()) == 4


def test_all_nan_and_unfinished_groups_give_nan_without_warnings():
    values = {("t", "dip", "s0", 0): np.nan, ("t", "dip", "s0", 1): np.inf, ("t", "dip", "s1", 0): np.nan,
              ("t", "new", "s0", 0): 21.0, ("t", "new", "s0", 1): 22.0, ("u", "dip", "s0", 0): 30.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spread = compare.seed_scan_spread(jobs_dataset(values, statuses={("u", "dip", "s0", 0): "failed"}))
        paired = compare.paired_comparison(jobs_dataset(values))
    dip, new, unfinished = (spread.sel(group=g) for g in ("t/dip", "t/new", "u/dip"))
    assert np.isnan([dip.final_psnr_seed_std, dip.final_psnr_scan_std, unfinished.final_psnr_seed_std]).all()
    assert int(unfinished.n_scans) == 0 and int(dip.n_seeds) == 2
    assert new.final_psnr_seed_std.item() == pytest.approx(np.std([21, 22], ddof=1)) and np.isnan(new.final_psnr_scan_std)
    # t: one pair of configs with no finite pair; u: one config, no pair
    assert list(paired.pair.values) == ["t: new vs dip"]
    p = paired.sel(metric="final_psnr").isel(pair=0)
    assert int(p.n_pairs) == 0 and np.isnan([p.mean_diff, p.ci_low, p.ci_high]).all() and not bool(p.significant)


def test_paired_interval_matches_scipy_on_the_store(fab):
    ds = pipeline.open_results(fab.path)
    paired = compare.paired_comparison(ds)
    assert set(paired.metric.values) >= {"final_psnr", "final_ssim", "peak_psnr", "es_psnr"}
    labels = ["dip", "aseqdip lambda=0.5", "aseqdip lambda=1.0"]
    expected = [f"{t}: {b} vs {a}" for t in ("denoise", "mri") for a, b in itertools.combinations(labels, 2)]
    assert list(paired.pair.values) == expected
    task, config, scan, seed = (fab.coord(k) for k in ("task", "config", "scan_id", "seed"))
    done = fab.status == 2
    for p in range(paired.sizes["pair"]):
        row = paired.isel(pair=p)
        for metric in ("final_psnr", "peak_psnr"):
            v = fab.column(metric)

            def side(cfg):
                return {(scan[i], seed[i]): v[i] for i in np.flatnonzero(done & (task == row.task.item())
                                                                         & (config == cfg))}
            a, b = side(row.config_a.item()), side(row.config_b.item())
            d = np.array([b[k] - a[k] for k in a if k in b])
            r = row.sel(metric=metric)
            lo, hi = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
            assert int(r.n_pairs) == len(d)
            assert float(r.mean_diff) == pytest.approx(d.mean(), rel=1e-12)
            assert (float(r.ci_low), float(r.ci_high)) == pytest.approx((lo, hi), rel=1e-10)
            assert bool(r.significant) == (not lo <= 0 <= hi)
    # job 4 (failed) and job 7 (diverged, its peak finite) are seed 1 of denoise000 with aseqdip λ=0.5 and
    # λ=1.0: only done jobs pair, so each comparison with one of them loses that (scan, seed)
    n = paired.n_pairs.sel(metric="peak_psnr").to_series()
    assert n["denoise: aseqdip lambda=0.5 vs dip"] == 8 and n["denoise: aseqdip lambda=1.0 vs dip"] == 8
    assert n["denoise: aseqdip lambda=1.0 vs aseqdip lambda=0.5"] == 8 and n["mri: aseqdip lambda=0.5 vs dip"] == 9


def test_paired_interval_by_hand_and_significance():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 → 2 ± 2.4841, contains 0
    base = {("t", "a", f"s{i}", 0): 20.0 + 5 * i for i in range(3)}
    values = {**base, **{("t", "b", f"s{i}", 0): 20.0 + 5 * i + d for i, d in enumerate((1, 2, 3))}}
    r = compare.paired_comparison(jobs_dataset(values)).isel(pair=0).sel(metric="final_psnr")
    assert float(r.mean_diff) == pytest.approx(2.0) and float(r.std_diff) == pytest.approx(1.0)
    assert float(r.ci_low) == pytest.approx(2 - 4.302653 / np.sqrt(3), abs=1e-5)
    assert not bool(r.significant) and float(r.mean_a) == pytest.approx(25.0) and float(r.mean_b) == pytest.approx(27.0)
    # differences 2.0, 2.1, 1.9, 2.2: the interval excludes 0
    values = {**base, ("t", "a", "s3", 0): 1.0,
              **{("t", "b", f"s{i}", 0): v + d for i, (v, d) in enumerate(zip((20, 25, 30, 1), (2, 2.1, 1.9, 2.2)))}}
    r = compare.paired_comparison(jobs_dataset(values)).isel(pair=0).sel(metric="final_psnr")
    assert int(r.n_pairs) == 4 and float(r.ci_low) > 0 and bool(r.significant)


def test_one_pair_has_no_interval_and_unmatched_seeds_drop():
    values = {("t", "a", "s0", 0): 20.0, ("t", "b", "s0", 0): 22.0, ("t", "a", "s0", 1): 21.0,
              ("t", "b", "s1", 0): 25.0}
    r = compare.paired_comparison(jobs_dataset(values)).isel(pair=0).sel(metric="final_psnr")
    assert int(r.n_pairs) == 1 and float(r.mean_diff) == pytest.approx(2.0)
    assert np.isnan([r.ci_low, r.ci_high, r.std_diff]).all() and not bool(r.significant)


def test_duplicate_jobs_are_a_clear_error():
    ds = jobs_dataset({("t", "a", "s0", 0): 1.0, ("t", "b", "s0", 0): 2.0})
    twice = xr.concat([ds, ds.assign_coords(job=["k0", "k1"])], dim="job")
    with pytest.raises(ValueError, match="share \\(task, config, scan_id, seed\\).*scan 's0', seed 0"):
        compare.paired_comparison(twice)
    with pytest.raises(ValueError, match="confidence"):
        compare.paired_comparison(ds, confidence=95)


def test_aggregate_writes_spreads_and_the_paired_group(fab, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(fab.path, path)
    stats = aggregate(path, workers=1)
    ds = pipeline.open_results(path)
    mine = compare.seed_scan_spread(ds)
    agg = pipeline.open_aggregate(path)
    assert list(agg.group.values) == list(mine.group.values)
    for name in ("final_psnr_seed_std", "final_psnr_scan_std", "es_psnr_seed_std", "n_scans", "n_seeds"):
        np.testing.assert_allclose(agg[name].values, mine[name].values, rtol=1e-12)
        assert name in stats
    assert "peak_ssim_seed_std" in agg                              # the aggregate's own peak SSIM
    paired = compare.open_paired(path)
    expected = compare.paired_comparison(ds)
    assert list(paired.pair.values) == list(expected.pair.values)
    for name in ("mean_diff", "ci_low", "ci_high", "n_pairs", "significant"):
        np.testing.assert_allclose(paired[name].sel(metric=list(expected.metric.values)).values,
                                   expected[name].values, rtol=1e-12)
    assert paired.attrs["confidence"] == 0.95 and paired.a.values[0] == "dip"
    assert compare.open_paired(fab.path) is None                     # never aggregated
