"""Self-Guided DIP (Liang et al. 2025; Alg. 7 and eqs. 34-35 of the CT chapter).

Each step draws N_eta input perturbations eta_i ~ U(0, m), m = max|z| / 2, averages
x~ = 1/N_eta sum_i f_theta(z + eta_i), and takes one Adam step on both theta and the input z of
    1/2 ||A x~ - y||^2 + lambda/2 ||x~ - z||^2,
then updates x^(k) = gamma x^(k-1) + (1 - gamma) x~ with x^(0) = 0 (Alg. 7 line 6). x^(k) is the
iterate the method reports (and its metrics are computed on); the result is x^(N_max).
The draws come from the solver's seeded generator, so runs repeat exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recon.solvers import register
from recon.problem import IMAGE_INPUTS
from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks


@dataclass
class SelfGuidedParams(NetworkParams):
    # network and lr (1e-4 for theta): the shared defaults of NetworkParams (the CT chapter, Sec. 6.2)
    input: str = "auto"       # z initialised from Problem.initial_image('auto') (A^H y / y), then learnt
    # lambda: the chapter's Alg. 7 and the aSeqDIP paper's eq. (2) leave it open (lambda > 0). The
    # chapter's code (selfg_dip.py) weighs 0.01 N_eta sum_i ||f(z + eta_i) - z||^2 against a data
    # term divided by ||A||^4 of its walnut operator (norm not reported): that value does not carry
    # over. TUNED: 1.0, the best of 0.1 / 1 / 10 on tuning images (docs/tuning.md,
    # manifests/tuning/weights.yaml).
    lam: float = 1.0
    n_eta: int = 4            # N_eta = 4 noise draws per step: the chapter's code (overeng_rundip.py, selfg_dip.py)
    # eta ~ U(0, m), m = max|z| / 2: the chapter's text, Sec. 4.4 (after Liang et al.); its code
    # uses m = 0.01 max z (run_dip.py --relative_noise): text and code disagree, we follow the text
    noise_fraction: float = 0.5
    gamma: float = 0.99       # EMA weight gamma of eq. (35) / alpha of Alg. 7: the chapter's code (0.99)
    # Adam lr for z: 1e-2 in the chapter's driver of its Table 2 (overeng_rundip.py --lr_z; selfg_dip.py
    # falls back to 1e-1). Adam's step does not depend on the loss scale, so it carries over.
    lr_z: float = 1e-2

    ALIASES = {"lambda": "lam", "alpha": "gamma", "N_eta": "n_eta"}

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.one_of("input", IMAGE_INPUTS, " (z starts from an image and is learnt)")
        c.nonnegative("lam")
        c.at_least(1, "n_eta")
        c.between("gamma", 0, 1)
        c.positive("noise_fraction", "lr_z")
        if self.jitter != 0:
            c.fail("jitter", "0 (the method perturbs its input by eta itself)")


@register
class SelfGuidedDIP(NetworkSolver):
    name = "self-guided"
    Params = SelfGuidedParams
    packable = True
    terms = ("data", "self_guidance")

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        # z is learnt with its own learning rate: one Adam over two parameter groups
        self.optimizer = torch.optim.Adam([{"params": list(self.net.parameters())},
                                           {"params": [self.z], "lr": params.lr_z}], lr=params.lr)
        self.average = torch.zeros(problem.image_shape, device=device)  # x^(0) = 0 (Alg. 7 line 1)

    def initial_input(self) -> torch.Tensor:
        z = self.image_input()
        return torch.nn.Parameter(z.clone())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.net.parameters(), self.z]

    def network_input(self) -> torch.Tensor:
        """N_eta perturbed copies z + eta_i, eta_i ~ U(0, m), m = noise_fraction * max|z|."""
        p = self.params
        zs = self.z.expand(p.n_eta, *self.z.shape[1:])
        m = p.noise_fraction * self.z.detach().abs().max()
        eta = m * torch.rand(zs.shape, generator=self.generator, device=self.device)
        return zs + eta

    def objective(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = x.mean(dim=0, keepdim=True)  # x~ = 1/N_eta sum_i f(z + eta_i)
        data = self.problem.data_fidelity(mean)
        guidance = 0.5 * torch.sum((mean - self.z) ** 2)
        return {"loss": data + self.params.lam * guidance, "data": data, "self_guidance": guidance}

    def iterate(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.params.gamma
        self.average = gamma * self.average + (1 - gamma) * x.mean(dim=0, keepdim=True)
        return self.average

    def final_image(self) -> torch.Tensor:
        return self.average  # x^(N_max) of Alg. 7

    def extra_state(self) -> dict:
        return {"average": self.average}

    def load_extra_state(self, state: dict) -> None:
        self.average = state["average"].to(self.device)
