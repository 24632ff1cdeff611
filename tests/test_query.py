"""xarray views of a results store: open_results, images (lazy), open_aggregate, README queries."""
from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest

import pipeline
import store_factory as sf
from pipeline import store as st
from pipeline.aggregate import aggregate
from pipeline.jobs import STATUS_NAMES

STATUSES = {1: "failed", 6: "diverged", 7: "pending"}


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    return sf.fabricate_store(tmp_path_factory.mktemp("q") / "res.zarr", statuses=STATUSES, n_scans=2)


@pytest.fixture(scope="module")
def aggregated(fab):
    aggregate(fab.path)
    return fab


def test_open_results_variables_coords_and_values(fab):
    ds = pipeline.open_results(fab.path, use_compact="never")
    n, steps = len(fab.jobs), fab.metrics.shape[2]
    assert dict(ds.sizes) == {"job": n, "step": steps}
    for k, name in enumerate(sf.METRIC_NAMES):
        assert ds[name].dims == ("job", "step") and isinstance(ds[name].data, da.Array), name
        np.testing.assert_array_equal(ds[name].values, fab.metrics[:, k])
    for k, name in enumerate(sf.SUMMARY_FIELDS):
        np.testing.assert_array_equal(ds[name].values, fab.summary[:, k])
    assert list(ds.job.values) == [j.job_id for j in fab.jobs]
    for name in ("scan_id", "task", "solver", "config", "seed"):
        assert list(ds[name].values) == list(fab.coord(name)), name
        assert ds[name].dims == ("job",)
    assert list(ds.step_budget.values) == [j.steps for j in fab.jobs]
    assert list(ds.status.values) == [STATUS_NAMES[int(c)] for c in fab.status]
    assert ds.error.values[1].startswith("RuntimeError: boom") and ds.error.values[0] == ""
    assert list(ds.attempts.values[:3]) == [1, 1, 1] and ds.attempts.values[7] == 0
    assert np.isnan(ds.job_runtime_s.values[7]) and ds.job_runtime_s.values[0] > 0
    assert ds.log_path.values[0].endswith(f"{fab.jobs[0].job_id}.log")
    assert ds.attrs["cohort"] == "fabricated" and "zarr" in ds.attrs["packages"] and "git_commit" in ds.attrs
    assert ds.attrs["read_from"] == "live"


def test_compact_and_live_reads_agree(aggregated):
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # fresh: no staleness warning
        compact = pipeline.open_results(aggregated.path)
    live = pipeline.open_results(aggregated.path, use_compact="never")
    assert compact.attrs["read_from"] == "compact"
    assert compact.psnr.data.chunksize[0] == len(aggregated.jobs)
    assert live.load().identical(compact.load().assign_attrs(read_from="live"))
    with pytest.raises(ValueError, match="use_compact"):
        pipeline.open_results(aggregated.path, use_compact="sometimes")


def test_images_are_lazy_and_match(fab):
    groups = pipeline.open_images(fab.path)
    assert sorted(groups) == ["c1_16x16", "c2_16x16"]
    mri = groups["c2_16x16"]
    assert mri.final.dims == ("job", "channel", "y", "x") and isinstance(mri.final.data, da.Array)
    assert mri.reference.dims == ("job", "display_channel", "y", "x")
    assert set(mri.task.values) == {"mri"}
    for job_id in mri.job.values[:3]:
        row = next(j.index for j in fab.jobs if j.job_id == job_id)
        np.testing.assert_array_equal(mri.final.sel(job=job_id).values, fab.images["final"][row, :2])
    job = fab.jobs[0]
    image = pipeline.load_image(fab.path, job.job_id)
    assert isinstance(image.data, da.Array) and image.dims == ("channel", "y", "x")
    assert image.attrs["scan_id"] == job.scan.id and image.attrs["solver"] == job.solver
    np.testing.assert_array_equal(image.values, fab.images["final"][job.index, :1])
    np.testing.assert_array_equal(pipeline.load_image(fab.path, job.job_id, "reference").values,
                                  fab.images["reference"][job.index])
    mri_job = next(j for j in fab.jobs if j.scan.task == "mri" and fab.status[j.index] == 2)
    shown = pipeline.load_image(fab.path, mri_job.job_id, display=True)
    x = fab.images["final"][mri_job.index]
    assert shown.dims == ("display_channel", "y", "x")
    np.testing.assert_allclose(shown.values[0], np.sqrt(x[0] ** 2 + x[1] ** 2), rtol=1e-6)
    assert np.isnan(pipeline.load_image(fab.path, fab.jobs[1].job_id).values).all(), "failed job: NaN image"
    with pytest.raises(KeyError, match="no job with id"):
        pipeline.load_image(fab.path, "nope")
    with pytest.raises(KeyError, match="no image group"):
        pipeline.open_images(fab.path, "c9_1x1")


def test_open_aggregate_requires_an_aggregate(tmp_path):
    fab = sf.fabricate_store(tmp_path / "r.zarr", n_scans=1, seeds=(0,), tasks=("denoise",))
    with pytest.raises(st.StoreError, match="dipcohort aggregate"):
        pipeline.open_aggregate(fab.path)


def test_readme_queries(aggregated):
    """The README's queries, verbatim, checked against numpy on the fabricated numbers."""
    store = aggregated.path
    ds = pipeline.open_results(store)
    # mean PSNR curve per solver
    curves = ds.psnr.where(ds.status.isin(["done", "diverged"])).groupby("solver").mean("job")
    import matplotlib
    matplotlib.use("Agg")
    assert len(curves.plot.line(x="step")) == 2    # one line per solver
    rows = np.flatnonzero((aggregated.coord("solver") == "dip") & np.isin(aggregated.status, [2, 4]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmean(aggregated.metrics[rows, 1].astype(np.float64), axis=0)
    np.testing.assert_allclose(curves.sel(solver="dip").values, want, rtol=1e-5)
    # the Table-2-style table
    agg = pipeline.open_aggregate(store)
    table = agg[["peak_psnr_mean", "peak_psnr_std", "es_psnr_mean", "final_psnr_mean", "final_psnr_std",
                 "final_ssim_mean", "onset_step", "runtime_s_mean"]].to_dataframe()
    assert len(table) == agg.sizes["group"] == 6 and "denoise/dip" in table.index
    drows = np.flatnonzero((aggregated.coord("solver") == "dip") & (aggregated.coord("task") == "denoise")
                           & np.isin(aggregated.status, [2, 4]))
    finals = aggregated.column("final_psnr")[drows]
    assert table.loc["denoise/dip", "final_psnr_mean"] == pytest.approx(np.nanmean(finals))
    assert table.loc["denoise/dip", "task"] == "denoise" and table.loc["denoise/dip", "label"] == "dip"
    # the failed jobs, with their error and log file
    failed = ds[["error", "log_path"]].where(ds.status == "failed", drop=True).to_dataframe()
    assert list(failed.index) == [aggregated.jobs[1].job_id]
    assert failed.error.iloc[0].startswith("RuntimeError") and failed.scan_id.iloc[0] == aggregated.jobs[1].scan.id
    # one reconstruction, loaded lazily
    best = ds.final_psnr.where(ds.task == "denoise").idxmax("job").item()
    image = pipeline.load_image(store, best, display=True)
    assert isinstance(image.data, da.Array) and image.dims == ("display_channel", "y", "x")
    row = next(j.index for j in aggregated.jobs if j.job_id == best)
    assert row == int(np.nanargmax(np.where(aggregated.coord("task") == "denoise", aggregated.column("final_psnr"),
                                            np.nan)))
    np.testing.assert_array_equal(image.values, aggregated.images["final"][row, :1])
