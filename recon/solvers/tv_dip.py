"""DIP + TV: joint gradient form (Alg. 3 of the CT chapter; Baguer et al. 2020, Liu et al. 2019)
and half-quadratic splitting (Alg. 4 of the CT chapter)."""
from __future__ import annotations

from dataclasses import dataclass

from recon.solvers import register
from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks
from recon.solvers.common import tv_norm
from recon.solvers.splitting import HQSParams, HQSSolver


@dataclass
class TVDIPParams(NetworkParams):
    # alpha = 0.01: the DIP+TV loss 1/2||b - A G||^2 + 0.01 ||G||_TV of the DIP-ADMM thesis (eq. 36,
    # Sec. 4.1): our scaling exactly (1/2 sum of squares, images in [0, 1], A a unit-norm pixel
    # selection). Not carried over: the aSeqDIP paper's "1" (App. C.6; its loss scaling is not
    # stated, and 1 over-smooths here: 16.9 dB on sigma-25 denoising, below the noisy input) and the
    # chapter code's 1e-5 (anisotropic TV against a data term divided by ||A||^4 of its walnut
    # operator, whose norm it does not report); the chapter tunes it per scan (Sec. 6).
    alpha: float = 0.01
    # TV is not differentiable where Dx = 0; sqrt(|Dx|^2 + eps^2) - eps keeps the gradient finite
    # and changes TV by at most eps per pixel (not in the papers, which rely on autograd's subgradient).
    tv_eps: float = 1e-6

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.nonnegative("alpha")
        c.positive("tv_eps")


@register
class TVDIP(NetworkSolver):
    """min_theta 1/2||A f(z) - y||^2 + alpha TV(f(z)), one Adam step per step (Alg. 3)."""

    name = "tv-dip"
    Params = TVDIPParams
    terms = ("data", "tv")
    packable = True

    def objective(self, x):
        data = self.problem.data_fidelity(x)
        tv = tv_norm(x, self.params.tv_eps)
        return {"loss": data + self.params.alpha * tv, "data": data, "tv": tv}


@dataclass
class TVDIPHQSParams(HQSParams):
    denoiser: str = "tv"  # u = prox_{alpha_k TV}(f(z)): Alg. 4 line 9

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.one_of("denoiser", ("tv",), " (dip-denoiser-hqs takes the others)")


@register
class TVDIPHQS(HQSSolver):
    """Alg. 4: N_sub Adam steps on 1/2||A f(z) - y||^2 + mu_k/2 ||f(z) - u||^2, then
    u = prox_{alpha_k TV}(f(z)); mu_k = lambda / alpha_k with alpha_k decreasing geometrically."""

    name = "tv-dip-hqs"
    Params = TVDIPHQSParams

