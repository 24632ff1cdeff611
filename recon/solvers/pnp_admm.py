"""Plug-and-play ADMM, no network (Venkatakrishnan et al. 2013; Alg. 3 and eq. 34 of the hybrid
DIP-ADMM thesis). One ADMM iteration per step:
    x_{t+1} = D(y_t - u_t)                                  (denoiser in place of prox_{R/rho})
    y_{t+1} = (A^H A + rho I)^{-1} (A^H b + rho (x_{t+1} + u_t))
    u_{t+1} = u_t + x_{t+1} - y_{t+1}
The y-step is solved by conjugate gradients on the normal operator (exact in one or two
iterations for denoising and inpainting, where A^H A has one or two eigenvalues). The reported
iterate is the denoised x; the terms are those of the augmented Lagrangian at (x, y).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recon.solvers import register
from recon.solvers.base import OptionChecks, Solver, SolverParams, StepOutput
from recon.solvers.common import DEFAULT_STRENGTH, DENOISERS, make_denoiser, require_linear


@dataclass
class PnPADMMParams(SolverParams):
    rho: float = 1.0              # penalty rho = 1: thesis Sec. 3.3
    denoiser: str = "tv"          # TV and BM3D are the thesis' PnP priors (Sec. 4.2; NLM failed there)
    strength: float | None = None  # None: thesis-tuned per denoiser (Sec. 3.3): TV 0.01, BM3D 0.05
    cg_iterations: int = 20       # inner CG iterations for the y-step (not in the thesis: it uses a closed form)
    cg_tolerance: float = 1e-6    # relative residual at which CG stops early

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.positive("rho", "cg_tolerance")
        c.one_of("denoiser", DENOISERS)
        c.positive("strength", optional=True)
        c.at_least(1, "cg_iterations")


def conjugate_gradient(apply, rhs: torch.Tensor, x0: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """Solve apply(x) = rhs for a symmetric positive definite `apply` (real tensors)."""
    x = x0.clone()
    r = rhs - apply(x)
    p = r.clone()
    rr = torch.sum(r * r)
    stop = (tol * torch.linalg.vector_norm(rhs)) ** 2
    for _ in range(iterations):
        if rr <= stop:
            break
        ap = apply(p)
        step = rr / torch.sum(p * ap)
        x = x + step * p
        r = r - step * ap
        rr_new = torch.sum(r * r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@register
class PnPADMM(Solver):
    name = "pnp-admm"
    Params = PnPADMMParams
    terms = ("data", "coupling")
    default_steps = 100

    def __init__(self, problem, params, seed, device):
        require_linear(problem, "pnp-admm")
        super().__init__(problem, params, seed, device)
        strength = DEFAULT_STRENGTH[params.denoiser] if params.strength is None else params.strength
        if params.denoiser == "tv":
            strength = strength / params.rho   # prox of (strength TV) / rho
        self.denoise = make_denoiser(params.denoiser, strength, self.name)
        with torch.no_grad():
            start = problem.fbp_image() if problem.fbp is not None else problem.measurement_image()
            self.y = start.float()
            self.u = torch.zeros_like(self.y)
            self.rhs0 = problem.operator.adjoint(problem.measurements).float()   # A^H b

    @torch.no_grad()
    def step(self, k: int) -> StepOutput:
        p, op = self.params, self.problem.operator
        x = self.denoise(self.y - self.u)
        rhs = self.rhs0 + p.rho * (x + self.u)
        y = conjugate_gradient(lambda v: op.normal(v) + p.rho * v, rhs, self.y, p.cg_iterations, p.cg_tolerance)
        data = self.problem.data_fidelity(y)
        coupling = 0.5 * torch.sum((x - y + self.u) ** 2)
        self.u = self.u + x - y
        self.y = y
        return StepOutput(x, {"loss": data + p.rho * coupling, "data": data, "coupling": coupling})

    def extra_state(self) -> dict:
        return {"y": self.y, "u": self.u}

    def load_extra_state(self, state: dict) -> None:
        self.y, self.u = state["y"].to(self.device), state["u"].to(self.device)
