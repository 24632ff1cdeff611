"""Classical baselines without a network: `adjoint` (A^H y: zero-filled MRI, y for denoising),
`fbp` (CT filtered back-projection) and `tv` (TV-regularised least squares by Chambolle-Pock)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon.solvers import register
from recon.solvers.base import OptionChecks, Solver, SolverParams, StepOutput
from recon.solvers.common import divergence, gradient, require_linear, tv_norm


def _data_terms(problem, x: torch.Tensor) -> dict[str, torch.Tensor]:
    data = problem.data_fidelity(x)
    return {"loss": data, "data": data}


@dataclass
class AdjointParams(SolverParams):
    """No options: A^H y is fixed by the data."""


@register
class Adjoint(Solver):
    name = "adjoint"
    Params = AdjointParams

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        with torch.no_grad():
            self.image = problem.adjoint_image().float()

    def step(self, k: int) -> StepOutput:
        with torch.no_grad():
            return StepOutput(self.image, _data_terms(self.problem, self.image))


@dataclass
class FBPParams(SolverParams):
    """No options: the filter is the problem's (ramp, optionally Hann; recon.operators.ct)."""


@register
class FBP(Solver):
    name = "fbp"
    Params = FBPParams

    def __init__(self, problem, params, seed, device):
        if problem.fbp is None:
            raise ValueError(f"fbp: filtered back-projection exists for CT only; task {problem.task!r} "
                             f"has none (use 'adjoint')")
        super().__init__(problem, params, seed, device)
        with torch.no_grad():
            self.image = problem.fbp_image().float()

    def step(self, k: int) -> StepOutput:
        with torch.no_grad():
            return StepOutput(self.image, _data_terms(self.problem, self.image))


@dataclass
class TVParams(SolverParams):
    # alpha = 0.01: the TV weight of the DIP-ADMM thesis (eq. 36, Sec. 4.1) with the same
    # 1/2-scaled data term; the CT chapter's TV baseline tunes it per scan (Sec. 6.3).
    alpha: float = 0.01
    theta: float = 1.0   # over-relaxation theta = 1: Chambolle & Pock 2011, Alg. 1

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.nonnegative("alpha")
        c.between("theta", 0, 1, "[]")  # Chambolle & Pock 2011: theta in [0, 1]


@register
class TV(Solver):
    """min_x 1/2||A x - y||^2 + alpha TV(x) by PDHG (Chambolle & Pock 2011), one iteration per step.

    K = (A, D) with ||K||^2 <= ||A||^2 + 8 (||D||^2 <= 8 for forward differences in 2-D);
    tau = sigma = 0.99 / sqrt(||A||^2 + 8) so that tau sigma ||K||^2 < 1.
    """

    name = "tv"
    Params = TVParams
    terms = ("data", "tv")
    default_steps = 300

    def __init__(self, problem, params, seed, device):
        require_linear(problem, "tv")
        super().__init__(problem, params, seed, device)
        op = problem.operator
        self.tau = self.sigma = 0.99 / math.sqrt(op.norm() ** 2 + 8.0)
        with torch.no_grad():
            x = problem.fbp_image() if problem.fbp is not None else problem.measurement_image()
            self.x = x.float()
            self.x_bar = self.x.clone()
            self.p = torch.zeros_like(problem.measurements)       # dual of the data term
            self.q = torch.zeros_like(gradient(self.x))           # dual of alpha ||Dx||_{2,1}

    @torch.no_grad()
    def step(self, k: int) -> StepOutput:
        op, y, a = self.problem.operator, self.problem.measurements, self.params.alpha
        s, t = self.sigma, self.tau
        self.p = (self.p + s * (op(self.x_bar) - y)) / (1 + s)    # prox of sigma F1*, F1 = 1/2||. - y||^2
        q = self.q + s * gradient(self.x_bar)
        norm = torch.sqrt(torch.sum(q ** 2, dim=-3, keepdim=True))  # per pixel and channel
        self.q = q / torch.clamp(norm / a, min=1.0) if a > 0 else torch.zeros_like(q)
        x = self.x - t * (op.adjoint(self.p) - divergence(self.q))  # D^T q = -div q
        self.x_bar = x + self.params.theta * (x - self.x)
        self.x = x
        data = self.problem.data_fidelity(x)
        tv = tv_norm(x)
        return StepOutput(x, {"loss": data + a * tv, "data": data, "tv": tv})

    def extra_state(self) -> dict:
        return {"x": self.x, "x_bar": self.x_bar, "p": self.p, "q": self.q}

    def load_extra_state(self, state: dict) -> None:
        self.x, self.x_bar = state["x"].to(self.device), state["x_bar"].to(self.device)
        self.p, self.q = state["p"].to(self.device), state["q"].to(self.device)
