"""The store is plain xarray: every group opens with xarray.open_zarr (labelled coordinates,
consolidated metadata, CF units), the whole store with open_datatree, open_results' Dataset
goes to netCDF and back unchanged, and a moved store still finds its logs and manifest."""
from __future__ import annotations

import io
import shutil
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import pipeline
import sched_common as sc
import store_factory as sf
from pipeline import store as st
from pipeline.aggregate import aggregate
from pipeline.driver import run_cohort
from schedulers.local import LocalBackend


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """A tiny cohort run end to end by the driver with the local backend (2 jobs, 20 steps), aggregated."""
    base = tmp_path_factory.mktemp("xr-real")
    manifest = sc.write_manifest(base / "cohort.yaml", steps=20, seeds=(0,))
    out = base / "runs" / "real.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = run_cohort(manifest, out, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    assert counts == {"done": 2}
    aggregate(out, scheduler="synchronous")
    return out


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    return sf.fabricate_store(tmp_path_factory.mktemp("xr-fab") / "fab.zarr", statuses={3: "failed", 5: "pending"})


def _open(store, group):
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no "consolidated metadata not found" or other warning
        return xr.open_zarr(store, group=group)


def test_every_group_opens_with_labelled_coordinates(real_store):
    root = st.open_store(real_store)
    ids = list(st.job_coords(root)["job"])
    jobs = _open(real_store, "jobs")
    assert list(jobs.job.values) == ids and jobs.indexes["job"] is not None
    for name in ("scan_id", "task", "solver", "config", "seed"):
        assert name in jobs.coords and jobs[name].dims == ("job",), name
    assert set(jobs.status.values) == {st.STATUS_CODES["done"]}
    assert jobs.runtime_s.attrs["units"] == "s" and "long_name" in jobs.status.attrs
    assert np.issubdtype(jobs.heartbeat.dtype, np.datetime64)        # CF time units decode

    metrics = _open(real_store, "metrics")
    names = list(metrics.metric.values)
    assert names[:len(st.BASE_METRICS)] == list(st.BASE_METRICS)
    assert metrics["values"].dims == ("job", "metric", "step") and list(metrics.job.values) == ids
    assert dict(zip(names, metrics.metric_units.values))["psnr"] == "dB"
    psnr = metrics["values"].sel(metric="psnr", job=ids[0]).values
    assert np.isfinite(psnr).all() and psnr.shape == (20,)
    assert metrics.solver.sel(job=ids[0]) == "dip"

    summary = _open(real_store, "summary")
    assert summary["values"].dims == ("job", "field")
    assert dict(zip(summary.field.values, summary.field_units.values))["runtime_s"] == "s"
    assert np.isfinite(summary["values"].sel(field="peak_psnr").values).all()

    group = root.attrs["image_groups"][0]
    images = _open(real_store, f"images/{group}")
    assert images.final.dims == ("job", "channel", "y", "x") and sorted(images.job.values) == sorted(ids)
    assert np.isfinite(images.final.values).all()

    compact = _open(real_store, "aggregate/compact")
    assert compact.metrics.dims == ("job", "metric", "step") and list(compact.job.values) == ids
    stats = _open(real_store, "aggregate/stats")
    assert "psnr_mean" in stats and stats.sizes["step"] == 20


def test_open_datatree_shows_the_whole_store(real_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(real_store, engine="zarr")
    groups = set(tree.groups)
    assert {"/jobs", "/metrics", "/summary", "/images", "/aggregate/compact", "/aggregate/stats"} <= groups
    assert tree["metrics"]["values"].sizes["job"] == 2
    assert tree.attrs["layout_version"] == st.LAYOUT_VERSION


def test_open_results_round_trips_through_netcdf(fabricated, tmp_path):
    ds = pipeline.open_results(fabricated.path).compute()
    assert ds.psnr.attrs["units"] == "dB" and ds.job_runtime_s.attrs["units"] == "s"
    ds.to_netcdf(tmp_path / "results.nc", engine="h5netcdf")
    with xr.open_dataset(tmp_path / "results.nc", engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), ds)
    assert list(ds.status.values[[3, 5]]) == ["failed", "pending"]


def test_metric_definitions_of_the_cohorts_tasks_are_in_the_store(fabricated):
    """What psnr / ssim mean (mask, data range, convention) travels with the numbers, per task of
    the cohort: on the metrics group (xarray.open_zarr) and on open_results' Dataset."""
    import json

    from recon.tasks import metric_definition

    expected = {task: metric_definition(task) for task in ("denoise", "mri")}   # the fabricated cohort's
    assert "data range = the reference magnitude's maximum" in expected["mri"]
    assert json.loads(_open(fabricated.path, "metrics").attrs["metric_definitions"]) == expected
    assert json.loads(pipeline.open_results(fabricated.path).attrs["metric_definitions"]) == expected


def test_a_moved_store_still_finds_its_logs_and_manifest(real_store, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(real_store.parent, moved)   # the store and its work directory, moved together
    store = moved / real_store.name
    table = st.ledger_table(store)
    for path in table["log_path"]:
        assert path.startswith(str(moved)) and "start job" in open(path).read()
    root = st.open_store(store)
    assert not root.attrs["manifest_path"].startswith("/")
    assert pipeline.open_results(store).attrs["manifest_path"].startswith(str(moved.parent))
