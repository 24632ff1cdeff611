"""Small pieces several solver modules share: TV, schedules, denoisers, the linearity check."""
from __future__ import annotations

import math
from typing import Callable

import torch

from recon.problem import Problem

Denoiser = Callable[[torch.Tensor], torch.Tensor]


def geometric(start: float, end: float, index: int, count: int) -> float:
    """Value `index` (0-based) of `count` values spaced geometrically from start to end."""
    if count <= 1:
        return start
    t = min(max(index, 0), count - 1) / (count - 1)
    return start * (end / start) ** t


def blocks(total_steps: int, inner_steps: int) -> int:
    """K = ceil(steps / N_sub) outer iterations for a budget of `total_steps` updates."""
    return max(1, math.ceil(total_steps / inner_steps))


# ---- total variation: recon.denoisers' discretisation (forward differences, Neumann boundary,
# isotropic per channel), so TV-DIP's penalty and the TV prox of HQS/ADMM/PnP are the same TV ----
def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences, (B, C, 2, H, W)."""
    from recon.denoisers import grad

    return grad(x)


def divergence(p: torch.Tensor) -> torch.Tensor:
    """Minus the adjoint of `gradient`."""
    from recon.denoisers import div

    return div(p)


def tv_norm(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Isotropic TV(x) = sum_i ||(Dx)_i||_2 (CT chapter Sec. 4.2), summed over channels.

    `eps` > 0 gives sum_i sqrt(||(Dx)_i||^2 + eps^2) - eps: differentiable at flat regions (where
    the plain norm has no gradient and autograd would return NaN), and within eps per pixel of TV.
    """
    sq = torch.sum(gradient(x) ** 2, dim=-3)
    if eps > 0:
        return torch.sum(torch.sqrt(sq + eps * eps) - eps)
    return torch.sum(torch.sqrt(sq))


# ---- denoisers (recon.denoisers: TV prox in torch, NLM / BM3D wrappers), called as D(x) ----
DENOISERS = ("tv", "nlm", "bm3d")
# Strengths tuned in the DIP-ADMM thesis Sec. 3.3 for images in [0, 1]: TV shrinkage 0.01, BM3D
# sigma 0.05, NLM sigma 0.01 with patch distance 2 and cut-off h = 0.05 (used exactly when the
# strength is left at its default; a given NLM strength uses recon.denoisers' sigma-aware h).
DEFAULT_STRENGTH = {"tv": 0.01, "nlm": 0.01, "bm3d": 0.05}
THESIS_NLM = {"patch_distance": 2, "h": 0.05}


def make_denoiser(name: str, strength: float | None, solver: str) -> Denoiser:
    """D(x) for x of shape (1, C, H, W); `strength` is the TV prox weight for 'tv' and the noise
    standard deviation (image scale) for 'nlm' and 'bm3d'; None: DEFAULT_STRENGTH."""
    from recon.denoisers import get_denoiser

    if name not in DENOISERS:
        raise ValueError(f"{solver}: unknown denoiser {name!r}; expected one of {', '.join(DENOISERS)}")
    options = THESIS_NLM if (name == "nlm" and strength is None) else {}
    if strength is None:
        strength = DEFAULT_STRENGTH[name]
    if not strength > 0:
        raise ValueError(f"{solver}: denoiser strength must be > 0, got {strength!r}")
    denoiser = get_denoiser(name, **options)
    return lambda x: denoiser(x, strength)


def require_linear(problem: Problem, solver: str) -> None:
    """Methods that need A^H (PDHG, CG x-updates) refuse the non-linear blur model up front."""
    from recon.operators.base import LinearOperator

    if not isinstance(problem.operator, LinearOperator):
        raise ValueError(f"{solver}: needs a linear operator; task {problem.task!r} has a non-linear one")
