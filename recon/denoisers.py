"""Denoisers D_sigma(x) on (B, C, H, W) real tensors, for TV-DIP HQS, DIP+denoiser and PnP.

- `tv_prox(v, lam)`: prox_{lam TV}(v) = argmin_u 1/2 ||u - v||^2 + lam TV(u), isotropic TV with
  forward differences and Neumann boundary (the discretisation of scikit-image's
  `denoise_tv_chambolle`, whose `weight` equals lam), each (batch, channel) image on its own.
  Solved in torch (CPU or CUDA) by the fast gradient projection on the dual of Beck & Teboulle
  2009 (FISTA on Chambolle's dual problem).
- `NLMDenoiser`: scikit-image's non-local means, on CPU numpy, back to the input device/dtype.
- `BM3DDenoiser`: the `bm3d` package (optional extra: pip install dipcohort[bm3d]).

Every denoiser is called as `D(x, sigma)`, sigma the noise standard deviation on the image's
own scale (e.g. 25/255 for sigma 25 on [0, 1] images). Outputs are detached: the solvers use
denoisers as fixed maps (HQS/ADMM prox steps, RED gradients x - D(x)), never differentiate them.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch


# ---------------------------------------------------------------- TV proximal operator
def grad(u: torch.Tensor) -> torch.Tensor:
    """Forward differences (rows, columns) with zero difference at the last row/column: (..., 2, H, W)."""
    gy = torch.zeros_like(u)
    gx = torch.zeros_like(u)
    gy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    gx[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    return torch.stack([gy, gx], dim=-3)


def div(p: torch.Tensor) -> torch.Tensor:
    """Discrete divergence, the negative adjoint of `grad`: <grad u, p> = -<u, div p>."""
    py, px = p[..., 0, :, :], p[..., 1, :, :]
    dy = torch.zeros_like(py)
    dx = torch.zeros_like(px)
    dy[..., 0, :] = py[..., 0, :]
    dy[..., 1:-1, :] = py[..., 1:-1, :] - py[..., :-2, :]
    dy[..., -1, :] = -py[..., -2, :]
    dx[..., :, 0] = px[..., :, 0]
    dx[..., :, 1:-1] = px[..., :, 1:-1] - px[..., :, :-2]
    dx[..., :, -1] = -px[..., :, -2]
    return dy + dx


def tv_norm(u: torch.Tensor) -> torch.Tensor:
    """Isotropic TV summed over pixels, one value per leading index: (B, C)."""
    return torch.sqrt((grad(u) ** 2).sum(-3)).sum((-2, -1))


def _project(p: torch.Tensor) -> torch.Tensor:
    """Project each pixel's 2-vector onto the unit ball (dual of the isotropic TV)."""
    return p / torch.clamp(torch.sqrt((p ** 2).sum(-3, keepdim=True)), min=1.0)


@torch.no_grad()
def tv_prox(v: torch.Tensor, lam: float, max_iter: int = 300, tol: float = 1e-5,
            check_every: int = 10, dual: torch.Tensor | None = None, return_dual: bool = False):
    """prox_{lam TV}(v) for (..., H, W) real tensors, each image separately (see module docstring).

    Fast gradient projection (Beck & Teboulle 2009, FGP) on the dual p, u = v + lam div p,
    step 1/(8 lam) since ||grad||^2 <= 8. Stops when the relative change of u over the last
    `check_every` iterations is below `tol` (checked only then, to avoid device syncs).
    Solvers calling it every step can warm-start: pass the previous `dual` (shape (..., 2, H, W))
    and set `return_dual=True` to get (u, dual).
    """
    if not torch.is_tensor(v) or v.is_complex():
        raise TypeError("tv_prox: expected a real tensor; pass complex images as real/imag channels")
    if v.dim() < 2 or min(v.shape[-2:]) < 2:
        raise ValueError(f"tv_prox: expected (..., H, W) with H, W >= 2, got shape {tuple(v.shape)}")
    lam = float(lam)
    if not lam >= 0:
        raise ValueError(f"tv_prox: lam must be >= 0, got {lam}")
    v = v.detach()
    shape = (*v.shape[:-2], 2, *v.shape[-2:])
    if lam == 0:
        return (v.clone(), torch.zeros(shape, dtype=v.dtype, device=v.device)) if return_dual else v.clone()
    if dual is not None and tuple(dual.shape) != shape:
        raise ValueError(f"tv_prox: dual has shape {tuple(dual.shape)}; expected {shape}")
    p = torch.zeros(shape, dtype=v.dtype, device=v.device) if dual is None else _project(dual.to(v))
    r, t, u = p, 1.0, v
    for k in range(max_iter):
        p_new = _project(r + grad(v + lam * div(r)) / (8.0 * lam))
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        r = p_new + ((t - 1.0) / t_new) * (p_new - p)
        p, t = p_new, t_new
        if (k + 1) % check_every == 0:
            u_new = v + lam * div(p)
            change = torch.linalg.vector_norm(u_new - u) / torch.clamp(torch.linalg.vector_norm(u_new), min=1e-12)
            u = u_new
            if change < tol:
                break
    u = v + lam * div(p)
    return (u, p) if return_dual else u


class TVDenoiser:
    """D_sigma(x) = prox_{lam TV}(x) with lam = scale * sigma (scale 1 by default).

    lam ~ sigma is the usual rule of thumb for scikit-image's `weight`; solvers that need a given
    prox strength (HQS: prox_{alpha/mu TV}, CT chapter eq. 25) call `tv_prox` directly.
    """

    name = "tv"

    def __init__(self, scale: float = 1.0, max_iter: int = 300, tol: float = 1e-5):
        if scale <= 0:
            raise ValueError(f"tv denoiser: scale must be > 0, got {scale}")
        self.scale, self.max_iter, self.tol = scale, max_iter, tol

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        _check(x, sigma, self.name)
        return tv_prox(x, self.scale * float(sigma), self.max_iter, self.tol)


# ---------------------------------------------------------------- numpy-backed denoisers
def _check(x: torch.Tensor, sigma: float, name: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.is_complex():
        raise ValueError(f"{name} denoiser: expected a real (B, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x))}")
    try:
        ok = float(sigma) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} denoiser: sigma must be a number >= 0, got {sigma!r}")


def _per_image(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn to each (H, W, C) float64 numpy image of the batch; back to x's device/dtype."""
    arr = x.detach().to("cpu", torch.float64).numpy()
    out = np.stack([np.moveaxis(fn(np.moveaxis(img, 0, -1)), -1, 0) for img in arr])
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


class NLMDenoiser:
    """Non-local means (`skimage.restoration.denoise_nl_means`), sigma-aware.

    Defaults: patch 5, search distance 6, fast mode with h = 0.8 sigma and the noise sigma
    subtracted, as in scikit-image's NLM gallery example ("Non-local means denoising for
    preserving textures"). The DIP-ADMM thesis (Sec. 5) tuned patch distance 2, h = 0.05 for
    its inpainting runs: pass patch_distance=2, h=0.05 for that setting.
    """

    name = "nlm"

    def __init__(self, patch_size: int = 5, patch_distance: int = 6, h: float | None = None,
                 h_factor: float = 0.8, fast_mode: bool = True):
        self.patch_size, self.patch_distance = patch_size, patch_distance
        self.h, self.h_factor, self.fast_mode = h, h_factor, fast_mode

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        from skimage.restoration import denoise_nl_means

        _check(x, sigma, self.name)
        sigma = float(sigma)
        h = self.h if self.h is not None else self.h_factor * sigma
        if h <= 0:
            return x.detach().clone()

        def fn(img: np.ndarray) -> np.ndarray:
            out = denoise_nl_means(img, patch_size=self.patch_size, patch_distance=self.patch_distance,
                                   h=h, sigma=sigma, fast_mode=self.fast_mode, channel_axis=-1)
            return out.reshape(img.shape)

        return _per_image(x, fn)


class BM3DDenoiser:
    """BM3D (Dabov et al. 2007) from the `bm3d` package; 3 channels use CBM3D (`bm3d_rgb`)
    unless rgb=False, any other channel count is denoised channel by channel."""

    name = "bm3d"

    def __init__(self, rgb: bool = True):
        try:
            import bm3d  # noqa: F401
        except ImportError as err:
            raise ImportError("the 'bm3d' denoiser needs the bm3d package: "
                              "pip install dipcohort[bm3d]  (or: pip install bm3d)") from err
        self.rgb = rgb

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        import bm3d

        _check(x, sigma, self.name)
        sigma = float(sigma)
        if sigma == 0:
            return x.detach().clone()

        def fn(img: np.ndarray) -> np.ndarray:
            if self.rgb and img.shape[-1] == 3:
                return np.asarray(bm3d.bm3d_rgb(img, sigma))
            return np.stack([np.asarray(bm3d.bm3d(img[..., c], sigma)) for c in range(img.shape[-1])], -1)

        return _per_image(x, fn)


DENOISERS = {"tv": TVDenoiser, "nlm": NLMDenoiser, "bm3d": BM3DDenoiser}


def get_denoiser(name: str, **kwargs):
    """Build a denoiser by name ('tv', 'nlm', 'bm3d'); unknown names or options → ValueError."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; expected one of {', '.join(DENOISERS)}")
    cls = DENOISERS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"denoiser {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(allowed) or '(none)'}")
    return cls(**kwargs)
