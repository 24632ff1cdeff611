"""Quality checks on the CPU, at the papers' settings where a test's budget allows.

The papers' settings: Adam lr 1e-4 (the CT chapter's code for every method; aSeqDIP paper
Sec. 4.1), aSeqDIP N = 2 and lambda = 1, on the shared U-Net (here `unet-small`, the chapter's
U-Net at CPU scale). The papers run 4,000-10,000 steps on 256-512 px images; these run 32-64 px
and a few hundred steps, so they check what holds at that scale, not the papers' numbers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from skimage import data, transform

from recon.tasks import simulate
from recon.solvers import run_solver

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[1] / "manifests" / "demo.yaml"


def image(name: str, size: int):
    src = data.shepp_logan_phantom() if name == "shepp" else getattr(data, name)()
    if src.ndim == 3:
        src = src[..., :3].mean(axis=-1)
    return transform.resize(src / src.max(), (size, size), anti_aliasing=True).clip(0.0, 1.0)


def quality(problem, image) -> float:
    """PSNR as the loop scores it (CT: inside the reconstruction disc)."""
    return float(problem.score(image, with_ssim=False)["psnr"])


def run(name, problem, steps, **params):
    return run_solver(name, problem, steps=steps, params={"network": "unet-small", **params}, seed=0,
                      device="cpu", ssim_every=0)


# ---- at the papers' settings ---------------------------------------------------------------------
def test_dip_denoises_sigma25_at_the_papers_lr():
    problem = simulate("denoise", image("camera", 32), {"sigma": 25}, seed=0)
    noisy = quality(problem, problem.measurements)
    res = run("dip", problem, 150)   # measured: peak 25.5 dB at step 76, noisy 20.3 dB
    assert res.peak_psnr >= noisy + 4.0, (res.peak_psnr, noisy)
    assert 20 <= res.peak_step < 150


def test_aseqdip_denoises_sigma25_at_the_papers_settings():
    """lr 1e-4, N = 2, lambda = 1 (Sec. 4.1). Measured at 32 px: peak 26.2 dB at step 145, 24.7 dB
    after 300 steps (noisy 20.3): it ends well above the noisy image, but 1.4 dB below its peak,
    not within the 0.5 dB of the paper's Fig. 4 (which runs 512 px images)."""
    problem = simulate("denoise", image("camera", 32), {"sigma": 25}, seed=0)
    noisy = quality(problem, problem.measurements)
    res = run("aseqdip", problem, 200)
    assert res.final_psnr >= noisy + 3.0, (res.final_psnr, noisy)
    assert res.peak_psnr - res.final_psnr < 2.0, (res.peak_psnr, res.final_psnr)


# ---- early stopping at the demo's scale ------------------------------------------------------------
def demo_es_runs():
    """The demo's ES-DIP on its denoising scans exactly as its jobs run them: the manifest's
    params, steps and size, the worker's problem (pipeline.scans.build_problem) and seeds."""
    from pipeline.manifest import load_manifest
    from pipeline.scans import build_problem
    from recon.rng import solver_seed

    manifest = load_manifest(DEMO)
    (config,) = [c for c in manifest.configs if c.solver == "es-dip"]
    for spec in (s for s in manifest.scans if s.task == "denoise"):
        for seed in manifest.seeds:
            yield spec.id, config.params, config.steps, build_problem(spec, seed), solver_seed(spec.id, seed)


@pytest.fixture(scope="module")
def demo_es_results():
    return {scan_id: (params, run_solver("es-dip", problem, steps=steps, params=params, seed=seed, device="cpu",
                                         ssim_every=0))
            for scan_id, params, steps, problem, seed in demo_es_runs()}


@pytest.mark.parametrize("scan_id", ["camera-denoise", "astronaut-denoise"])   # the demo's denoising scans
def test_es_dip_window_fills_before_the_peak_at_demo_scale(demo_es_results, scan_id):
    params, res = demo_es_results[scan_id]
    assert params["variance_window"] - 1 < res.peak_step, (params, res.peak_step)
    assert res.es_step >= 0


# The target: ES-DIP's early-stopped PSNR within 1 dB of the oracle peak on the demo's
# denoising scans, with settings chosen on tuning images only (docs/tuning.md, sweep 4): lr 1e-4 as
# every demo method, Wang et al.'s input jitter converted to this input (0.1155), ES-WMV W 5, p 100,
# delta 0.95 (tuned). Measured with the demo's jobs: camera peak 25.63 dB (step 257) / ES 25.05
# (step 272); astronaut 21.68 (286) / 21.67 (297). At lr 1e-4 the moving variance still falls over
# the whole run (sweep 4): ES holds because the jitter keeps the PSNR near its late peak, not
# because the variance has its minimum there; on the tuning runs it missed 1 dB on 2 of 14.
@pytest.mark.parametrize("scan_id", ["astronaut-denoise", "camera-denoise"])
def test_es_dip_stops_within_1db_of_the_peak_at_demo_scale(demo_es_results, scan_id):
    _, res = demo_es_results[scan_id]
    assert res.es_psnr >= res.peak_psnr - 1.0, (res.es_psnr, res.peak_psnr, res.es_step, res.peak_step)


# ---- CT and MRI: the budget does not allow the papers' lr ------------------------------------------
# At lr 1e-4 and 300 steps of unet-small (32 px) aSeqDIP is still far from fitted: CT 10.1 dB
# against FBP 28.0 (its sigmoid output starts at 0.5 everywhere, the zero region outside the disc
# included, scored on the full frame on this branch), MRI 14.5 dB against zero-filled 17.2 dB.
# These tests keep lambda = 1 and raise the lr and the block length so that a few hundred steps of
# the 2-scale `tiny` network reach the regime; with N = 2 the input z_k = f(z_{k-1}) moves on
# before the network has fitted it, so a short run keeps replacing a good input with a worse output.
# With the unit-norm ray transform (||A|| = 1), aSeqDIP's paper input z0 = A^H y and the disc
# scoring, CT at 64 px / 400 steps of `tiny` (measured): FBP 22.70 dB, A^H y 15.24 dB, aSeqDIP
# 17.58 dB (still rising at step 399), vanilla DIP 25.72 dB. So the paper's "aSeqDIP beats FBP"
# (Table 2: 34.88 vs 22.92) does not hold at this budget (nor at 4000 steps of unet-small,
# docs/aseqdip-investigation.md: 21.60 vs 21.86 dB); it is kept as a strict xfail, and what holds is tested.
def test_dip_beats_fbp_on_sparse_view_ct():
    problem = simulate("ct", image("shepp", 64), {"views": 18}, seed=0)
    res = run("dip", problem, 400, network="tiny", lr=2e-2)
    assert res.final_psnr > quality(problem, problem.fbp_image()) + 1.0


def test_aseqdip_improves_on_its_input_on_sparse_view_ct():
    problem = simulate("ct", image("shepp", 64), {"views": 18}, seed=0)
    res = run("aseqdip", problem, 400, network="tiny", lr=2e-2, inner_steps=20)
    assert res.final_psnr > quality(problem, problem.initial_image("auto")) + 2.0


@pytest.mark.xfail(strict=True, reason="the paper's aSeqDIP > FBP on CT 18 views does not reproduce at 64 px / "
                                       "400 steps (17.6 vs 22.7 dB measured)")
def test_aseqdip_beats_fbp_on_sparse_view_ct():
    problem = simulate("ct", image("shepp", 64), {"views": 18}, seed=0)
    fbp = quality(problem, problem.fbp_image())
    res = run("aseqdip", problem, 400, network="tiny", lr=2e-2, inner_steps=20)
    assert res.final_psnr > fbp + 1.0, (res.final_psnr, fbp)


def test_aseqdip_beats_zero_filled_mri():
    problem = simulate("mri", image("shepp", 64), {"acceleration": 4}, seed=0)
    zero_filled = quality(problem, problem.adjoint_image())
    res = run("aseqdip", problem, 400, network="tiny", lr=1e-2, inner_steps=5)
    assert res.final_psnr > zero_filled + 1.0, (res.final_psnr, zero_filled)


# ---- MRI 4x and Self-Guided DIP at the papers' settings --------------------------------------------
# unet-small, Adam lr 1e-4 for every method, aSeqDIP N = 2 and lambda = 1 (Sec. 4.1), Self-Guided
# lambda 1 (TUNED, docs/tuning.md), N_eta 4, gamma 0.99 (the chapter's code); 64 px, seed 0.
# Measured (PSNR dB after 50 / 100 / 200 / 400 steps; load average ~6 on 2 cores):
#   MRI 4x Shepp-Logan, zero-filled A^H y 18.90: aSeqDIP 9.68 / 12.47 / 15.37 / 16.67 (peak at step
#   381, still rising; 85 s for 400 steps), Self-Guided 16.07 / 16.74 / 17.56 / 18.26 (100 s),
#   vanilla DIP 12.08 / 14.35 / 15.41 / 16.36 (27 s).
#   Inpainting HIAR 0.25 camera, the masked image 12.40: Self-Guided 8.23 / 11.17 / 14.51 / 15.89 (47 s).
# At the papers' lr a few hundred steps do not fit the MRI image: every method is still below the
# zero-filled image, so the papers' "beats zero-filled" is a strict xfail; the larger-lr test above
# checks aSeqDIP's MRI behaviour once fitted.
def test_self_guided_improves_on_its_input_on_inpainting_at_the_papers_settings():
    problem = simulate("inpaint", image("camera", 64), {"hole_ratio": 0.25}, seed=0)
    masked = quality(problem, problem.initial_image("auto"))
    res = run("self-guided", problem, 200)   # measured: 14.51 dB against 12.40
    assert res.final_psnr > masked + 1.0, (res.final_psnr, masked)


@pytest.mark.xfail(strict=True, reason="at lr 1e-4 (aSeqDIP Sec. 4.1) 64 px MRI 4x is not fitted in a few hundred "
                                       "steps: aSeqDIP 15.37 dB after 200 steps, 16.67 after 400 (still rising), "
                                       "zero-filled 18.90 (measured)")
def test_aseqdip_beats_zero_filled_mri_at_the_papers_settings():
    problem = simulate("mri", image("shepp", 64), {"acceleration": 4}, seed=0)
    zero_filled = quality(problem, problem.adjoint_image())
    res = run("aseqdip", problem, 200)
    assert res.final_psnr > zero_filled, (res.final_psnr, zero_filled)


@pytest.mark.xfail(strict=True, reason="at lr 1e-4 Self-Guided DIP stays below its A^H y input on 64 px MRI 4x: "
                                       "17.56 dB after 200 steps, 18.26 after 400 (still rising), input 18.90 "
                                       "(measured)")
def test_self_guided_improves_on_its_input_on_mri_at_the_papers_settings():
    problem = simulate("mri", image("shepp", 64), {"acceleration": 4}, seed=0)
    zero_filled = quality(problem, problem.initial_image("auto"))
    res = run("self-guided", problem, 200)
    assert res.final_psnr > zero_filled, (res.final_psnr, zero_filled)
