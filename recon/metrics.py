"""Image quality metrics in torch: PSNR with a declared data range, SSIM as scikit-image computes it,
and both restricted to a mask (CT's reconstruction disc)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs() if x.is_complex() else x


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB; complex inputs are compared by magnitude. With a (H, W)
    `mask`, the mean squared error is over the pixels inside it (every channel)."""
    x, ref = _magnitude(x).double(), _magnitude(ref).double()
    err = (x - ref) ** 2
    if mask is None:
        mse = torch.mean(err)
    else:
        m = mask.to(err.device, torch.bool).expand_as(err)
        mse = err[m].mean()
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _symmetric_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """scipy.ndimage's 'reflect' mode (edge repeated: d c b a | a b c d), which skimage's SSIM uses."""
    x = torch.cat([x[..., :p].flip(-1), x, x[..., -p:].flip(-1)], dim=-1)
    return torch.cat([x[..., :p, :].flip(-2), x, x[..., -p:, :].flip(-2)], dim=-2)


def ssim_map(x: torch.Tensor, ref: torch.Tensor, data_range: float, win_size: int = 7,
             k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """The local SSIM map (B*C, 1, H, W) of `structural_similarity(..., full=True)` (skimage defaults:
    uniform 7x7 window, sample covariance N/(N-1), borders by symmetric reflection)."""
    x, ref = _magnitude(x).double(), _magnitude(ref).double()
    while x.dim() < 4:
        x, ref = x.unsqueeze(0), ref.unsqueeze(0)
    b, c, h, w = x.shape
    x, ref = x.reshape(b * c, 1, h, w), ref.reshape(b * c, 1, h, w)
    pad = (win_size - 1) // 2
    pool = lambda t: F.avg_pool2d(_symmetric_pad(t, pad), win_size, stride=1)  # noqa: E731
    n = win_size ** 2
    cov_norm = n / (n - 1)
    ux, uy = pool(x), pool(ref)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(ref * ref) - uy * uy)
    vxy = cov_norm * (pool(x * ref) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean SSIM matching `skimage.metrics.structural_similarity` defaults.

    Without a mask: the map's mean over the region skimage keeps ((win_size-1)//2 pixels cropped
    per border); channels are averaged like skimage's `channel_axis`. With a (H, W) `mask`: the
    map's mean over the pixels inside it. Inputs (B, C, H, W) or (H, W); complex -> magnitude.
    """
    s = ssim_map(x, ref, data_range, win_size, k1, k2)
    if mask is not None:
        return s[mask.to(s.device, torch.bool).expand_as(s)].mean()
    pad = (win_size - 1) // 2
    return s[..., pad:s.shape[-2] - pad, pad:s.shape[-1] - pad].mean()
