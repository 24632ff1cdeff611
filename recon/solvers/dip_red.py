"""DIP + RED by accelerated proximal gradient (Alg. 5 of the CT chapter; DeepRED, Mataev et al.
2019; APG form of Reehorst & Schniter 2018).

Block k: N_sub Adam steps on 1/2||A f(z) - y||^2 + lambda L/2 ||f(z) - u^(k-1)||^2, then with
x^(k) = f(z):  t_k = (1 + sqrt(1 + 4 t_{k-1}^2)) / 2,
               v = x^(k) + (t_{k-1} - 1) / t_k (x^(k) - x^(k-1)),
               u^(k) = D(v) / L - (1 - L) / L v      (Alg. 5 lines 8-10; u^(0) = 0, t_0 = 1).
The chapter's public code writes the last line as D(v)/L - (1 - 1/L) v, which differs from
Alg. 5 unless L = 1; we follow the paper (u is then a convex mix of D(v) and v).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon.solvers import register
from recon.solvers.base import OptionChecks
from recon.solvers.common import make_denoiser
from recon.solvers.splitting import BlockParams, BlockSolver


@dataclass
class DIPREDParams(BlockParams):
    # Alg. 5 needs L > 1 and lambda > 0 but the chapter's text gives no values. L = 1.2: its code
    # (overeng_rundip.py --mixing_weight), a dimensionless mixing constant that carries over. Its
    # lambda (0.01 / n against a data term divided by ||A||^4 of the walnut operator) does not.
    # Project choice (not tuned): lambda = 1 / L, so the coupling weight lambda L = 1 is the
    # DIP-ADMM thesis' penalty rho = 1 (Sec. 3.3) in our scaling.
    lam: float = 1 / 1.2
    L: float = 1.2
    # None: the strength tuned per denoiser in the DIP-ADMM thesis Sec. 3.3 (NLM: sigma 0.01)
    strength: float | None = None

    ALIASES = {"lambda": "lam", "N": "inner_steps", "N_sub": "inner_steps"}

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.nonnegative("lam")
        c.at_least(1, "L", strict=True)  # Alg. 5
        c.positive("strength", optional=True)


@register
class DIPRED(BlockSolver):
    name = "dip-red"
    Params = DIPREDParams

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        self.denoise = make_denoiser(params.denoiser, params.strength, self.name)
        self.t = 1.0                                                   # t_0 = 1
        self.previous = torch.zeros(problem.image_shape, device=device)  # x^(0) (weight t_0 - 1 = 0)

    def weight(self, block: int) -> float:
        return self.params.lam * self.params.L

    def outer_update(self, x: torch.Tensor, block: int) -> None:
        L = self.params.L
        t = (1 + math.sqrt(1 + 4 * self.t ** 2)) / 2
        v = x + (self.t - 1) / t * (x - self.previous)
        self.target = self.denoise(v) / L - (1 - L) / L * v
        self.t, self.previous = t, x

    def extra_state(self) -> dict:
        return {**super().extra_state(), "t": self.t, "previous": self.previous}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.t, self.previous = float(state["t"]), state["previous"].to(self.device)
