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
                                                      "montage.png", "paired.csv", "table.csv", "table.md"]
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
    assert md[0].startswith("| Task | Solver | Jobs | Peak PSNR") and md[2 + agg.sizes["group"]] == ""
    dip = agg.sel(group="denoise/dip")
    cell = f"{float(dip.final_psnr_mean):.2f} ± {float(dip.final_psnr_std):.2f}"
    assert cell in md[2] and cell in printed
    assert "aseqdip lambda=0.5" in printed and "Onset step" in printed


def test_report_shows_seed_and_scan_spread_and_paired_differences(fab, tmp_path, capsys):
    from pipeline import compare

    paths = rp.report(fab.path, tmp_path / "r2")
    printed = capsys.readouterr().out
    agg = pipeline.open_aggregate(fab.path)
    paired = compare.open_paired(fab.path)
    md = paths["table_md"].read_text()
    # spread: one seed-std / scan-std cell per group, in table.md, table.csv and on the terminal
    mri = agg.sel(group="mri/dip")
    cell = f"| {float(mri.final_psnr_seed_std):.2f} / {float(mri.final_psnr_scan_std):.2f} |"
    assert "Final PSNR σ seeds/scans" in md.splitlines()[0] and cell in md and cell[2:-2] in printed
    # denoise/dip: job 1 failed, job 6 diverged (no final PSNR): no scan has two final PSNRs
    dip = agg.sel(group="denoise/dip")
    assert np.isnan(float(dip.final_psnr_seed_std)) and f"| – / {float(dip.final_psnr_scan_std):.2f} |" in md
    with paths["table_csv"].open() as fh:
        first = next(csv.DictReader(fh))
    assert float(first["final_psnr_scan_std"]) == pytest.approx(float(dip.final_psnr_scan_std))
    assert float(first["peak_psnr_seed_std"]) == pytest.approx(float(dip.peak_psnr_seed_std))
    assert int(first["n_seeds"]) == 2 and int(first["n_scans"]) == 2
    # paired: every pair × metric with pairs; the mark follows the interval
    with paths["paired_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    shown = {(r["task"], r["b"], r["a"], r["metric"]) for r in rows}
    # 6 pairs × final PSNR / SSIM, peak and ES PSNR; no EMA PSNR row: the fabricated jobs have none
    assert len(rows) == 6 * 4 and ("denoise", "aseqdip lambda=0.5", "dip", "final_psnr") in shown
    assert not any(r["metric"] == "ema_psnr" for r in rows)
    section = md.split("## Paired differences", 1)[1]
    for r in rows:
        one = paired.sel(pair=f"{r['task']}: {r['b']} vs {r['a']}", metric=r["metric"])
        assert int(r["n_pairs"]) == int(one.n_pairs) and float(r["ci_low"]) == pytest.approx(float(one.ci_low))
        assert (r["significant"] == "True") == (not float(r["ci_low"]) <= 0 <= float(r["ci_high"]))
    marks = [line for line in section.splitlines() if line.startswith("| denoise | aseqdip lambda=0.5 − dip")]
    assert len(marks) == 4
    for line in marks:
        cells = [c.strip() for c in line.strip("|").split("|")]
        low, high = (float(x) for x in cells[5].strip("[]").split(","))
        assert (cells[6] == "not significant") == (low <= 0 <= high) and cells[6] in ("", "not significant")
    assert "Mean difference" in printed and "aseqdip lambda=1.0 − aseqdip" in printed


def test_paired_rows_without_an_interval():
    values = {"n_pairs": [[1, 0]], "mean_diff": [[0.5, np.nan]], "ci_low": [[np.nan] * 2], "ci_high": [[np.nan] * 2],
              "std_diff": [[np.nan] * 2], "mean_a": [[20.0, np.nan]], "mean_b": [[20.5, np.nan]],
              "significant": [[False, False]]}
    import xarray as xr

    paired = xr.Dataset({k: (("pair", "metric"), np.array(v)) for k, v in values.items()},
                        coords={"pair": ["t: b vs a"], "metric": ["final_psnr", "final_ssim"], "task": ("pair", ["t"]),
                                "a": ("pair", ["a"]), "b": ("pair", ["b"]), "config_a": ("pair", ["ca"]),
                                "config_b": ("pair", ["cb"])})
    rows = rp.paired_rows(paired)
    assert [(r["Metric"], r["Pairs"], r["95 % interval"], r["Note"]) for r in rows] == [
        ("Final PSNR", "1", "–", "no interval (1 pair)")]


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
                                                                  "paired.csv",
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
