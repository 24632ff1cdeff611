"""Reports and the aggregate / report / demo commands, on a fabricated store and a real tiny run."""
from __future__ import annotations

import csv
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import pipeline
import store_factory as sf
from pipeline import report as rp
from dipcohort.cli import main
from pipeline.errors import UsageError
from dipcohort.commands import demo

TINY = """\
cohort: tiny
steps: 8
seeds: [0]
size: 16
metrics: {ssim_every: 4}
scans:
  - {id: cam, source: "skimage:camera", task: denoise, params: {sigma: 25}}
solvers:
  - {name: dip, params: {network: skip-small}}
  - {name: aseqdip, params: {network: skip-small}}
"""


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    return sf.fabricate_store(tmp_path_factory.mktemp("rep") / "res.zarr", statuses={1: "failed", 6: "diverged"},
                              n_scans=2, seeds=(0, 1))


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(path).ndim == 3


def test_report_writes_table_plots_and_montage(fab, tmp_path, capsys):
    out = tmp_path / "report"
    paths = rp.report(fab.path, out)                         # aggregates first: there is no aggregate yet
    printed = capsys.readouterr().out
    assert "aggregating" in printed and "no aggregate yet" in printed
    agg = pipeline.open_aggregate(fab.path)
    assert sorted(p.name for p in out.iterdir()) == ["curves_denoise.png", "curves_mri.png", "index.html",
                                                      "montage.png", "table.csv", "table.md"]
    assert all(is_png(p) for p in [*paths["curves"], paths["montage"]])
    # montage: 2 scans per task → 4 rows of GT, degraded and 3 solver configs
    h, w = mpimg.imread(paths["montage"]).shape[:2]
    assert h > w / 2.5
    with paths["table_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == list(agg.label.values)
    for r, g in zip(rows, range(agg.sizes["group"])):
        a = agg.isel(group=g)
        assert float(r["final_psnr_mean"]) == pytest.approx(float(a.final_psnr_mean))
        assert float(r["peak_ssim_std"]) == pytest.approx(float(a.peak_ssim_std))
        assert int(r["n_counted"]) == int(a.n_done + a.n_diverged)
    md = paths["table_md"].read_text().splitlines()
    assert md[0].startswith("| Task | Solver | Jobs | Peak PSNR") and len(md) == 2 + agg.sizes["group"]
    dip = agg.sel(group="denoise/dip")
    cell = f"{float(dip.final_psnr_mean):.2f} ± {float(dip.final_psnr_std):.2f}"
    assert cell in md[2] and cell in printed
    assert "aseqdip lambda=0.5" in printed and "Onset step" in printed


def test_table_formatting():
    assert rp.fmt(28.584, 0.4321, 2) == "28.58 ± 0.43"
    assert rp.fmt(float("nan"), 1.0, 2) == "–"
    assert rp.fmt(0.79, float("nan"), 3) == "0.790"


def test_report_command_with_chosen_scans(fab, tmp_path, capsys):
    assert main(["report", str(fab.path), "--out", str(tmp_path / "r"), "--scans", "mri001"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "montage.png" in out
    h, w = mpimg.imread(tmp_path / "r" / "montage.png").shape[:2]
    assert w > 3 * h, "one scan: one row of 5 panels"
    with pytest.raises(KeyError, match="no scan 'nope'"):
        rp.report(fab.path, tmp_path / "r", scans=["nope"])
    assert main(["report", str(fab.path), "--out", str(tmp_path / "r"), "--scans", "nope"]) == 2
    assert "no scan 'nope'" in capsys.readouterr().err


def test_aggregate_command(fab, tmp_path, capsys):
    path = tmp_path / "copy.zarr"
    shutil.copytree(fab.path, path)
    assert main(["aggregate", str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}/aggregate" in out and "in 6 task × solver groups over 120 steps" in out
    assert "Final PSNR" in out and "aseqdip lambda=1.0" in out
    assert main(["aggregate", str(tmp_path)]) == 2
    assert "not a dipcohort results store" in capsys.readouterr().err
    assert main(["aggregate", str(path), "--workers", "0"]) == 2


def test_demo_manifest_lookup(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO", demo.DEMO.parent / "no-such-demo.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no-such-demo.yaml was not found"):
        demo.demo_manifest()
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "no-such-demo.yaml").write_text(TINY)
    assert demo.demo_manifest() == tmp_path / "manifests" / "no-such-demo.yaml"   # found beside the cwd


def test_demo_runs_a_real_cohort_end_to_end_and_resumes(tmp_path, capsys):
    """`dipcohort demo` on a tiny manifest: run (real solvers), aggregate, report; then resume."""
    torch.set_num_threads(1)
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--manifest", str(manifest)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 jobs to run" in printed and "Final PSNR" in printed
    store = out / "demo.zarr"
    assert sorted(p.name for p in (out / "report").iterdir()) == ["curves_denoise.png", "index.html", "montage.png",
                                                                  "table.csv", "table.md"]
    ds = pipeline.open_results(store)
    assert ds.attrs["read_from"] == "compact" and ds.attrs["cohort"] == "tiny"
    assert list(ds.status.values) == ["done", "done"] and set(ds.solver.values) == {"dip", "aseqdip"}
    psnr = ds.psnr.values
    assert psnr.shape == (2, 8) and np.isfinite(psnr).all()
    np.testing.assert_allclose(ds.peak_psnr.values, psnr.max(axis=1), rtol=1e-6)   # the worker's own summary
    assert np.isfinite(ds.ssim.values[:, [0, 4, 7]]).all() and np.isnan(ds.ssim.values[:, 1]).all()
    agg = pipeline.open_aggregate(store)
    np.testing.assert_allclose(agg.sel(group="denoise/dip").psnr_mean.values,
                               ds.psnr.sel(job=ds.job[ds.solver == "dip"]).values[0], rtol=1e-6)
    image = pipeline.load_image(store, str(ds.job.values[0]))
    assert image.shape == (1, 16, 16) and np.isfinite(image.values).all()
    # again: nothing left to run, the report is rewritten
    assert main(["demo", "--out", str(out), "--manifest", str(manifest)]) == 0
    assert "0 of 2 jobs to run" in capsys.readouterr().out
