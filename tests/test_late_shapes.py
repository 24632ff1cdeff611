"""Retrying a scan whose image shape is new (its file was missing or broken when the store was
made, then fixed at another size): the driver places its jobs in a new image group, created
late without resizing or rewriting any array that other workers may be writing."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import xarray as xr

import pipeline
from dipcohort.cli import main
from pipeline import store as st

MANIFEST = """
cohort: late
steps: 20
seeds: [0]
metrics: {ssim_every: 10}
scans:
  - {id: cam, source: "skimage:camera", task: denoise, size: 32, params: {sigma: 25}}
  - {id: file, source: img.npy, task: denoise, params: {sigma: 25}}
solvers:
  - {name: dip, params: {network: tiny}}
"""


def _image(path: Path, size: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size]
    np.save(path, (0.5 + 0.4 * np.sin(xx / 4) * np.cos(yy / 5)).astype(np.float32))


def _run(*args) -> int:
    return main(["run", *map(str, args), "--device", "cpu", "--progress", "quiet"])   # threads: the jobs' cpus


def test_retry_failed_places_a_new_shape_in_a_late_group(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(textwrap.dedent(MANIFEST))
    out = tmp_path / "res.zarr"
    assert _run(manifest, "--out", out, "--allow-missing") == 1  # img.npy missing: its job fails
    assert sorted(st.ledger_table(out)["status"]) == ["done", "failed"]
    _image(tmp_path / "img.npy", 40)                            # fixed, at a size no group has
    capsys.readouterr()
    assert _run(manifest, "--out", out, "--retry-failed") == 0
    assert "1 of 2 jobs to run" in capsys.readouterr().out
    table = st.ledger_table(out)
    assert list(table["status"]) == ["done", "done"] and list(table["attempts"]) == [1, 1]
    root = st.open_store(out)
    assert root.attrs["image_groups"] == ["c1_32x32", "c1_40x40_d1_late1"]
    late = xr.open_zarr(out, group="images/c1_40x40_d1_late1")
    assert late.final.shape == (1, 1, 40, 40) and np.isfinite(late.final.values).all()
    assert late.scan_id.values.tolist() == ["file"]
    image = pipeline.load_image(out, table["job_id"][table["scan_id"] == "file"].item())
    assert image.shape == (1, 40, 40)


def test_late_placement_never_changes_arrays_in_use(tmp_path):
    """Existing arrays keep their metadata and chunks; only the two one-chunk coordinate arrays
    of `jobs`, the root's metadata and the new group change."""
    import store_factory as sf

    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={1: "failed"})
    before = {p.relative_to(fab.path).as_posix(): p.read_bytes() for p in fab.path.rglob("*") if p.is_file()}
    job = fab.jobs[1]
    moved = st.place_late_jobs(fab.path, [job], {job.scan.id: st.ImageShape(1, 1, 24, 24)})[0]
    assert moved.image_group == "c1_24x24_d1_late1" and moved.image_index == 0
    after = {p.relative_to(fab.path).as_posix(): p.read_bytes() for p in fab.path.rglob("*") if p.is_file()}
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {"zarr.json", "jobs/image_group/c/0", "jobs/image_index/c/0",
                       f"images/{job.image_group}/job_index/c/0"}
    assert all(k.startswith("images/c1_24x24_d1_late1/") for k in set(after) - set(before))
    root = st.open_store(fab.path)
    assert st.stored_jobs(root)[job.job_id] == (1, moved.image_group, 0)
    assert root[f"images/{job.image_group}/job_index"][job.image_index] == -1   # no longer its row
    w = st.JobWriter(fab.path, moved)
    w.start("cpu")
    w.images(final=np.ones((1, 24, 24), np.float32))
    w.finish("done", 1.0)
    assert len(pipeline.open_images(fab.path)["c1_24x24_d1_late1"].job) == 1
    assert job.job_id not in pipeline.open_images(fab.path)[job.image_group].job.values
