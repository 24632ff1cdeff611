"""DIP + denoiser by half-quadratic splitting (CT chapter eqs. 32-33) and by ADMM (Alg. 6).

Denoisers: 'tv' (TV proximal operator, torch), 'nlm' (scikit-image non-local means), 'bm3d'
(the `bm3d` package, optional extra). The chapter's experiments use DRUNet, which needs
trained weights; these are the classical denoisers of the DIP-ADMM thesis (Sec. 3.3).
"""
from __future__ import annotations

from dataclasses import dataclass

from recon.solvers import register
from recon.solvers.splitting import ADMMParams, ADMMSolver, HQSParams, HQSSolver


@dataclass
class DIPDenoiserHQSParams(HQSParams):
    denoiser: str = "nlm"
    # Project choice (not tuned; the chapter's text gives no numbers for this scheme, and its code's
    # DRUNet schedule with lambda = 60 on a per-pixel mean against a data term divided by ||A||^4
    # does not carry over): u = D_{sigma_k}(f(z)) with sigma_k = sqrt(alpha_k) falling
    # geometrically from 0.1 to 0.01 (0.01: the NLM sigma tuned in the DIP-ADMM thesis Sec. 3.3),
    # and mu_k = lambda / alpha_k ending at 1 (rho = 1 of the thesis, Sec. 3.3).
    alpha_start: float = 1e-2
    alpha_end: float = 1e-4
    lam: float = 1e-4


@register
class DIPDenoiserHQS(HQSSolver):
    name = "dip-denoiser-hqs"
    Params = DIPDenoiserHQSParams


@dataclass
class DIPDenoiserADMMParams(ADMMParams):
    """Defaults of ADMMParams: N_sub = 10, beta = 1, NLM with sigma 0.01 (see splitting.py)."""


@register
class DIPDenoiserADMM(ADMMSolver):
    name = "dip-denoiser-admm"
    Params = DIPDenoiserADMMParams
