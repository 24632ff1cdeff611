"""Contract of every task: unit-norm operator, exact adjoint, determinism, independence across scans."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.operators import LinearOperator, dot_product_test
from recon.tasks import TASKS, check_params, from_measurements, get_task, metric_definition, simulate

torch.set_num_threads(1)

TASK_NAMES = list(TASKS)


def _image(size: int, task: str = "") -> np.ndarray:
    """camera; for CT the Shepp-Logan phantom, whose attenuation leaves photons on every ray at
    LoDoPaB-CT's scaling (camera's bright half-image would starve rays of photons at 32 px)."""
    from skimage.data import camera, shepp_logan_phantom
    from skimage.transform import resize

    image = shepp_logan_phantom() if task == "ct" else camera()
    return resize(image, (size, size), anti_aliasing=True).astype(np.float32)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("task", TASK_NAMES)
def test_operator_has_unit_norm_and_exact_adjoint(task, size):
    p = simulate(task, _image(size), {}, seed=0)
    assert isinstance(p.operator, LinearOperator)
    # an independent power iteration (another start vector) than the one that normalised it
    assert p.operator.norm(seed=5) == pytest.approx(1.0, rel=0.02)
    assert dot_product_test(p.operator, seed=1) <= 1e-4
    physical = p.physical_measurements()
    assert torch.allclose(physical, p.measurement_scale * p.measurements)


def test_ct_scale_is_the_ray_transforms_norm():
    """||A||^2 ~ 513 at 32 px / 18 views and ~1029 at 64 px (issue 7); FBP uses the physical sinogram."""
    from recon.operators import RayTransform

    p32 = simulate("ct", _image(32), {"views": 18}, seed=0)
    p64 = simulate("ct", _image(64), {"views": 18}, seed=0)
    assert p32.measurement_scale ** 2 == pytest.approx(513, rel=0.05)
    assert p64.measurement_scale ** 2 == pytest.approx(1029, rel=0.05)
    physical = RayTransform(32, views=18)
    torch.testing.assert_close(p32.physical_measurements(), physical(p32.ground_truth), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(p32.fbp_image(), physical.fbp(physical(p32.ground_truth)), rtol=1e-4, atol=1e-5)
    # the paper's network input again: A^H y with the unit-norm A (FBP stays an option)
    torch.testing.assert_close(p32.initial_image("auto"), p32.operator.adjoint(p32.measurements))
    assert not torch.allclose(p32.initial_image("auto"), p32.initial_image("fbp"))


def test_sr_scale_and_degraded_image_stay_physical():
    p = simulate("sr", _image(32), {"factor": 4, "sigma": 0}, seed=0)
    assert p.measurement_scale == pytest.approx(0.25, rel=0.05)  # ||A|| = 1/f for a kernel of sum 1
    # the low-resolution image itself is on the image scale
    assert float(p.physical_measurements().mean()) == pytest.approx(float(p.ground_truth.mean()), rel=0.02)


def test_ct_is_scored_inside_the_disc_with_the_references_range():
    from recon.metrics import psnr

    p = simulate("ct", _image(32), {"views": 18}, seed=0)
    fbp = p.fbp_image()
    scores = p.score(fbp)
    assert set(scores) == {"psnr", "ssim", "psnr_full", "ssim_full"}
    disc = p.metric_mask
    ref = p.ground_truth[0, 0]
    assert p.data_range == pytest.approx(float(ref[disc].max()))
    mse = float(((fbp[0, 0] - ref)[disc].double() ** 2).mean())
    assert float(scores["psnr"]) == pytest.approx(10 * np.log10(p.data_range ** 2 / mse))
    assert float(scores["psnr_full"]) == pytest.approx(float(psnr(fbp, p.ground_truth, p.data_range)))
    assert float(scores["psnr_full"]) > float(scores["psnr"])  # zeros outside the disc match exactly


@pytest.mark.parametrize("task", ["denoise", "mri"])
def test_unmasked_tasks_score_the_whole_frame(task):
    p = simulate(task, _image(32), {}, seed=0)
    assert set(p.score(p.initial_image("auto"))) == {"psnr", "ssim"}


# ------------------------------------------------------------------------ randomness per scan
NOISY = {
    "denoise": {"sigma": 25},
    "inpaint": {"missing": 0.5, "sigma": 5},
    "deblur": {"sigma": 5},
    "sr": {"factor": 2, "sigma": 5},
    "mri": {"preset": "noisy", "mask": "random"},
    "ct": {"preset": "low-dose", "views": 8},
}


def _noise(p) -> torch.Tensor:
    r = p.measurements - p.operator(p.ground_truth)
    return torch.view_as_real(r).flatten() if r.is_complex() else r.flatten()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_two_scans_never_share_a_draw_and_a_scan_reproduces(task):
    from recon.rng import measurement_seed

    image = _image(32, task)
    a = simulate(task, image, NOISY[task], seed=measurement_seed("scan-a", 0))
    again = simulate(task, image, NOISY[task], seed=measurement_seed("scan-a", 0))
    b = simulate(task, image, NOISY[task], seed=measurement_seed("scan-b", 0))
    assert torch.equal(a.measurements, again.measurements)  # the same (scan, seed): bit for bit
    # same image, other scan id: the noise fields are uncorrelated (|corr| ~ 1/sqrt(n) ~ 0.03)
    assert abs(_corr(_noise(a), _noise(b))) < 0.15
    assert _corr(_noise(a), _noise(again)) == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["inpaint", "mri"])
def test_random_masks_differ_between_scans(task):
    from recon.rng import measurement_seed

    image = _image(32)
    masks = [simulate(task, image, NOISY[task], seed=measurement_seed(s, 0)).operator.mask for s in ("a", "b")]
    assert not torch.equal(masks[0], masks[1])


def _coil_maps(p) -> torch.Tensor:
    return getattr(p.operator, "base", p.operator).sens[0]


def test_simulated_coil_maps_are_drawn_per_scan():
    """Birdcage maps from (scan id, seed): another scan gets another coil geometry, the same scan
    the same maps bit for bit; still sum |S|^2 = 1 per pixel, and ||A|| = 1 within 2 %."""
    from recon.rng import measurement_seed

    image = _image(32)
    a, again, b = (simulate("mri", image, {}, seed=measurement_seed(s, 0)) for s in ("scan-a", "scan-a", "scan-b"))
    assert torch.equal(_coil_maps(a), _coil_maps(again))
    assert a.meta["coil_draw"] == again.meta["coil_draw"] != b.meta["coil_draw"]
    assert float((_coil_maps(a).abs() - _coil_maps(b).abs()).abs().max()) > 0.05
    for p in (a, b):
        torch.testing.assert_close(_coil_maps(p).abs().pow(2).sum(0), torch.ones(32, 32), rtol=1e-5, atol=1e-5)
        assert p.operator.norm(seed=5) == pytest.approx(1.0, rel=0.02)


def test_build_problem_draws_per_scan_id():
    """Two manifest rows with the same image and job seed get independent noise (issue 7: the
    camera/moon/coins noise fields of one cohort correlated at 1.0)."""
    from pipeline.jobs import ScanSpec
    from pipeline.scans import build_problem

    def spec(scan_id):
        return ScanSpec(id=scan_id, source="skimage:camera", task="denoise", task_params={"sigma": 25}, size=32)

    a, b, a2 = build_problem(spec("a"), 0), build_problem(spec("b"), 0), build_problem(spec("a"), 0)
    assert torch.equal(a.measurements, a2.measurements)
    assert abs(_corr(_noise(a), _noise(b))) < 0.15


def test_derive_seed_is_stable_across_processes():
    import subprocess
    import sys

    from recon.rng import derive_seed, measurement_seed, solver_seed

    code = "from recon.rng import derive_seed; print(derive_seed('scan-a', 3))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout.strip() for h in (1, 2)}
    assert outs == {str(derive_seed("scan-a", 3))}
    assert len({derive_seed("scan-a", 3), derive_seed("scan-a", 4), derive_seed("scan-b", 3)}) == 3
    assert measurement_seed("a", 0) != solver_seed("a", 0)
    with pytest.raises(ValueError, match="seed"):
        derive_seed("a", -1)


# ------------------------------------------------------------------------------ noise presets
def test_ct_low_dose_is_poisson_at_lodopab_photons():
    from recon.operators.ct import LODOPAB_PHOTONS

    p = simulate("ct", _image(32, "ct"), {"preset": "low-dose"}, seed=0)
    assert p.meta["photons"] == LODOPAB_PHOTONS == 4096
    clean = p.operator(p.ground_truth) * p.measurement_scale  # physical line integrals (pixel units)
    y = p.physical_measurements()
    c = p.meta["params"]["attenuation"] / 32
    # post-log Poisson: var(c y) ~ 1 / (I0 exp(-c A x)); standardised residuals have unit std
    z = (y - clean) * c * torch.sqrt(LODOPAB_PHOTONS * torch.exp(-c * clean))
    assert float(z.std()) == pytest.approx(1.0, abs=0.1)
    free = simulate("ct", _image(32), {}, seed=0)
    assert free.meta["params"]["preset"] == "noise-free" and free.meta["photons"] is None
    torch.testing.assert_close(free.measurements, free.operator(free.ground_truth))


def test_mri_noisy_preset_has_its_stated_snr():
    p = simulate("mri", _image(64), {"preset": "noisy"}, seed=0)  # ~4,000 samples: +-0.07 dB
    clean = p.operator(p.ground_truth)
    noise = p.measurements - clean
    snr = 10 * np.log10(float((clean.abs() ** 2).sum()) / float((noise.abs() ** 2).sum()))
    assert p.meta["snr_db"] == 30.0
    assert snr == pytest.approx(30.0, abs=0.25)
    free = simulate("mri", _image(32), {}, seed=0)
    torch.testing.assert_close(free.measurements, free.operator(free.ground_truth))


@pytest.mark.parametrize("task,params,match", [
    ("ct", {"preset": "loud"}, "preset"),
    ("mri", {"preset": "low-dose"}, "preset"),
    ("ct", {"preset": "noise-free", "photons": 1e4}, "photons"),
    ("mri", {"noise": 0.01, "snr_db": 20}, "snr_db"),
])
def test_bad_presets_name_the_parameter(task, params, match):
    with pytest.raises(ValueError, match=match):
        simulate(task, _image(32), params, seed=0)


# ----------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_states_its_metrics_input_and_degraded_image(task):
    t = get_task(task)
    assert len(metric_definition(task)) > 40 and "data range" in metric_definition(task)
    p = simulate(task, _image(32, task), {}, seed=0)
    assert p.default_input == t.default_input
    auto = p.initial_image("auto")
    assert auto.shape == p.image_shape and torch.isfinite(auto).all()
    if task in ("mri", "ct", "sr"):  # the aSeqDIP paper's z0 = A^H y (sr: y is not image-shaped)
        torch.testing.assert_close(auto, p.operator.adjoint(p.measurements))
    else:
        torch.testing.assert_close(auto, p.measurements)
    shown = get_task(task).degraded_image(p)
    assert tuple(shown.shape) == (1, 1, 32, 32) and torch.isfinite(shown).all()
    # the degraded image is on the image's scale (FBP, zero-filled, upsampled low-res, y itself)
    assert float(shown.mean()) == pytest.approx(float(p.display(p.ground_truth).mean()), rel=0.35)
    assert set(p.score(p.ground_truth)) >= {"psnr", "ssim"}
    assert float(p.score(p.ground_truth, with_ssim=True)["ssim"]) == pytest.approx(1.0)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_same_seed_same_problem(task):
    a = simulate(task, _image(32, task), NOISY[task], seed=3)
    b = simulate(task, _image(32, task), NOISY[task], seed=3)
    assert torch.equal(a.measurements, b.measurements) and a.measurement_scale == b.measurement_scale
    assert not torch.equal(a.measurements, simulate(task, _image(32, task), NOISY[task], seed=4).measurements)


@pytest.mark.parametrize("task,kind,params,match", [
    ("denoise", "simulate", {"sigma": -1}, "'sigma'"),
    ("denoise", "simulate", {"sigmaa": 1}, "sigmaa"),
    ("inpaint", "simulate", {"hole_ratio": 1.5}, "'hole_ratio'"),
    ("deblur", "simulate", {"kernel_size": 4}, "'kernel_size'"),
    ("deblur", "simulate", {"nonlinear": "yes"}, "'nonlinear'"),
    ("sr", "simulate", {"factor": 1}, "'factor'"),
    ("mri", "simulate", {"acceleration": 0.5}, "'acceleration'"),
    ("mri", "simulate", {"mask": "spiral"}, "'mask'"),
    ("ct", "simulate", {"views": 0}, "'views'"),
    ("ct", "simulate", {"filter": "gauss"}, "'filter'"),
    ("ct", "measured", {"pixel_size": 0}, "'pixel_size'"),
    ("ct", "measured", {"angles": ["a"]}, "'angles'"),
    ("mri", "measured", {"sensitivities": "magic"}, "'sensitivities'"),
    ("denoise", "measured", {}, "cannot use measured data"),
])
def test_check_params_names_the_bad_parameter_without_building(task, kind, params, match, monkeypatch):
    monkeypatch.setattr(get_task(task), "build", None)  # nothing may be built
    with pytest.raises(ValueError, match=match):
        check_params(task, params, kind)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_check_params_gives_the_parameters_in_force(task):
    p = check_params(task, {}, "simulate")
    assert set(p) == set(get_task(task).defaults)
    assert simulate(task, _image(32, task), {}, seed=0).meta["params"] == p


def test_cli_options_belong_to_their_tasks():
    from recon.tasks import cli_options

    options = cli_options()
    assert options["sigma"][1] == ("denoise", "inpaint", "deblur", "sr")
    assert options["preset"][1] == ("mri", "ct")
    for name, (_, tasks) in options.items():
        for task in tasks:
            assert name in get_task(task).defaults, (name, task)


def test_measured_ct_sinogram_keeps_its_physical_scale():
    sim = simulate("ct", _image(32, "ct"), {"views": 12}, seed=0)
    sino = sim.physical_measurements()[0, 0].numpy()
    p = from_measurements("ct", sino, {}, reference=sim.ground_truth[0, 0].numpy())
    assert p.measurement_scale == pytest.approx(sim.measurement_scale)
    torch.testing.assert_close(p.fbp_image(), sim.fbp_image())
    assert p.metric_mask is not None and p.data_range == pytest.approx(sim.data_range)
