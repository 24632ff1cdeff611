"""DIP-ADMM-v2 (Alg. 2 and eq. 31 of the hybrid DIP-ADMM thesis).

Augmented Lagrangian 1/2||b - A G(theta)||^2 + R(x) + rho/2 ||x - G(theta) + u||^2 - rho/2 ||u||^2;
each iteration t (= one step):
    x_{t+1}     = prox_{R/rho}(G(theta_t) - u_t)          (a denoiser in place of the prox)
    theta_{t+1} = one Adam step on 1/2||b - A G(theta)||^2 + rho/2 ||x_{t+1} - G(theta) + u_t||^2
    u_{t+1}     = u_t + x_{t+1} - G(theta_{t+1})
G(theta_{t+1}) is the output the next step computes anyway, so u_{t+1} is formed there:
one forward pass per step, the same updates as Alg. 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recon.solvers import register
from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks, StepOutput
from recon.solvers.common import DEFAULT_STRENGTH, DENOISERS, make_denoiser


@dataclass
class DIPADMMParams(NetworkParams):
    # The method defines its own network and input (thesis Sec. 3.3 and Sec. 3.1): the encoder-
    # decoder 'dip-admm' preset, and z "randomly initialized with standard Gaussian distribution"
    # with the image's size (z in R^n: the image's channels).
    network: str = "dip-admm"
    input_distribution: str = "gaussian"
    input_noise_scale: float = 1.0
    lr: float = 1e-3          # Adam step "with learning rate 0.001": thesis Sec. 3.3
    # "For the penalty coefficient rho, we set it to 1": thesis Sec. 3.3, with the 1/2-scaled data
    # term of eq. 31 and a unit-norm A (a pixel selection): our scaling exactly
    rho: float = 1.0
    denoiser: str = "tv"      # thesis Sec. 4.1 compares with TV; tv | nlm | bm3d (Sec. 3.3)
    strength: float | None = None  # None: the thesis' tuned strength per denoiser (Sec. 3.3, common.py)
    ema_decay: float = 0.9    # r_{t+1} = 0.9 r_t + 0.1 x_t smoothing of the shown result: thesis Sec. 4.2

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.positive("rho")
        c.one_of("denoiser", DENOISERS)
        c.positive("strength", optional=True)


@register
class DIPADMM(NetworkSolver):
    name = "dip-admm"
    Params = DIPADMMParams
    terms = ("data", "coupling")

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        # x-step: prox of R/rho. For TV, R = strength * TV, so the prox weight is strength / rho;
        # other denoisers replace the prox with their tuned noise level (thesis Sec. 3.2.4).
        strength = DEFAULT_STRENGTH[params.denoiser] if params.strength is None else params.strength
        if params.denoiser == "tv":
            strength = strength / params.rho
        self.denoise = make_denoiser(params.denoiser, strength, self.name)
        self.u = torch.zeros(problem.image_shape, device=device)   # dual initialisation u_0 = 0
        self.x = None                                               # x_t of the previous iteration

    def step(self, k: int) -> StepOutput:
        g = self.net(self.network_input())
        if self.params.jitter > 0:
            with torch.no_grad():
                clean = self.net(self.z)
        else:
            clean = g.detach()
        if self.x is not None:
            self.u = self.u + self.x - clean       # u_t = u_{t-1} + x_t - G(theta_t)
        self.x = self.denoise(clean - self.u)      # x_{t+1} = prox_{R/rho}(G(theta_t) - u_t)
        data = self.problem.data_fidelity(g)
        coupling = 0.5 * torch.sum((self.x - g + self.u) ** 2)
        loss = data + self.params.rho * coupling
        self.update(loss)
        return StepOutput(g.detach(), {"loss": loss.detach(), "data": data.detach(),
                                       "coupling": coupling.detach()})

    def extra_state(self) -> dict:
        return {"u": self.u, "x": self.x}

    def load_extra_state(self, state: dict) -> None:
        self.u = state["u"].to(self.device)
        self.x = None if state["x"] is None else state["x"].to(self.device)
