"""Image quality metrics in torch: PSNR with a declared data range, SSIM as scikit-image computes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs() if x.is_complex() else x


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB; complex inputs are compared by magnitude."""
    x, ref = _magnitude(x).double(), _magnitude(ref).double()
    mse = torch.mean((x - ref) ** 2)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM matching `skimage.metrics.structural_similarity` defaults.

    Uniform 7x7 window, sample covariance (N/(N-1)), mean over the valid region (skimage crops
    (win_size-1)//2 pixels per border, which equals an unpadded pooling). Channels are averaged
    like skimage's `channel_axis`. Inputs (B, C, H, W) or (H, W); complex → magnitude.
    """
    x, ref = _magnitude(x).double(), _magnitude(ref).double()
    while x.dim() < 4:
        x, ref = x.unsqueeze(0), ref.unsqueeze(0)
    b, c, h, w = x.shape
    x, ref = x.reshape(b * c, 1, h, w), ref.reshape(b * c, 1, h, w)
    pool = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    n = win_size ** 2
    cov_norm = n / (n - 1)
    ux, uy = pool(x), pool(ref)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(ref * ref) - uy * uy)
    vxy = cov_norm * (pool(x * ref) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean()
