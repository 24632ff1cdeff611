"""Denoisers: the torch TV prox against scikit-image and its optimality; NLM and BM3D wrappers."""
import numpy as np
import pytest
import torch
from skimage import data
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from recon.denoisers import div, get_denoiser, grad, tv_norm, tv_prox
from recon.metrics import psnr

torch.set_num_threads(1)


def _noisy(size=32, sigma=0.1, seed=0):
    ref = data.camera()[::8, ::8][:size, :size] / 255.0
    noisy = ref + sigma * np.random.default_rng(seed).standard_normal(ref.shape)
    return ref, noisy


def _objective(u: np.ndarray, v: np.ndarray, lam: float) -> float:
    return 0.5 * float(np.sum((u - v) ** 2)) + lam * float(tv_norm(torch.from_numpy(u)))


def test_grad_div_are_adjoint():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 11, 7, generator=g, dtype=torch.float64)
    p = torch.randn(2, 3, 2, 11, 7, generator=g, dtype=torch.float64)
    assert torch.sum(grad(u) * p).item() == pytest.approx(-torch.sum(u * div(p)).item(), rel=1e-12)


@pytest.mark.parametrize("lam", [0.05, 0.15])
def test_tv_prox_matches_skimage_chambolle(lam):
    # skimage minimises sum |grad u| + 1/(2 weight) ||u - f||^2, i.e. weight = lam, with the same
    # forward differences and Neumann boundary; run both close to convergence
    _, f = _noisy()
    ref = denoise_tv_chambolle(f, weight=lam, eps=0.0, max_num_iter=4000)
    u = tv_prox(torch.from_numpy(f)[None, None], lam, max_iter=2000, tol=1e-10)[0, 0].numpy()
    assert np.max(np.abs(u - ref)) < 1e-3
    # FGP converges faster than Chambolle's projection: its objective is no worse
    assert _objective(u, f, lam) <= _objective(ref, f, lam) + 1e-6


def test_tv_prox_default_iterations_are_near_optimal():
    _, f = _noisy(seed=1)
    lam = 0.1
    ref = tv_prox(torch.from_numpy(f), lam, max_iter=2000, tol=1e-12).numpy()
    u = tv_prox(torch.from_numpy(f).float(), lam).double().numpy()
    assert _objective(u, f, lam) - _objective(ref, f, lam) < 1e-3 * _objective(ref, f, lam)


def test_tv_prox_is_a_minimiser():
    _, f = _noisy(size=24, seed=2)
    lam = 0.1
    u = tv_prox(torch.from_numpy(f), lam, max_iter=2000, tol=1e-12).numpy()
    best = _objective(u, f, lam)
    rng = np.random.default_rng(5)
    for scale in (1e-2, 1e-3):
        for _ in range(10):
            assert _objective(u + scale * rng.standard_normal(u.shape), f, lam) >= best - 1e-9
    # moving towards the data or towards a flat image does not help either
    for other in (f, np.full_like(f, f.mean())):
        for s in (0.01, 0.05):
            assert _objective((1 - s) * u + s * other, f, lam) >= best - 1e-9


def test_tv_prox_warm_start_converges_faster():
    _, f = _noisy(size=32, seed=3)
    v = torch.from_numpy(f)
    exact = tv_prox(v, 0.1, max_iter=2000, tol=1e-12)
    _, dual = tv_prox(v, 0.1, max_iter=2000, tol=1e-12, return_dual=True)
    moved = v + 0.01 * torch.from_numpy(np.random.default_rng(4).standard_normal(f.shape))
    target = tv_prox(moved, 0.1, max_iter=2000, tol=1e-12)
    cold = tv_prox(moved, 0.1, max_iter=20, tol=0)
    warm = tv_prox(moved, 0.1, max_iter=20, tol=0, dual=dual)
    assert (warm - target).abs().max() < (cold - target).abs().max()
    assert not torch.allclose(exact, target)
    with pytest.raises(ValueError, match="dual has shape"):
        tv_prox(v, 0.1, dual=dual[..., :-1])


def test_tv_prox_fixed_points_and_limits():
    const = torch.full((2, 3, 16, 16), 0.37)
    assert torch.equal(tv_prox(const, 0.5), const)
    _, f = _noisy(size=16)
    v = torch.from_numpy(f)
    assert torch.equal(tv_prox(v, 0.0), v)
    # a huge weight flattens each image to its mean (TV = 0 is optimal and the mean is kept)
    flat = tv_prox(v, 1e3, max_iter=3000)
    assert torch.allclose(flat, torch.full_like(v, f.mean()), atol=1e-4)


def test_tv_prox_handles_batches_and_channels_separately():
    _, f = _noisy(size=20)
    v = torch.from_numpy(np.stack([f, f[::-1].copy(), 2 * f]))[None]  # (1, 3, H, W)
    out = tv_prox(v, 0.1, max_iter=500, tol=1e-12)
    for c in range(3):
        alone = tv_prox(v[:, c:c + 1], 0.1, max_iter=500, tol=1e-12)
        assert torch.allclose(out[:, c:c + 1], alone, atol=1e-10)


def test_tv_prox_rejects_bad_input():
    with pytest.raises(ValueError, match="lam must be >= 0"):
        tv_prox(torch.zeros(4, 4), -1.0)
    with pytest.raises(ValueError, match="H, W >= 2"):
        tv_prox(torch.zeros(1, 5), 0.1)
    with pytest.raises(TypeError, match="real tensor"):
        tv_prox(torch.zeros(4, 4, dtype=torch.complex64), 0.1)


def test_tv_denoiser_denoises_and_keeps_dtype():
    ref, f = _noisy(size=32, sigma=0.1)
    x = torch.from_numpy(f).float()[None, None]
    out = get_denoiser("tv")(x, 0.1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    r = torch.from_numpy(ref).float()[None, None]
    assert psnr(out, r, 1.0) > psnr(x, r, 1.0) + 1.0


def test_nlm_wraps_skimage():
    ref, f = _noisy(size=32, sigma=0.1)
    x = torch.from_numpy(f).float()[None, None]
    den = get_denoiser("nlm", patch_size=5, patch_distance=4)
    out = den(x, 0.1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    expect = denoise_nl_means(f, patch_size=5, patch_distance=4, h=0.08, sigma=0.1, fast_mode=True)
    assert np.allclose(out[0, 0].double().numpy(), expect, atol=1e-5)
    r = torch.from_numpy(ref).float()[None, None]
    assert psnr(out, r, 1.0) > psnr(x, r, 1.0) + 1.0


def test_nlm_multichannel_and_batch():
    rng = np.random.default_rng(0)
    img = data.astronaut()[::16, ::16][:24, :24] / 255.0
    x = torch.from_numpy(np.stack([img, img[::-1].copy()])).permute(0, 3, 1, 2).float()
    x = x + 0.05 * torch.from_numpy(rng.standard_normal(x.shape)).float()
    out = get_denoiser("nlm")(x, 0.05)
    assert out.shape == x.shape
    first = get_denoiser("nlm")(x[:1], 0.05)
    assert torch.allclose(out[:1], first)
    assert not torch.allclose(out, x)


def test_bm3d_denoises():
    pytest.importorskip("bm3d")
    ref, f = _noisy(size=32, sigma=0.1)
    x = torch.from_numpy(f).float()[None, None]
    out = get_denoiser("bm3d")(x, 0.1)
    assert out.shape == x.shape and out.dtype == torch.float32
    r = torch.from_numpy(ref).float()[None, None]
    assert psnr(out, r, 1.0) > psnr(x, r, 1.0) + 1.0
    two = get_denoiser("bm3d")(x.repeat(1, 2, 1, 1), 0.1)  # non-RGB: channel by channel
    assert torch.allclose(two[:, 0], out[:, 0], atol=1e-5) and torch.allclose(two[:, 1], out[:, 0], atol=1e-5)


def test_bm3d_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bm3d":
            raise ImportError("No module named 'bm3d'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install dipcohort\[bm3d\]"):
        get_denoiser("bm3d")


def test_get_denoiser_validation():
    with pytest.raises(ValueError, match="unknown denoiser 'drunet'; expected one of tv, nlm, bm3d"):
        get_denoiser("drunet")
    with pytest.raises(ValueError, match="denoiser 'nlm': unknown option.*patchsize"):
        get_denoiser("nlm", patchsize=3)
    with pytest.raises(ValueError, match="sigma must be a number >= 0"):
        get_denoiser("tv")(torch.zeros(1, 1, 4, 4), -0.1)
    with pytest.raises(ValueError, match=r"real \(B, C, H, W\) tensor"):
        get_denoiser("nlm")(torch.zeros(4, 4), 0.1)
