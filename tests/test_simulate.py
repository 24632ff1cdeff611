"""recon.tasks: deterministic problems per task, noise levels, masks, measured data, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recon.operators import (LinearOperator, MultiCoilMRI, RayTransform, SaturatedBlur, birdcage_sensitivities,
                             equispaced_mask, fft2c)
from recon.problem import Problem
from recon.tasks import degraded_image, from_measurements, get_task, simulate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    from skimage.data import camera
    from skimage.transform import resize

    return resize(camera(), (32, 32), anti_aliasing=True).astype(np.float32)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    from skimage.data import astronaut
    from skimage.transform import resize

    return resize(astronaut(), (32, 32), anti_aliasing=True).astype(np.float32)


# every task with measurement noise switched on, so seeds matter
NOISY = {
    "denoise": {"sigma": 25},
    "inpaint": {"missing": 0.5, "sigma": 5},
    "deblur": {"kernel": "motion", "sigma": 5},
    "sr": {"factor": 2, "sigma": 5},
    "mri": {"noise": 0.01, "mask": "random"},
    "ct": {"photons": 1e4, "views": 8},
}


@pytest.mark.parametrize("task", list(NOISY))
def test_same_seed_same_problem_different_seed_different_noise(task, gray):
    a = simulate(task, gray, NOISY[task], seed=7)
    b = simulate(task, gray, NOISY[task], seed=7)
    c = simulate(task, gray, NOISY[task], seed=8)
    assert torch.equal(a.measurements, b.measurements)
    assert torch.equal(a.ground_truth, b.ground_truth)
    assert not torch.equal(a.measurements, c.measurements)


EXPECTED_MEASUREMENT_SHAPES = {
    "denoise": (1, 1, 32, 32), "inpaint": (1, 1, 32, 32), "deblur": (1, 1, 32, 32),
    "sr": (1, 1, 16, 16), "mri": (1, 4, 32, 32), "ct": (1, 1, 8, 32),
}


@pytest.mark.parametrize("task", list(NOISY))
def test_shapes_channels_and_problem_fields(task, gray):
    p = simulate(task, gray, NOISY[task], seed=0)
    assert isinstance(p, Problem) and p.task == task
    assert tuple(p.measurements.shape) == EXPECTED_MEASUREMENT_SHAPES[task]
    channels = 2 if task == "mri" else 1
    assert p.image_shape == (1, channels, 32, 32) == tuple(p.ground_truth.shape)
    assert p.ground_truth.dtype == torch.float32
    assert p.measurements.is_complex() == (task == "mri")
    assert (p.fbp is not None) == (task == "ct")
    assert p.meta["task"] == task and p.meta["seed"] == 0 and p.meta["source"] == "simulated"
    json.dumps(p.meta)  # meta stays JSON-serialisable (stores write it as attributes)
    shown = degraded_image(p)
    assert tuple(shown.shape) == (1, 1, 32, 32)  # SR upsampled, MRI magnitude, CT FBP
    assert torch.isfinite(shown).all()


@pytest.mark.parametrize("task", ["denoise", "inpaint", "deblur", "sr"])
def test_rgb_restoration_has_three_channels(task, rgb):
    p = simulate(task, rgb, NOISY[task], seed=0)
    assert p.channels == 3 and p.ground_truth.shape == (1, 3, 32, 32)
    torch.testing.assert_close(p.ground_truth[0].permute(1, 2, 0), torch.from_numpy(rgb))


def test_denoise_noise_std_matches_sigma():
    image = np.full((64, 64), 0.5, dtype=np.float32)
    for sigma in (15, 25):
        p = simulate("denoise", image, {"sigma": sigma}, seed=1)
        noise = p.measurements - p.ground_truth
        assert float(noise.std()) == pytest.approx(sigma / 255, rel=0.05)
        assert abs(float(noise.mean())) < 0.1 * sigma / 255
        assert p.noise_sigma == pytest.approx(sigma / 255)
    assert get_task("denoise").defaults["sigma"] == 25


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_inpaint_hole_ratio(ratio, gray):
    p = simulate("inpaint", gray, {"hole_ratio": ratio}, seed=0)
    mask = p.operator.mask[0, 0]
    assert float(1 - mask.mean()) == pytest.approx(ratio, abs=0.01)
    assert mask[16, 16] == 0  # the hole is central
    observed = mask.bool()
    torch.testing.assert_close(p.measurements[0, 0][observed], p.ground_truth[0, 0][observed])
    assert float(p.measurements[0, 0][~observed].abs().max()) == 0.0


def test_inpaint_random_missing_fraction(gray):
    p = simulate("inpaint", gray, {"missing": 0.7}, seed=3)
    assert p.meta["missing_fraction"] == pytest.approx(0.7, abs=1e-3)
    q = simulate("inpaint", gray, {"missing": 0.7}, seed=4)
    assert not torch.equal(p.operator.mask, q.operator.mask)


def test_deblur_variants(gray):
    lin = simulate("deblur", gray, {"sigma": 0}, seed=0)
    assert isinstance(lin.operator, LinearOperator)
    torch.testing.assert_close(lin.measurements, lin.operator(lin.ground_truth))
    non = simulate("deblur", gray, {"nonlinear": True, "sigma": 0}, seed=0)
    assert isinstance(non.operator, SaturatedBlur) and not isinstance(non.operator, LinearOperator)
    assert float((non.measurements - lin.measurements).abs().max()) > 0.05
    torch.testing.assert_close(non.initial_image("adjoint"), non.measurements)  # y stands in for A^H y
    default = simulate("deblur", gray, {}, seed=0)
    assert default.meta["params"]["kernel_size"] == 19  # 2 ceil(3 sigma) + 1 with sigma 3
    assert default.noise_sigma == pytest.approx(0.025)


def test_sr_measurements_are_downsampled(gray):
    p = simulate("sr", gray, {"factor": 4, "sigma": 0}, seed=0)
    assert p.measurements.shape == (1, 1, 8, 8)
    torch.testing.assert_close(p.measurements, p.operator(p.ground_truth))
    assert p.initial_image("measurements").shape == (1, 1, 32, 32)  # falls back to A^T y


def test_mri_ground_truth_and_measurements(gray):
    p = simulate("mri", gray, {"coils": 4, "acceleration": 4}, seed=2)
    gt = p.ground_truth
    magnitude = p.display(gt)[0, 0]
    torch.testing.assert_close(magnitude, torch.from_numpy(gray), rtol=1e-5, atol=1e-5)
    assert float(gt[:, 1].abs().max()) > 0.01  # a non-trivial smooth phase
    assert p.data_range == pytest.approx(float(gray.max()), rel=1e-5)
    torch.testing.assert_close(p.measurements, p.operator(gt))  # noise-free default
    assert p.meta["acceleration_effective"] == pytest.approx(4, rel=0.15)
    single = simulate("mri", gray, {"coils": 1, "acceleration": 8, "noise": 0.02}, seed=2)
    assert single.measurements.shape == (1, 1, 32, 32) and single.noise_sigma == 0.02
    residual = single.measurements - single.operator(single.ground_truth)
    sampled = single.operator.mask[0, 0].bool()
    assert float(residual[..., ~sampled].abs().max()) == 0.0  # noise only where sampled
    assert float(residual[..., sampled].real.std()) == pytest.approx(0.02, rel=0.2)


def test_ct_problem(gray):
    p = simulate("ct", gray, {"views": 18}, seed=0)
    assert isinstance(p.operator.base, RayTransform) and p.operator.views == 18  # unit norm: A / ||A||
    torch.testing.assert_close(p.measurements, p.operator(p.ground_truth))  # noise-free by default
    assert float(p.ground_truth[0, 0, 0, 0]) == 0.0  # outside the field-of-view disc
    assert p.fbp_image().shape == (1, 1, 32, 32)
    noisy = simulate("ct", gray, {"views": 18, "photons": 1e3}, seed=0)
    assert noisy.noise_sigma is None and noisy.meta["photons"] == 1e3
    gauss = simulate("ct", gray, {"views": 18, "noise": 0.05}, seed=0)
    resid = gauss.measurements - gauss.operator(gauss.ground_truth)
    # noise_sigma is physical (pixel-unit line integrals): the unit-scale residual times ||A||
    assert float(resid.std()) * gauss.measurement_scale == pytest.approx(gauss.noise_sigma, rel=0.2)


BAD = [
    ("segment", {}, "unknown task"),
    ("denoise", {"sigam": 25}, "sigam"),
    ("denoise", {"sigma": -1}, "sigma"),
    ("inpaint", {"hole_ratio": 1.2}, "hole_ratio"),
    ("inpaint", {"hole_ratio": 0.0}, "hole_ratio"),
    ("inpaint", {"hole_ratio": 0.1, "missing": 0.5}, "not both"),
    ("inpaint", {"missing": 1.0}, "missing"),
    ("deblur", {"kernel": "box"}, "kernel"),
    ("deblur", {"kernel_size": 8}, "odd"),
    ("deblur", {"nonlinear": "yes"}, "nonlinear"),
    ("sr", {"factor": 3}, "divisible"),
    ("sr", {"factor": 1}, "factor"),
    ("mri", {"acceleration": 0.5}, "acceleration"),
    ("mri", {"mask": "radial"}, "mask"),
    ("mri", {"coils": 0}, "coils"),
    ("mri", {"center_fraction": 1.5}, "center_fraction"),
    ("ct", {"views": 0}, "views"),
    ("ct", {"photons": -5}, "photons"),
    ("ct", {"filter": "butterworth"}, "filter"),
]


@pytest.mark.parametrize("task,params,message", BAD)
def test_bad_parameters_raise_clear_errors(task, params, message, gray):
    with pytest.raises(ValueError, match=message):
        simulate(task, gray, params, seed=0)


def test_bad_images_raise_clear_errors(gray, rgb):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        simulate("denoise", gray * 3, {}, seed=0)
    with pytest.raises(ValueError, match="grayscale"):
        simulate("mri", rgb, {}, seed=0)
    with pytest.raises(ValueError, match="square"):
        simulate("ct", gray[:, :24], {}, seed=0)
    with pytest.raises(ValueError, match="shape"):
        simulate("denoise", gray[None], {}, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        simulate("denoise", np.full((16, 16), np.nan), {}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        simulate("denoise", gray, {}, seed=-1)


def test_accepts_uint8_and_tensors(gray):
    u8 = (gray * 255).round().astype(np.uint8)
    p = simulate("denoise", u8, {}, seed=0)
    assert float(p.ground_truth.max()) <= 1.0
    t = simulate("denoise", torch.from_numpy(gray)[None, None], {}, seed=0)
    torch.testing.assert_close(t.ground_truth[0, 0], torch.from_numpy(gray))


# ------------------------------------------------------------------------- measured data

def _fastmri_like(gray: np.ndarray, coils: int = 4) -> np.ndarray:
    h, w = gray.shape
    sens = birdcage_sensitivities(coils, h, w)
    return fft2c(torch.from_numpy(gray).to(torch.complex64)[None] * sens).numpy()


def test_measured_mri_fully_sampled_with_retrospective_mask(gray):
    kspace = _fastmri_like(gray)
    p = from_measurements("mri", kspace, {"acceleration": 4}, reference=gray, seed=1)
    assert isinstance(getattr(p.operator, "base", p.operator), MultiCoilMRI) and p.operator.coils == 4
    assert p.meta["acceleration_effective"] == pytest.approx(4, rel=0.15)
    # the reference (scaled to peak 1) is the ground truth's magnitude, with phase 0
    torch.testing.assert_close(p.display(p.ground_truth)[0, 0], torch.from_numpy(gray / gray.max()),
                               rtol=1e-5, atol=1e-5)
    assert float(p.ground_truth[:, 1].abs().max()) == 0.0
    assert p.data_range == pytest.approx(1.0)
    assert torch.equal(p.measurements, from_measurements("mri", kspace, {"acceleration": 4}, reference=gray,
                                                         seed=1).measurements)
    sens = p.operator.sens[0]
    torch.testing.assert_close(sens.abs().pow(2).sum(0), torch.ones(32, 32), rtol=1e-4, atol=1e-4)
    json.dumps(p.meta)


def test_measured_mri_infers_its_mask(gray):
    kspace = _fastmri_like(gray)
    mask = equispaced_mask(32, 4, center_fraction=0.16, seed=3)
    p = from_measurements("mri", kspace * mask.numpy(), {})
    assert torch.equal(p.operator.mask[0, 0, 0].bool(), mask)
    assert p.ground_truth is None  # undersampled, no reference
    assert p.adjoint_image().shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="already undersampled"):
        from_measurements("mri", kspace * mask.numpy(), {"acceleration": 4})


def test_measured_mri_fully_sampled_ground_truth_is_consistent(gray):
    """Without a reference, fully sampled data give the coil-combined image as ground truth."""
    p = from_measurements("mri", _fastmri_like(gray), {"acceleration": None})  # kept fully sampled
    assert p.meta["ground_truth"] == "coil-combined fully sampled image"
    magnitude = p.display(p.ground_truth)[0, 0]
    assert float(magnitude.max()) == pytest.approx(1.0) == pytest.approx(p.data_range)
    target = torch.from_numpy(gray / gray.max())
    assert float((magnitude - target).norm() / target.norm()) < 0.1
    # A x_gt reproduces the data up to the error of the calibration-estimated coil maps
    residual = p.operator(p.ground_truth) - p.measurements
    assert float(residual.abs().norm() / p.measurements.abs().norm()) < 0.15


def test_measured_single_coil_and_scan_objects(gray):
    k = fft2c(torch.from_numpy(gray).to(torch.complex64)).numpy()
    p = from_measurements("mri", k, {}, reference=gray)
    assert p.operator.coils == 1

    class Scan:  # pipeline.io.ScanData-like
        kspace = _fastmri_like(gray)
        reference = gray

    q = from_measurements("mri", Scan(), {"acceleration": 8}, seed=0)
    assert q.meta["ground_truth"] == "reference magnitude (phase 0)"


def test_measured_mri_errors(gray):
    with pytest.raises(ValueError, match="complex"):
        from_measurements("mri", gray, {})
    with pytest.raises(ValueError, match="reference"):
        from_measurements("mri", _fastmri_like(gray), {}, reference=gray[:16])
    with pytest.raises(ValueError, match="unknown parameter"):
        from_measurements("mri", _fastmri_like(gray), {"views": 3})
    with pytest.raises(ValueError, match="cannot use measured data"):
        from_measurements("denoise", gray, {})


def test_measured_ct(gray):
    sim = simulate("ct", gray, {"views": 12}, seed=0)
    sino = sim.physical_measurements()[0, 0].numpy()  # a measured sinogram is physical
    p = from_measurements("ct", sino, {}, reference=sim.ground_truth[0, 0].numpy())
    torch.testing.assert_close(p.operator(p.ground_truth), sim.measurements)
    torch.testing.assert_close(p.fbp_image(), sim.fbp_image())
    angles = np.linspace(0, 180, 12, endpoint=False) + 1.0
    q = from_measurements("ct", sino, {"angles": angles.tolist()})
    assert q.ground_truth is None and np.allclose(q.operator.angles, angles)
    with pytest.raises(ValueError, match="angles"):
        from_measurements("ct", sino, {"angles": [0.0, 90.0]})
    with pytest.raises(ValueError, match="views, detectors"):
        from_measurements("ct", sino[None], {})


def test_measured_mri_auto_acceleration_undersamples_fully_sampled_data_only(gray):
    """'auto' (the default): fully sampled k-space (fastMRI train/val) at the simulated default 4x;
    already undersampled k-space keeps its own mask."""
    full = from_measurements("mri", _fastmri_like(gray), {}, seed=0)
    assert full.meta["params"]["acceleration"] == 4
    assert full.meta["acceleration_effective"] == pytest.approx(4, rel=0.15)
    mask = equispaced_mask(32, 4, seed=0)
    own = from_measurements("mri", _fastmri_like(gray) * mask.numpy(), {})
    assert own.meta["params"]["acceleration"] is None
    assert torch.equal(own.operator.mask[0, 0, 0].bool(), mask)
