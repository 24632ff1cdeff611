"""Multi-coil Cartesian MRI: A = M F S (Sec. 2 of the aSeqDIP paper), masks and coil maps.

Domain: real network-format images (B, 2, H, W) = (real, imag). Range: complex k-space
(B, coils, H, W), zero where the mask does not sample. F is the centred orthonormal 2-D FFT,
so with a full mask and sum_c |S_c|^2 = 1 the operator is an isometry (norm 1).
Undersampling is along columns (the phase-encode direction, as in fastMRI k-space).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from recon.operators.base import LinearOperator

__all__ = [
    "MultiCoilMRI", "fft2c", "ifft2c", "to_complex", "to_channels",
    "equispaced_mask", "variable_density_mask", "make_mask", "default_center_fraction",
    "acs_region", "birdcage_sensitivities", "estimate_sensitivities", "espirit_sensitivities",
]


# ------------------------------------------------------------------ FFT and formats

def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two axes."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2-D FFT over the last two axes."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), norm="ortho"), dim=dims)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) real -> (B, 1, H, W) complex."""
    if x.shape[1] != 2:
        raise ValueError(f"MRI images need 2 channels (real, imag), got shape {tuple(x.shape)}")
    return torch.complex(x[:, 0:1], x[:, 1:2])


def to_channels(z: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) complex -> (B, 2, H, W) real."""
    return torch.cat([z.real, z.imag], dim=1)


# ------------------------------------------------------------------------------ masks

def default_center_fraction(acceleration: float) -> float:
    """fastMRI pairs 4x with 0.08 and 8x with 0.04 (Zbontar et al. 2018, arXiv:1811.08839,
    and `fastmri.data.subsample` docs); both equal 0.32 / acceleration, which we use in general."""
    return 0.32 / float(acceleration)


def _check_mask_args(width: int, acceleration: float, center_fraction: float) -> int:
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if not 0.0 < center_fraction <= 1.0:
        raise ValueError(f"center_fraction must lie in (0, 1], got {center_fraction}")
    if center_fraction > 1.0 / acceleration:
        raise ValueError(f"center_fraction {center_fraction} exceeds 1/acceleration = {1 / acceleration:.3f}: "
                         "the fully sampled centre alone would exceed the sampling budget")
    if width < 4:
        raise ValueError(f"k-space width must be >= 4 columns, got {width}")
    return max(1, round(width * center_fraction))


def _center_slice(width: int, n_low: int) -> slice:
    start = (width - n_low + 1) // 2  # same placement as fastmri.data.subsample
    return slice(start, start + n_low)


def equispaced_mask(width: int, acceleration: float, center_fraction: float | None = None,
                    seed: int = 0) -> torch.Tensor:
    """fastMRI `EquispacedMaskFunc`: a fully sampled centre plus equispaced columns at the
    adjusted rate (acceleration*(n_low - W)) / (n_low*acceleration - W), random offset from seed."""
    cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
    n_low = _check_mask_args(width, acceleration, cf)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[_center_slice(width, n_low)] = True
    if n_low * acceleration < width:
        adjusted = acceleration * (n_low - width) / (n_low * acceleration - width)
        gen = torch.Generator().manual_seed(int(seed))
        offset = int(torch.randint(0, max(1, round(adjusted)), (1,), generator=gen))
        cols = np.around(np.arange(offset, width - 1, adjusted)).astype(np.int64)
        mask[torch.from_numpy(cols)] = True
    return mask


def variable_density_mask(width: int, acceleration: float, center_fraction: float | None = None,
                seed: int = 0, power: float = 2.0) -> torch.Tensor:
    """Variable-density random lines: fully sampled centre plus round(W/acceleration) - n_low
    columns drawn without replacement with density ~ (1 + 10 |k| / (W/2))^-power, so low
    frequencies are favoured. Exactly round(W / acceleration) columns are sampled. A polynomial
    variable density as in Lustig et al. 2007 (Sparse MRI, Sec. V); the decay rate is our choice."""
    cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
    n_low = _check_mask_args(width, acceleration, cf)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[_center_slice(width, n_low)] = True
    extra = max(0, round(width / acceleration) - n_low)
    if extra:
        k = torch.arange(width, dtype=torch.float64) - width // 2
        density = (1.0 + 10.0 * k.abs() / (width / 2)) ** (-power)
        density[mask] = 0.0
        gen = torch.Generator().manual_seed(int(seed))
        mask[torch.multinomial(density, extra, replacement=False, generator=gen)] = True
    return mask


def make_mask(kind: str, width: int, acceleration: float, center_fraction: float | None = None,
              seed: int = 0) -> torch.Tensor:
    if kind == "equispaced":
        return equispaced_mask(width, acceleration, center_fraction, seed)
    if kind == "random":
        return variable_density_mask(width, acceleration, center_fraction, seed)
    raise ValueError(f"mask must be 'equispaced' or 'random', got {kind!r}")


def acs_region(mask: torch.Tensor) -> slice:
    """The contiguous run of sampled columns around the centre column (the calibration region)."""
    cols = torch.as_tensor(mask).reshape(-1).bool().cpu()
    w = cols.numel()
    c = w // 2
    if not cols[c]:
        raise ValueError("mask does not sample the centre column: no calibration (ACS) region")
    lo, hi = c, c
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi < w - 1 and cols[hi + 1]:
        hi += 1
    return slice(lo, hi + 1)


# ---------------------------------------------------------------------- coil maps

def _normalise(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    rss = torch.sqrt(torch.sum(maps.abs() ** 2, dim=0, keepdim=True))
    return maps / torch.clamp(rss, min=eps)


def birdcage_sensitivities(coils: int, height: int, width: int, radius: float = 1.5, rotation: float = 0.0,
                           centre: tuple[float, float] = (0.0, 0.0),
                           phases: torch.Tensor | None = None) -> torch.Tensor:
    """Simulated birdcage coil maps (coils, H, W) complex64 with sum_c |S_c|^2 = 1 per pixel.

    Coils sit on a circle of `radius` (in units of the half field of view) around `centre` (dy, dx,
    same units), the first at angle `rotation` (radians); magnitude falls off as 1/distance and each
    coil carries its own phase, as `sigpy.mri.birdcage_maps` (radius 1.5 is its default), plus an
    optional constant phase per coil (`phases`, radians). One coil gives S = 1 (the single-coil case).
    """
    if coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    if coils == 1:
        return torch.ones(1, height, width, dtype=torch.complex64)
    angle = rotation + 2 * math.pi * torch.arange(coils, dtype=torch.float64)[:, None, None] / coils
    y = torch.arange(height, dtype=torch.float64)[None, :, None]
    x = torch.arange(width, dtype=torch.float64)[None, None, :]
    xc = (x - width / 2) / (width / 2) - centre[1] - radius * torch.cos(angle)
    yc = (y - height / 2) / (height / 2) - centre[0] - radius * torch.sin(angle)
    rr = torch.sqrt(xc ** 2 + yc ** 2)
    phase = torch.atan2(xc, -yc) - angle
    if phases is not None:
        phase = phase + torch.as_tensor(phases, dtype=torch.float64).reshape(coils, 1, 1)
    maps = torch.polar(1.0 / rr, phase)
    return _normalise(maps).to(torch.complex64)


def _hann(n: int, m: int) -> torch.Tensor:
    """Length-n window: a Hann taper over the central m samples, zero elsewhere."""
    w = torch.zeros(n, dtype=torch.float64)
    s = _center_slice(n, m)
    w[s] = torch.hann_window(m + 2, periodic=False, dtype=torch.float64)[1:-1]
    return w


def estimate_sensitivities(kspace: torch.Tensor, mask: torch.Tensor | None = None,
                           method: str = "acs", threshold: float = 0.0) -> torch.Tensor:
    """Coil maps (coils, H, W) complex64 from measured k-space (coils, H, W).

    'acs' (built in): keep the calibration columns (and as many central rows) under a Hann
    taper, inverse FFT to smooth low-resolution coil images, divide by their root-sum-of-squares
    (the RSS normalisation of SENSE reference scans). Pixels whose low-resolution RSS
    falls below `threshold` times its maximum get S = 0. 'espirit': sigpy's ESPIRiT (optional).
    """
    k = torch.as_tensor(kspace)
    if k.dim() != 3 or not k.is_complex():
        raise ValueError(f"kspace must be complex (coils, H, W), got {tuple(k.shape)} {k.dtype}")
    coils, h, w = k.shape
    if coils == 1:
        return torch.ones(1, h, w, dtype=torch.complex64, device=k.device)
    if mask is None:
        mask = (k.abs().sum(dim=(0, 1)) > 0)
    region = acs_region(mask)
    n_acs = region.stop - region.start
    if method == "espirit":
        return espirit_sensitivities(k, n_acs)
    if method != "acs":
        raise ValueError(f"sensitivity method must be 'acs' or 'espirit', got {method!r}")
    win = (_hann(h, min(h, n_acs))[:, None] * _hann(w, n_acs)[None, :]).to(k.device)
    low = ifft2c(k.to(torch.complex128) * win)
    rss = torch.sqrt(torch.sum(low.abs() ** 2, dim=0, keepdim=True))
    maps = _normalise(low, eps=1e-12 * float(rss.max()))
    if threshold > 0:
        maps = maps * (rss >= threshold * rss.max())
    return maps.to(torch.complex64)


def espirit_sensitivities(kspace: torch.Tensor, calib_width: int) -> torch.Tensor:
    """ESPIRiT maps through sigpy (optional extra `dipcohort[espirit]`)."""
    try:
        from sigpy.mri.app import EspiritCalib
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("ESPIRiT needs sigpy: pip install 'dipcohort[espirit]'") from err
    ksp = kspace.detach().cpu().numpy().astype(np.complex64)
    maps = EspiritCalib(ksp, calib_width=int(calib_width), show_pbar=False).run()
    return torch.from_numpy(np.asarray(maps)).to(kspace.device, torch.complex64)


# ------------------------------------------------------------------------- operator

class MultiCoilMRI(LinearOperator):
    """A = M F S with sensitivities (coils, H, W) and a column mask (W,) or full mask (H, W)."""

    def __init__(self, sensitivities: torch.Tensor, mask: torch.Tensor):
        s = torch.as_tensor(sensitivities)
        if s.dim() == 2:
            s = s[None]
        if s.dim() != 3:
            raise ValueError(f"sensitivities must be (coils, H, W), got shape {tuple(s.shape)}")
        coils, h, w = s.shape
        m = torch.as_tensor(mask).float()
        if m.dim() == 1:
            if m.numel() != w:
                raise ValueError(f"column mask has {m.numel()} entries, k-space has {w} columns")
            m = m.reshape(1, w).expand(h, w)
        if tuple(m.shape) != (h, w):
            raise ValueError(f"mask must be (W,) or (H, W) = ({h}, {w}), got shape {tuple(m.shape)}")
        super().__init__((1, 2, h, w))
        self.register_buffer("sens", s.to(torch.complex64)[None].contiguous())
        self.register_buffer("mask", m.contiguous()[None, None].clone())

    @property
    def coils(self) -> int:
        return int(self.sens.shape[1])

    @property
    def acceleration(self) -> float:
        return float(self.mask.numel() / self.mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * fft2c(to_complex(x) * self.sens)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.sum(torch.conj(self.sens) * ifft2c(self.mask * y), dim=1, keepdim=True)
        return to_channels(z)
