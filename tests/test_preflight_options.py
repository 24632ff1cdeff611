"""Solver option values are refused before anything is written: each solver's Params validates
its own options (`SolverParams.validate`), the solver runs that check first and a manifest runs
it once per configuration when it is loaded, so `dipcohort run` / `--dry-run` exit 2 naming the
file, the solver entry, the option and what is allowed, and create nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dipcohort.cli import main
from pipeline.manifest import ManifestError, load_manifest
from recon.solvers import get_solver, solver_names
from recon.solvers.base import SolverParams, make_params
from sched_common import REPO, statuses, write_manifest

DIP = "  - {name: dip, params: {network: tiny}}"


def manifest_with(tmp_path: Path, *solvers: str, steps: int = 3) -> Path:
    """The tiny 32 px denoising cohort of sched_common, one seed, with these solver entries."""
    path = write_manifest(tmp_path / "m.yaml", steps=steps, seeds=(0,))
    path.write_text(path.read_text().replace(DIP, "\n".join(solvers)))
    return path


# (solver entry, text that must appear in the message: solver, option, value given, what is allowed)
BAD = [
    ("{name: es-dip, params: {network: tiny, es_variance: bogus}}",
     "solver 'es-dip' option es_variance: got 'bogus', expected one of 'wmv', 'emv'"),
    ("{name: dip, params: {network: tiny, input_distribution: laplace}}",
     "solver 'dip' option input_distribution: got 'laplace', expected one of 'gaussian', 'uniform'"),
    ("{name: dip-denoiser-admm, params: {network: tiny, denoiser: wiener}}",
     "solver 'dip-denoiser-admm' option denoiser: got 'wiener', expected one of 'tv', 'nlm', 'bm3d'"),
    ("{name: aseqdip, params: {network: tiny, N: -3}}",
     "solver 'aseqdip' option inner_steps (N): got -3, expected an integer >= 1"),
    ("{name: self-guided, params: {network: tiny, gamma: 1.5}}",
     "solver 'self-guided' option gamma (alpha): got 1.5, expected a number in [0, 1)"),
    ("{name: pnp-admm, params: {cg_tolerance: -0.001}}",
     "solver 'pnp-admm' option cg_tolerance: got -0.001, expected a number > 0"),
    ("{name: tv, params: {theta: 2}}", "solver 'tv' option theta: got 2.0, expected a number in [0, 1]"),
    ("{name: dip, params: {network: tiny, lr: fast}}", "params.lr: expected a number, got 'fast' (solver 'dip')"),
]


def check_refusal(err: str, manifest: Path, index: int, expected: str) -> None:
    assert str(manifest) in err and f"solvers[{index}]" in err and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("entry, expected", BAD[:4] + BAD[-1:])
def test_cli_refuses_a_bad_option_value_before_creating_the_store(tmp_path, entry, expected):
    m = manifest_with(tmp_path, DIP, f"  - {entry}")
    out = tmp_path / "out" / "s.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for extra in ([], ["--dry-run"]) if "es_variance" in entry else ([],):
        proc = subprocess.run([sys.executable, "-m", "dipcohort", "run", str(m), "--out", str(out), "--device",
                               "cpu", "--progress", "quiet", *extra], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        check_refusal(proc.stderr, m, 1, expected)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, expected", BAD)
def test_run_and_dry_run_refuse_every_bad_value(tmp_path, capsys, entry, expected):
    m = manifest_with(tmp_path, f"  - {entry}", DIP)
    out = tmp_path / "s.zarr"
    before = sorted(tmp_path.rglob("*"))
    for extra in ([], ["--dry-run"]):
        assert main(["run", str(m), "--out", str(out), "--device", "cpu", "--progress", "quiet", *extra]) == 2
        check_refusal(capsys.readouterr().err, m, 0, expected)
        assert sorted(tmp_path.rglob("*")) == before  # no store, no work folder, no lease


def test_a_grid_point_with_a_bad_value_is_named(tmp_path):
    m = manifest_with(tmp_path, "  - {name: es-dip, params: {network: tiny, es_variance: [wmv, emv, wnv]}}")
    with pytest.raises(ManifestError, match=r"solvers\[0\]\.params: solver 'es-dip' option es_variance: got 'wnv'"):
        load_manifest(m)


def test_valid_manifest_runs_and_a_bad_edit_keeps_its_store(tmp_path, capsys):
    """Valid non-default values pass and run; a later bad edit is refused with the store untouched."""
    good = ["  - {name: es-dip, params: {network: tiny, es_variance: emv, emv_alpha: 0.5, patience: 2}}",
            "  - {name: pnp-admm, params: {denoiser: tv, strength: 0.02, cg_iterations: 2}}",
            "  - {name: tv, params: {theta: 0.5}}"]
    m = manifest_with(tmp_path, *good)
    out = tmp_path / "s.zarr"
    assert main(["run", str(m), "--out", str(out), "--device", "cpu", "--progress", "quiet"]) == 0
    assert set(statuses(out).values()) == {"done"} and len(statuses(out)) == 6
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    m.write_text(m.read_text().replace("theta: 0.5", "theta: -1"))
    capsys.readouterr()
    assert main(["run", str(m), "--out", str(out), "--device", "cpu", "--progress", "quiet"]) == 2
    check_refusal(capsys.readouterr().err, m, 2, "solver 'tv' option theta: got -1.0, expected a number in [0, 1]")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p != m} == \
        {p: t for p, t in files.items() if p != m}


def test_values_are_checked_once_per_configuration_without_building_anything(tmp_path, monkeypatch):
    import recon.nets
    import pipeline.scans

    def refuse(*args, **kwargs):
        raise AssertionError("the option check must not build networks or load scans")
    monkeypatch.setattr(recon.nets, "build_network", refuse)
    monkeypatch.setattr(pipeline.scans, "load", refuse)
    calls = []
    real = SolverParams.validate
    monkeypatch.setattr(SolverParams, "validate", lambda self, solver: calls.append(solver) or real(self, solver))
    path = write_manifest(tmp_path / "m.yaml", steps=3, seeds=(0, 1, 2),
                          scans={"cam": "skimage:camera", "moon": "skimage:moon", "coins": "skimage:coins"})
    path.write_text(path.read_text().replace(DIP, "  - {name: dip, params: {network: tiny, lr: [0.01, 0.001]}}\n"
                                                  "  - {name: tv}"))
    manifest = load_manifest(path)
    assert len(manifest.jobs) == 3 * 3 * 3 and sorted(calls) == ["dip", "dip", "tv"]


@pytest.mark.parametrize("name", solver_names())
def test_every_solvers_defaults_pass_its_validation(name):
    cls = get_solver(name)
    cls.Params().validate(name)
    make_params(cls.Params, {}, solver=name)


@pytest.mark.parametrize("name", solver_names())
def test_every_solver_checks_the_shared_options(name):
    cls = get_solver(name)
    for option, value, allowed in [("es_variance", "bogus", "one of 'wmv', 'emv'"),
                                   ("patience", -1, "an integer >= 0"),
                                   ("ema_decay", 1.0, "a number in [0, 1)")]:
        with pytest.raises(ValueError, match=rf"^where: solver '{name}' option {option}: got .*, expected "
                                             + allowed.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            make_params(cls.Params, {option: value}, where="where", solver=name)


# one bad value of each solver's own options (the shared network options are covered by dip)
OWN = {
    "dip": {"input_channels": -1, "jitter": -0.1, "input": "zero", "input_noise_scale": 0},
    "es-dip": {"variance_window": 1, "emv_alpha": 1.0, "es_delta": 0},
    "tv-dip": {"alpha": -1, "tv_eps": 0},
    "tv-dip-hqs": {"denoiser": "nlm", "alpha_start": 0, "lambda": -1},
    "self-guided": {"n_eta": 0, "jitter": 0.1, "input": "noise", "lr_z": 0, "noise_fraction": -1},
    "aseqdip": {"lambda": -1, "input": "noise"},
    "dip-red": {"L": 1.0, "strength": 0, "inner_steps": 0},
    "dip-denoiser-hqs": {"alpha_end": -1, "denoiser": "drunet"},
    "dip-denoiser-admm": {"rho": -1, "strength": -0.1},
    "dip-admm": {"rho": 0, "denoiser": "wiener", "strength": 0},
    "deep-decoder": {"network": "tiny", "input": "auto"},
    "pnp-admm": {"rho": 0, "cg_iterations": 0, "denoiser": "nlmm"},
    "tv": {"alpha": -0.5, "theta": 1.5},
}


@pytest.mark.parametrize("name", solver_names())
def test_each_solver_refuses_bad_values_of_its_own_options(name):
    cls = get_solver(name)
    aliases = getattr(cls.Params, "ALIASES", {})
    for option, value in OWN.get(name, {}).items():
        field = aliases.get(option, option)
        with pytest.raises(ValueError, match=rf"solver '{name}' option {field}\b.*: got .*, expected "):
            make_params(cls.Params, {option: value}, solver=name)


def test_the_solver_runs_the_same_check_before_building_its_network(monkeypatch):
    """A Params built directly (not through a manifest) is refused by the solver, with the same text."""
    import recon.nets

    monkeypatch.setattr(recon.nets, "build_network", lambda *a, **k: pytest.fail("network built"))
    cls = get_solver("es-dip")
    with pytest.raises(ValueError) as direct:
        cls(None, cls.Params(network="tiny", es_variance="bogus"), seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError) as checked:
        make_params(cls.Params, {"es_variance": "bogus"}, where="w", solver="es-dip")
    assert str(checked.value) == f"w: {direct.value}"
    assert str(direct.value) == "solver 'es-dip' option es_variance: got 'bogus', expected one of 'wmv', 'emv'"
