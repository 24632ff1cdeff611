"""Aggregation: per-step statistics, Table-2 columns, overfitting onset, compaction, reruns."""
from __future__ import annotations

import json

import shutil
import warnings

import numpy as np
import pytest
import zarr

import store_factory as sf
from pipeline import aggregate as ag
from pipeline import store as st
from pipeline.jobs import STATUS_CODES
from pipeline.query import StaleAggregateWarning, open_aggregate, open_results

# rows of the fabricated store with a non-done status (tasks × scans × configs × seeds = 36 jobs);
# group denoise/dip holds rows 0, 1, 6, 7, 12, 13; row 20 is an mri/aseqdip job
STATUSES = {1: "failed", 6: "diverged", 7: "pending", 12: "running", 20: "diverged"}
DIP_ROWS = [0, 1, 6, 7, 12, 13]
COUNTED = [STATUS_CODES["done"], STATUS_CODES["diverged"]]


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    """A fabricated store aggregated with small blocks: 5 job chunks and 4 step blocks (last partial)."""
    path = tmp_path_factory.mktemp("agg") / "res.zarr"
    fab = sf.fabricate_store(path, statuses=STATUSES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ag, "JOB_CHUNK", 8)
        mp.setattr(ag, "BLOCK_BYTES", 36 * 32 * 4)   # 36 jobs × 32 steps × 4 bytes: B = 32, 120 steps
        ag.aggregate(path)
    return fab


@pytest.fixture(scope="module")
def agg(fab):
    return open_aggregate(fab.path)


def groups_of(fab):
    """(task, config) → rows of counted jobs, recomputed independently of the code under test."""
    task, config = fab.coord("task"), fab.coord("config")
    out = {}
    for t, c in dict.fromkeys(zip(task, config)):
        out[(t, c)] = np.flatnonzero((task == t) & (config == c) & np.isin(fab.status, COUNTED))
    return out


def test_blocks_really_were_small(fab):
    arr = zarr.open_group(str(fab.path))["aggregate/compact/metrics"]
    assert arr.chunks == (8, 1, 32)


def test_per_step_statistics_equal_numpy(fab, agg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (task, config), rows in groups_of(fab).items():
            g = agg.isel(group=int(np.flatnonzero((agg.task == task).values & (agg.config == config).values)[0]))
            for metric in ("psnr", "ssim"):
                v = fab.metrics[rows, sf.METRIC_NAMES.index(metric)].astype(np.float64)
                expect = {"mean": np.nanmean(v, 0), "std": np.nanstd(v, 0), "median": np.nanmedian(v, 0),
                          "q10": np.nanquantile(v, 0.1, 0), "q90": np.nanquantile(v, 0.9, 0),
                          "count": np.sum(np.isfinite(v), 0)}
                for stat, want in expect.items():
                    np.testing.assert_allclose(g[f"{metric}_{stat}"].values, want, rtol=1e-12, atol=1e-12,
                                               err_msg=f"{task}/{config} {metric}_{stat}")


def test_only_done_and_diverged_jobs_count(fab, agg):
    first = agg.sel(group="denoise/dip")
    assert [fab.jobs[i].solver for i in DIP_ROWS] == ["dip"] * 6 and int(first.n_jobs) == 6
    assert (int(first.n_done), int(first.n_diverged), int(first.n_failed), int(first.n_unfinished)) == (2, 1, 1, 2)
    assert int(first.psnr_count.isel(step=0)) == 3
    # the diverged job counts up to its divergence, then drops out
    steps_run = int(fab.column("steps")[6])
    assert int(first.psnr_count.isel(step=steps_run - 1)) == 3
    assert int(first.psnr_count.isel(step=steps_run)) == 2
    assert int(agg.n_jobs.sum()) == len(fab.jobs)


def test_table2_columns(fab, agg):
    for (task, config), rows in groups_of(fab).items():
        g = agg.isel(group=int(np.flatnonzero((agg.task == task).values & (agg.config == config).values)[0]))
        for field in ("peak_psnr", "es_psnr", "es_ssim", "final_psnr", "final_ssim", "runtime_s", "steps_per_s",
                      "peak_step", "es_step"):
            v = fab.column(field)[rows]
            v = v[np.isfinite(v)]                   # a diverged job has no final PSNR / SSIM
            assert v.size, f"{task}/{config} {field}: nothing to compare"
            np.testing.assert_allclose(float(g[f"{field}_mean"]), np.mean(v), rtol=1e-12)
            np.testing.assert_allclose(float(g[f"{field}_std"]), np.std(v), rtol=1e-12, atol=1e-12)
        peak_ssim = np.nanmax(fab.metrics[rows, sf.METRIC_NAMES.index("ssim")].astype(np.float64), axis=1)
        np.testing.assert_allclose(float(g.peak_ssim_mean), peak_ssim.mean(), rtol=1e-12)
    diverged_group = agg.sel(group="denoise/dip")
    finals = fab.column("final_psnr")[[0, 6, 13]]
    assert np.isnan(finals[1]) and float(diverged_group.final_psnr_mean) == pytest.approx(finals[[0, 2]].mean())


def test_nan_quantiles_equal_numpy():
    rng = np.random.default_rng(3)
    for shape in ((40, 17), (1, 6), (2, 3), (301, 64)):
        v = rng.normal(size=shape)
        v[rng.random(shape) < 0.4] = np.nan
        v[0] = rng.normal(size=shape[1])           # every column keeps a finite value
        v[:, 0] = 5.0                               # ties
        q = (0.5, 0.1, 0.9, 0.0, 1.0, 0.37)
        np.testing.assert_array_equal(ag.nan_quantiles(v, q), np.nanquantile(v, q, axis=0))


def test_overfitting_onset_on_a_known_curve():
    steps = np.arange(200, dtype=np.float64)
    # rises 0.5 dB/step to 30 dB at step 40, then falls 0.125 dB/step: 1 dB below at step 48
    curve = np.where(steps <= 40, 10 + 0.5 * steps, 30 - 0.125 * (steps - 40))
    assert ag.overfitting_onset(curve) == (40.0, 30.0, 48.0)
    assert ag.overfitting_onset(curve, drop_db=2.0)[2] == 56.0
    flat = np.minimum(10 + steps, 30.0)
    assert np.isnan(ag.overfitting_onset(flat)[2]), "a curve that never falls has no onset"
    gap = curve.copy()
    gap[45:50] = np.nan                            # missing steps are not a fall
    assert ag.overfitting_onset(gap)[2] == 50.0
    assert all(np.isnan(ag.overfitting_onset(np.full(5, np.nan))))


def test_onset_of_the_aggregated_mean_curve(tmp_path):
    """Every job of a group follows the known curve (plus zero-mean offsets): onset at step 48."""
    jobs = sf.create(tmp_path / "r.zarr", sf.make_jobs(tasks=("denoise",), configs=(("dip", {}, 200),), n_scans=2))
    steps = np.arange(200, dtype=np.float64)
    curve = np.where(steps <= 40, 10 + 0.5 * steps, 30 - 0.125 * (steps - 40))
    for job, offset in zip(jobs, (-0.25, 0.25, -0.5, 0.5)):
        w = st.JobWriter(tmp_path / "r.zarr", job)
        w.start("cpu")
        w.metrics({"loss": np.ones(200), "psnr": curve + offset})
        w.finish("done", 1.0)
    ds = ag.aggregate(tmp_path / "r.zarr")
    assert float(ds.curve_peak_step[0]) == 40.0 and float(ds.curve_peak_psnr[0]) == pytest.approx(30.0)
    assert float(ds.onset_step[0]) == 48.0


def test_compaction_preserves_values_exactly(fab):
    root = zarr.open_group(str(fab.path), mode="r")
    c = root["aggregate/compact"]
    assert np.array_equal(c["metrics"][:], root["metrics/values"][:], equal_nan=True)
    assert np.array_equal(c["metrics"][:], fab.metrics, equal_nan=True)
    assert np.array_equal(c["summary"][:], root["summary/values"][:], equal_nan=True)
    ledger = st.read_ledger(st.open_store(fab.path))[0]     # the live ledger: entries over the columns
    for name in st.LEDGER:
        live, compact = ledger[name], c[name][:]
        if live.dtype.kind == "f":
            assert np.array_equal(compact, live, equal_nan=True), name
        else:
            assert list(compact) == list(live), name
    assert list(c["status"][:]) == list(fab.status)


def test_rerun_replaces_the_aggregate_and_staleness_is_detected(fab, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(fab.path, path)
    zarr.open_group(str(path))["aggregate/stats"].create_array("leftover", shape=(1,), dtype="int8",
                                                            dimension_names=("leftover",))
    pending = fab.jobs[7]
    w = st.JobWriter(path, pending)                # the pending job runs after the aggregation
    w.start("cpu")
    w.metrics({"psnr": np.full(pending.steps, 50.0)})
    w.finish("done", 1.0)
    with pytest.warns(StaleAggregateWarning):
        open_aggregate(path)
    with pytest.warns(StaleAggregateWarning):
        assert open_results(path).attrs["read_from"] == "live"
    again = ag.aggregate(path, scheduler="processes", workers=2)
    # only the block of 8 jobs holding row 7 was copied again; the stats were replaced
    assert json.loads(again.attrs["compaction"]) == {"mode": "incremental", "job_blocks": 5, "job_blocks_copied": 1}
    root = zarr.open_group(str(path))
    assert "leftover" not in root["aggregate/stats"]
    assert np.array_equal(root["aggregate/compact/metrics"][:], root["metrics/values"][:], equal_nan=True)
    assert list(root["aggregate/compact/status"][:]) == list(st.statuses(st.open_store(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleAggregateWarning)
        again = open_aggregate(path)
        assert open_results(path).attrs["read_from"] == "compact"
    before = open_aggregate(fab.path).sel(group="denoise/dip")
    after = again.sel(group="denoise/dip")
    assert int(after.n_done) == int(before.n_done) + 1 and int(after.n_unfinished) == 1
    assert int(after.psnr_count.isel(step=0)) == 4
    rows = [0, 6, 7, 13]
    psnr = root["metrics/values"][rows, sf.METRIC_NAMES.index("psnr"), :].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(after.psnr_mean.values, np.nanmean(psnr, 0), rtol=1e-12)
        np.testing.assert_allclose(after.psnr_q90.values, np.nanquantile(psnr, 0.9, 0), rtol=1e-12)
    # processes and threads give the same numbers on the untouched groups
    for name in ("psnr_median", "ssim_mean", "final_psnr_mean", "peak_ssim_mean"):
        np.testing.assert_array_equal(again[name].sel(group="mri/dip").values,
                                      open_aggregate(fab.path)[name].sel(group="mri/dip").values)
    # a full rebuild replaces the whole group and gives the same statistics
    root["aggregate"].create_array("leftover", shape=(1,), dtype="int8")
    rebuilt = ag.aggregate(path, full=True)
    assert json.loads(rebuilt.attrs["compaction"])["mode"] == "full" and "leftover" not in zarr.open_group(str(path))["aggregate"]
    for name in ("psnr_mean", "ssim_q10", "final_psnr_std", "onset_step"):
        np.testing.assert_array_equal(rebuilt[name].values, again[name].values)


def test_a_job_failing_again_is_noticed(fab, tmp_path):
    """Same status, one more attempt: the compact copy is stale and its block is copied again."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(fab.path, path)
    w = st.JobWriter(path, fab.jobs[1])            # the failed job, retried, fails again
    w.start("cpu")
    w.finish("failed", 0.5, error="ValueError: second failure")
    assert ag.live_fingerprint(zarr.open_group(str(path))) != open_aggregate(fab.path).attrs["ledger_fingerprint"]
    again = ag.aggregate(path)
    assert json.loads(again.attrs["compaction"])["job_blocks_copied"] == 1
    ds = open_results(path)
    assert ds.attrs["read_from"] == "compact" and ds.error.values[1] == "ValueError: second failure"
    assert ds.attempts.values[1] == 2


def test_an_interrupted_aggregate_is_not_used(fab, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(fab.path, path)
    zarr.open_group(str(path))["aggregate"].attrs["complete"] = False
    with pytest.raises(st.StoreError, match="interrupted"):
        open_aggregate(path)
    assert open_results(path).attrs["read_from"] == "live"


def test_step_block_bounds_memory():
    assert ag.step_block(10_000, 4000) == 512
    for n in (1, 100, 10_000, 200_000):
        b = ag.step_block(n, 100_000)
        assert b == 1024 or n * b * 4 <= ag.BLOCK_BYTES
    assert ag.step_block(10, 40) == 40


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(st.StoreError, match="not a dipcohort results store"):
        ag.aggregate(tmp_path)


def test_the_compact_copy_is_one_shard_file_per_block_of_jobs(fab):
    """36 jobs in blocks of 8: 5 metrics shard files (each holding every metric and step block of
    its jobs) and one chunk file per ledger and summary array, instead of a file per job and array."""
    root = zarr.open_group(str(fab.path), mode="r")
    metrics = root["aggregate/compact/metrics"]
    assert metrics.shards == (8, metrics.shape[1], metrics.shards[2]) and metrics.chunks[:2] == (8, 1)
    shard_files = [p for p in (fab.path / "aggregate/compact/metrics").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(shard_files) == 5
    for name in ("summary", *st.LEDGER):
        files = [p for p in (fab.path / "aggregate/compact" / name).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(files) <= 1, name
