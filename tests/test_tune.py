"""`dipcohort tune`: a tiny Optuna search (3 trials, 32 px, tiny network) through the local and Ray backends.

Checked: trials are ordinary jobs in round stores; best.yaml records the search beside each value
and its value lies in the space and is the best trial's; rerunning continues (nothing reruns);
evaluation scans are refused as tuning scans unless --allow-overlap; bad --param is exit 2.
"""
from __future__ import annotations

import pytest
import yaml

import pipeline
from dipcohort.cli import main
from pipeline.errors import UsageError
from pipeline.tune import parse_param

MANIFEST = """
cohort: tune-test
steps: 12
size: 32
seeds: [0]
metrics: {ssim_every: 4}
scans:
  - {id: camera-eval, source: "skimage:camera", task: denoise, params: {sigma: 25}}
tuning_scans:
  - {id: coins-tune, source: "skimage:coins", task: denoise, params: {sigma: 25}}
  - {id: moon-tune, source: "skimage:moon", task: denoise, params: {sigma: 25}}
  - {id: camera-again, source: "skimage:camera", task: denoise, params: {sigma: 25}}
solvers:
  - {name: dip, params: {network: tiny}}
"""


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(MANIFEST)
    return path


def _tune(manifest, out, *extra):
    return main(["tune", str(manifest), "--out", str(out), "--param", "lr=0.001:0.1:log", "--trials", "3",
                 "--tune-scans", "coins-tune", "moon-tune", *extra])


def test_tiny_search_on_local_writes_best_with_its_search_and_resumes(manifest, tmp_path, capsys):
    out = tmp_path / "tune"
    assert _tune(manifest, out) == 0
    printed = capsys.readouterr().out
    assert "best of" in printed and "best.yaml" in printed
    best = (out / "best.yaml").read_text()
    snippet = yaml.safe_load(best)
    lr = snippet["solvers"][0]["params"]["lr"]
    assert 0.001 <= lr <= 0.1 and snippet["solvers"][0]["params"]["network"] == "tiny"
    assert "tuned: lr in [0.001, 0.1] log" in best and "tuning scans (not the study's evaluation scans): " \
        "coins-tune, moon-tune" in best and "objective: final_psnr" in best
    stores = sorted(out.glob("round-*.zarr"))
    assert stores, "trials ran as jobs in round stores"
    best_value, jobs = -1e9, 0
    for store in stores:
        ds = pipeline.open_results(store)
        assert set(ds.scan_id.values) == {"coins-tune", "moon-tune"}   # never the evaluation scan
        assert set(ds.status.values) == {"done"}
        jobs += ds.sizes["job"]
        if store.name.endswith("rung-2.zarr"):
            for config in set(ds.config.values):
                best_value = max(best_value, float(ds.final_psnr.where(ds.config == config).mean()))
    assert f"final_psnr {best_value:.2f}" in best                      # the best trial's own mean
    # rerun: the study is complete, nothing runs again
    assert _tune(manifest, out) == 0
    assert "round" not in capsys.readouterr().out.split("best of")[0]
    assert sum(pipeline.open_results(s).sizes["job"] for s in sorted(out.glob("round-*.zarr"))) == jobs


def test_evaluation_scans_are_refused_unless_allowed(manifest, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tune", str(manifest), "--out", str(out), "--param", "lr=0.001:0.1:log", "--trials", "1",
                 "--tune-scans", "camera-eval"]) == 2
    assert "evaluation scan(s) of the study" in capsys.readouterr().err
    # the same image under a tuning id is an overlap too
    assert main(["tune", str(manifest), "--out", str(out), "--param", "lr=0.001:0.1:log", "--trials", "1",
                 "--tune-scans", "camera-again"]) == 2
    assert "camera-again (= evaluation scan camera-eval)" in capsys.readouterr().err
    assert main(["tune", str(manifest), "--out", str(out), "--param", "lr=0.001:0.1:log", "--trials", "1",
                 "--tune-scans", "camera-again", "--allow-overlap", "--rungs", "1"]) == 0


@pytest.mark.parametrize("text", ["lr", "lr=1:0.1", "lr=0:1:log", "lr=a:b", "lr=1:2:cubic", "lr=3"])
def test_bad_param_is_a_usage_error(text):
    with pytest.raises(UsageError):
        parse_param(text)


def test_param_forms():
    p = parse_param("lambda=0.1:10:log")
    assert (p.low, p.high, p.log, p.integer) == (0.1, 10.0, True, False)
    assert parse_param("inner_steps=1:8:int").integer
    assert parse_param("network=tiny,skip-small").choices == ("tiny", "skip-small")


@pytest.mark.ray
def test_tiny_search_on_ray(manifest, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "tune-ray"
    assert _tune(manifest, out, "--backend", "ray", "--rungs", "1") == 0
    stores = sorted(out.glob("round-*.zarr"))
    assert len(stores) == 3 and all(set(pipeline.open_results(s).status.values) == {"done"} for s in stores)
    assert 0.001 <= yaml.safe_load((out / "best.yaml").read_text())["solvers"][0]["params"]["lr"] <= 0.1
