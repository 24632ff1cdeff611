"""Forward operators: adjoints, norms, reference geometry (scikit-image), masks, coil maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon.metrics import psnr
from recon.operators import (Blur, Downsample, Identity, LinearOperator, Mask, MultiCoilMRI, Operator, RayTransform,
                             SaturatedBlur, acs_region, birdcage_sensitivities, box_mask, default_center_fraction,
                             dot_product_test, equispaced_mask, estimate_sensitivities, fft2c, gaussian_kernel,
                             ifft2c, make_mask, motion_kernel, post_log_measurements, random_pixel_mask,
                             to_channels, variable_density_mask)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom64() -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (64, 64), anti_aliasing=True)


def _mri(coils: int, h: int = 24, w: int = 20, kind: str = "equispaced", acc: float = 4) -> MultiCoilMRI:
    return MultiCoilMRI(birdcage_sensitivities(coils, h, w), make_mask(kind, w, acc, seed=1))


def _operators() -> dict[str, LinearOperator]:
    gen = torch.Generator().manual_seed(0)
    rgb = (1, 3, 32, 32)
    return {
        "identity-rgb": Identity(rgb),
        "mask-box": Mask(box_mask(32, 32, 0.25), channels=3),
        "mask-random": Mask(random_pixel_mask(32, 32, 0.5, gen), channels=1),
        "blur-gaussian": Blur(gaussian_kernel(9, 2.0), rgb),
        "blur-motion": Blur(motion_kernel(9, 7, 30.0), (1, 1, 32, 32)),
        "sr-x2": Downsample(2, rgb),
        "sr-x4": Downsample(4, (1, 1, 32, 32)),
        "mri-single-coil": _mri(1),
        "mri-multi-coil": _mri(4),
        "mri-random-8x": _mri(6, 32, 32, "random", 8),
        "ct-18": RayTransform(32, views=18),
        "ct-no-circle": RayTransform(24, views=7, circle=False),
        "ct-angles": RayTransform(24, angles=[3.0, 47.5, 100.0, 171.0]),
    }


@pytest.mark.parametrize("name", list(_operators()))
def test_dot_product_adjoint(name):
    op = _operators()[name]
    for seed in (0, 1):
        assert dot_product_test(op, seed=seed) <= 1e-4, name


@pytest.mark.parametrize("name", ["blur-gaussian", "sr-x2", "mri-multi-coil", "ct-18"])
def test_autograd_gradient_is_the_adjoint(name):
    """d/dx <A x, y> = A^H y, so autograd through forward agrees with the hand-written adjoint."""
    op = _operators()[name]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(op.domain_shape, generator=gen, requires_grad=True)
    ax = op(x)
    y = torch.randn(ax.shape, generator=gen, dtype=ax.dtype)
    inner = torch.real(torch.sum(ax * torch.conj(y))) if ax.is_complex() else torch.sum(ax * y)
    (grad,) = torch.autograd.grad(inner, x)
    torch.testing.assert_close(grad, op.adjoint(y), rtol=1e-4, atol=1e-5)


def _explicit_matrix(op: LinearOperator) -> torch.Tensor:
    """The real matrix of op (a complex range counts as its real and imaginary parts, since
    the domain is real)."""
    n = math.prod(op.domain_shape)
    basis = torch.eye(n).reshape(n, *op.domain_shape[1:])
    with torch.no_grad():
        cols = op(basis).reshape(n, -1)
    if cols.is_complex():
        cols = torch.cat([cols.real, cols.imag], dim=1)
    return cols.T.double()


@pytest.mark.parametrize("op", [
    Blur(gaussian_kernel(5, 1.0), (1, 1, 12, 12)),
    Blur(motion_kernel(5, 5, 0.0), (1, 1, 12, 12)),
    Downsample(2, (1, 1, 16, 16)),
    MultiCoilMRI(birdcage_sensitivities(3, 10, 12), equispaced_mask(12, 4, seed=0)),
    RayTransform(12, views=6),
    Mask(box_mask(10, 10, 0.1)),
], ids=["blur", "motion", "sr", "mri", "ct", "mask"])
def test_power_iteration_norm_matches_explicit_matrix(op):
    reference = float(torch.linalg.matrix_norm(_explicit_matrix(op), ord=2))
    assert op.norm(iterations=500) == pytest.approx(reference, rel=1e-3)


def test_known_norms():
    full = MultiCoilMRI(birdcage_sensitivities(4, 16, 16), torch.ones(16))
    assert full.norm() == pytest.approx(1.0, abs=1e-4)  # orthonormal FFT, sum |S|^2 = 1
    x = torch.randn(full.domain_shape)
    torch.testing.assert_close(full.normal(x), x, rtol=1e-4, atol=1e-5)
    # a circulant blur with a non-negative kernel summing to 1 has norm 1 (the DC gain)
    assert Blur(gaussian_kernel(7, 1.5), (1, 1, 16, 16)).norm() == pytest.approx(1.0, abs=1e-4)
    assert Identity((1, 1, 8, 8)).norm() == pytest.approx(1.0)


def test_fft2c_is_centred_and_orthonormal():
    x = torch.randn(2, 3, 8, 10, dtype=torch.complex64)
    k = fft2c(x)
    torch.testing.assert_close(k.abs().pow(2).sum(), x.abs().pow(2).sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ifft2c(k), x, rtol=1e-5, atol=1e-5)
    dc = fft2c(torch.ones(8, 10, dtype=torch.complex64))
    assert dc.abs().argmax() == 4 * 10 + 5  # the DC term sits at (H//2, W//2)


# ------------------------------------------------------------------------------------ CT

@pytest.mark.parametrize("views", [18, 30, 180])
def test_ct_sinogram_matches_skimage_radon(phantom64, views):
    from skimage.transform import radon

    theta = np.linspace(0, 180, views, endpoint=False)
    reference = radon(phantom64, theta=theta, circle=True)  # (detectors, views)
    op = RayTransform(64, views=views)
    ours = op(torch.from_numpy(phantom64).float()[None, None])[0, 0].double().numpy().T
    rel = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    assert rel <= 0.02


def test_ct_no_circle_matches_skimage_radon(phantom64):
    from skimage.transform import radon

    theta = np.linspace(0, 180, 12, endpoint=False)
    reference = radon(phantom64, theta=theta, circle=False)
    op = RayTransform(64, views=12, circle=False)
    assert op.detectors == reference.shape[0]
    ours = op(torch.from_numpy(phantom64).float()[None, None])[0, 0].double().numpy().T
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) <= 0.02


@pytest.mark.parametrize("views,filter_name", [(30, "ramp"), (180, "ramp"), (30, "hann")])
def test_ct_fbp_psnr_matches_skimage_iradon(phantom64, views, filter_name):
    from skimage.transform import iradon, radon

    theta = np.linspace(0, 180, views, endpoint=False)
    sino = radon(phantom64, theta=theta, circle=True)
    op = RayTransform(64, views=views, filter_name=filter_name)
    ours = op.fbp(torch.from_numpy(sino.T).float()[None, None])[0, 0]
    ref = iradon(sino, theta=theta, filter_name=filter_name, circle=True)
    gt = torch.from_numpy(phantom64)
    ours_psnr = float(psnr(ours, gt, 1.0))
    ref_psnr = float(psnr(torch.from_numpy(ref), gt, 1.0))
    assert abs(ours_psnr - ref_psnr) <= 1.0
    assert ours_psnr > 20.0  # a real reconstruction, not two equally bad images


def test_ct_poisson_post_log_model():
    op = RayTransform(32, views=10)
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 8:24] = 0.3
    clean = op(x)

    def draw(photons, seed):
        return post_log_measurements(clean, 32, photons, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1e4, 0), draw(1e4, 0))
    assert not torch.equal(draw(1e4, 0), draw(1e4, 1))
    assert torch.equal(post_log_measurements(clean, 32, None), clean)
    err = {i0: float((draw(i0, 0) - clean).norm() / clean.norm()) for i0 in (1e3, 1e6)}
    assert err[1e6] < err[1e3] / 10  # error ~ 1/sqrt(I0)
    assert err[1e6] < 0.02
    with pytest.raises(ValueError, match="photons"):
        post_log_measurements(clean, 32, 0.0)


def test_ct_rejects_bad_geometry():
    with pytest.raises(ValueError, match="views"):
        RayTransform(16, views=0)
    with pytest.raises(ValueError, match="exactly one"):
        RayTransform(16)
    with pytest.raises(ValueError, match="filter"):
        RayTransform(16, views=4, filter_name="butterworth")


def test_ct_batches_and_moves_like_a_module():
    import copy
    import pickle

    op = RayTransform(16, views=5)
    x = torch.rand(3, 1, 16, 16)
    batched = op(x)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], op(x[i:i + 1]))
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op)), op.to("cpu")):
        torch.testing.assert_close(clone(x), batched)
    assert all(b.device.type == "cpu" for b in op.buffers())


# ----------------------------------------------------------------------------------- MRI

@pytest.mark.parametrize("kind", ["equispaced", "random"])
@pytest.mark.parametrize("acc", [4, 8])
def test_mri_mask_acceleration_and_centre(kind, acc):
    width = 320
    mask = make_mask(kind, width, acc, seed=5)
    assert mask.dtype == torch.bool and mask.shape == (width,)
    effective = width / int(mask.sum())
    assert effective == pytest.approx(acc, rel=0.05)
    n_low = round(width * default_center_fraction(acc))
    start = (width - n_low + 1) // 2
    assert mask[start:start + n_low].all()
    region = acs_region(mask)
    assert region.stop - region.start >= n_low
    assert torch.equal(mask, make_mask(kind, width, acc, seed=5))  # deterministic


def test_mri_fastmri_centre_fractions():
    assert default_center_fraction(4) == pytest.approx(0.08)
    assert default_center_fraction(8) == pytest.approx(0.04)


def test_mri_masks_depend_on_seed():
    masks = {tuple(variable_density_mask(128, 4, seed=s).tolist()) for s in range(5)}
    assert len(masks) > 1
    offsets = {tuple(equispaced_mask(128, 8, seed=s).tolist()) for s in range(8)}
    assert len(offsets) > 1


def test_mri_variable_density_favours_low_frequencies():
    w = 256
    counts = torch.zeros(w)
    for s in range(40):
        counts += variable_density_mask(w, 8, seed=s).float()
    k = (torch.arange(w) - w // 2).abs()
    inner = counts[(k > 16) & (k <= 48)].mean()
    outer = counts[k > 96].mean()
    assert inner > 2 * outer


def test_mri_mask_errors():
    with pytest.raises(ValueError, match="acceleration"):
        equispaced_mask(64, 0.5)
    with pytest.raises(ValueError, match="center_fraction"):
        variable_density_mask(64, 4, center_fraction=0.5)
    with pytest.raises(ValueError, match="mask"):
        make_mask("radial", 64, 4)
    with pytest.raises(ValueError, match="centre column"):
        acs_region(torch.zeros(16, dtype=torch.bool))


@pytest.mark.parametrize("coils", [1, 2, 8])
def test_birdcage_sensitivities_are_normalised(coils):
    s = birdcage_sensitivities(coils, 20, 24)
    assert s.shape == (coils, 20, 24) and s.dtype == torch.complex64
    torch.testing.assert_close(s.abs().pow(2).sum(0), torch.ones(20, 24), rtol=1e-5, atol=1e-5)
    if coils > 1:  # distinct, spatially varying maps
        assert float((s[0].abs() - s[1].abs()).abs().max()) > 0.1


def _smooth_object(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    mag = 0.2 + torch.exp(-(xx ** 2 + yy ** 2) / 0.3)
    return mag * torch.polar(torch.ones(h, w), 0.5 * xx)


def test_estimated_sensitivities_from_acs():
    h, w, coils = 64, 64, 4
    true = birdcage_sensitivities(coils, h, w)
    obj = _smooth_object(h, w)
    mask = equispaced_mask(w, 4, center_fraction=0.16, seed=0)  # 11 calibration lines
    kspace = fft2c(obj[None] * true) * mask.float()
    est = estimate_sensitivities(kspace, mask)
    torch.testing.assert_close(est.abs().pow(2).sum(0), torch.ones(h, w), rtol=1e-4, atol=1e-4)
    # maps agree with the truth up to the object's phase: |<S_est, S_true>| ~ 1 per pixel
    agreement = torch.sum(est * torch.conj(true), dim=0).abs()
    assert float(agreement.mean()) > 0.95
    # and SENSE-combining fully sampled data with them recovers the object's magnitude
    full = MultiCoilMRI(est, torch.ones(w))
    combined = full.adjoint(fft2c(obj[None] * true)[None])
    mag = combined.pow(2).sum(1).sqrt()[0]
    assert float((mag - obj.abs()).norm() / obj.abs().norm()) < 0.05


def test_espirit_sensitivities_optional():
    pytest.importorskip("sigpy")
    h, w, coils = 32, 32, 4
    true = birdcage_sensitivities(coils, h, w)
    kspace = fft2c(_smooth_object(h, w)[None] * true)
    mask = torch.zeros(w, dtype=torch.bool)
    mask[w // 2 - 6:w // 2 + 6] = True
    mask[::2] = True
    est = estimate_sensitivities(kspace * mask.float(), mask, method="espirit")
    assert est.shape == (coils, h, w)
    agreement = torch.sum(est * torch.conj(true), dim=0).abs()
    assert float(agreement[8:24, 8:24].mean()) > 0.9


def test_mri_operator_shapes_and_mask():
    op = _mri(4, 16, 12)
    x = torch.randn(2, 2, 16, 12)
    y = op(x)
    assert y.shape == (2, 4, 16, 12) and y.is_complex()
    unsampled = op.mask[0, 0] == 0
    assert float(y[..., unsampled].abs().max()) == 0.0
    assert op.adjoint(y).shape == (2, 2, 16, 12)
    with pytest.raises(ValueError, match="2 channels"):
        op(torch.randn(1, 1, 16, 12))
    with pytest.raises(ValueError, match="columns"):
        MultiCoilMRI(birdcage_sensitivities(2, 16, 12), torch.ones(10))


def test_single_coil_is_masked_fft():
    op = MultiCoilMRI(birdcage_sensitivities(1, 8, 8), torch.ones(8))
    z = torch.randn(1, 1, 8, 8, dtype=torch.complex64)
    torch.testing.assert_close(op(to_channels(z)), fft2c(z))


# --------------------------------------------------------------------------- restoration

def test_masks_for_inpainting():
    m = box_mask(64, 64, 0.25)
    assert float(1 - m.mean()) == pytest.approx(0.25, abs=1e-3)
    assert m[32, 32] == 0 and m[0, 0] == 1  # a central hole
    gen = torch.Generator().manual_seed(0)
    assert float(1 - random_pixel_mask(40, 40, 0.3, gen).mean()) == pytest.approx(0.3, abs=1e-3)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="hole_ratio"):
            box_mask(16, 16, bad)


def test_kernels_are_normalised():
    for k in (gaussian_kernel(9, 2.0), motion_kernel(9), motion_kernel(11, 6, 120.0)):
        assert float(k.sum()) == pytest.approx(1.0, abs=1e-6) and float(k.min()) >= 0
    g = gaussian_kernel(9, 2.0)
    torch.testing.assert_close(g, g.flip(0))
    torch.testing.assert_close(g, g.T)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 2.0)


def test_blur_is_convolution_with_kernel():
    """Forward = true (flipped) convolution: an impulse at the centre returns the kernel."""
    k = motion_kernel(5, 4, 30.0)
    op = Blur(k, (1, 1, 11, 11))
    x = torch.zeros(1, 1, 11, 11)
    x[..., 5, 5] = 1.0
    torch.testing.assert_close(op(x)[0, 0, 3:8, 3:8], k)


def test_downsample_preserves_constants_and_shape():
    op = Downsample(4, (1, 3, 32, 32))
    y = op(torch.full((1, 3, 32, 32), 0.7))
    assert y.shape == (1, 3, 8, 8) == op.output_shape
    torch.testing.assert_close(y, torch.full_like(y, 0.7))
    with pytest.raises(ValueError, match="divisible"):
        Downsample(4, (1, 1, 30, 32))
    with pytest.raises(ValueError, match="factor"):
        Downsample(1, (1, 1, 32, 32))


def test_saturated_blur_is_differentiable_and_nonlinear():
    op = SaturatedBlur(gaussian_kernel(3, 1.0), (1, 1, 8, 8), gain=2.0)
    assert isinstance(op, Operator) and not isinstance(op, LinearOperator)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    with torch.no_grad():
        assert not torch.allclose(op(2 * x), 2 * op(x))
        ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(op(ones), ones)  # s(1) = 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operators_on_cuda_match_cpu():
    for name, op in _operators().items():
        x = torch.randn(op.domain_shape, generator=torch.Generator().manual_seed(0))
        cpu = op(x)
        gpu = op.to("cuda")(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4, msg=name)
        assert dot_product_test(op) <= 1e-4, name
