"""Block splitting schemes of the CT chapter: N_sub Adam steps on
    1/2||A f(z) - y||^2 + w_k/2 ||f(z) - target_k||^2
per outer iteration k, then an outer update of the target from x^(k) = f(z) (HQS: Alg. 4 and
eqs. 32-33; RED by APG: Alg. 5; ADMM with a denoiser: Alg. 6). The budget is `steps` =
K * N_sub Adam updates.

x^(k) is the output of the network after the last update of block k, which is exactly the
output the first step of block k+1 computes anyway, so the outer update runs at the start of
that step and costs no extra forward pass (one more with input jitter, which needs f(z) itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks, StepOutput
from recon.solvers.common import DENOISERS, blocks, geometric, make_denoiser


@dataclass
class BlockParams(NetworkParams):
    inner_steps: int = 10   # N_sub = 10: the CT chapter's code (overeng_rundip.py --num_inner_steps)
    denoiser: str = "nlm"   # tv | nlm | bm3d (the chapter's DRUNet needs trained weights: not used)

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.at_least(1, "inner_steps")
        c.one_of("denoiser", DENOISERS)


class BlockSolver(NetworkSolver):
    """Shared step of the block schemes; subclasses give the weight, target and outer update."""

    terms = ("data", "coupling")

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        self.target = torch.zeros(problem.image_shape, device=device)  # u^(0) = 0 in Algs. 4-6

    def weight(self, block: int) -> float:
        raise NotImplementedError

    def outer_update(self, x: torch.Tensor, block: int) -> None:
        """End of block `block - 1`: x = f(z); set the target of block `block`."""
        raise NotImplementedError

    def step(self, k: int) -> StepOutput:
        x = self.net(self.network_input())
        block, inner = divmod(k, self.params.inner_steps)
        if block > 0 and inner == 0:
            if self.params.jitter > 0:
                with torch.no_grad():
                    clean = self.net(self.z)
            else:
                clean = x.detach()
            self.outer_update(clean, block)
        data = self.problem.data_fidelity(x)
        coupling = 0.5 * torch.sum((x - self.target) ** 2)
        loss = data + self.weight(block) * coupling
        self.update(loss)
        return StepOutput(x.detach(), {"loss": loss.detach(), "data": data.detach(),
                                       "coupling": coupling.detach()})

    def extra_state(self) -> dict:
        return {"target": self.target}

    def load_extra_state(self, state: dict) -> None:
        self.target = state["target"].to(self.device)


# ---- HQS (Alg. 4, eqs. 32-33) -----------------------------------------------------------------
@dataclass
class HQSParams(BlockParams):
    # The chapter prescribes an increasing mu_k = lambda / alpha_k (Alg. 4 line 3, Sec. 4.2) but
    # gives no numbers. From its code (overeng_rundip.py, tv_hqs): N_sub = 10 (the BlockParams
    # default) and alpha_k geometric from 0.5 down to 0.01; alpha_k is the weight of a prox on the
    # image's scale (argmin_u 1/2||u - x||^2 + alpha TV(u)), so it carries over unchanged. Its
    # lambda = 0.5 does not: it weighs a per-pixel mean ||x - u||^2 / n against a data term divided
    # by ||A||^4 (power iteration gives ||A||^2, squared again), i.e. our lambda would be
    # 0.5 ||A_walnut||^2 / 501^2 with a norm the code does not report.
    # TUNED: lambda = 0.1 (mu_k from 0.2 to 10), the best of 0.001 / 0.01 / 0.1 / 1 on tuning images
    # (docs/tuning.md; manifests/tuning/weights.yaml and weights-extension.yaml).
    alpha_start: float = 0.5
    alpha_end: float = 0.01
    lam: float = 0.1
    # alpha_k is the prox weight: the TV weight for 'tv'; for a Gaussian denoiser (nlm, bm3d) the
    # prox of weight alpha is denoising at noise variance alpha, so sigma_k = sqrt(alpha_k).
    denoiser: str = "tv"

    ALIASES = {"lambda": "lam", "N": "inner_steps", "N_sub": "inner_steps"}

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.positive("alpha_start", "alpha_end")
        c.nonnegative("lam")


class HQSSolver(BlockSolver):
    def alpha(self, block: int) -> float:
        p = self.params
        total = getattr(self, "total_steps", None) or self.default_steps
        return geometric(p.alpha_start, p.alpha_end, block, blocks(total, p.inner_steps))

    def weight(self, block: int) -> float:
        return self.params.lam / self.alpha(block)  # mu_k = lambda / alpha_k (Alg. 4 line 3)

    def outer_update(self, x: torch.Tensor, block: int) -> None:
        a = self.alpha(block - 1)  # the alpha_k of the block that just ended (Alg. 4 line 9)
        strength = a if self.params.denoiser == "tv" else math.sqrt(a)
        self.target = make_denoiser(self.params.denoiser, strength, self.name)(x)


# ---- ADMM with a denoiser (Alg. 6) --------------------------------------------------------------
@dataclass
class ADMMParams(BlockParams):
    # beta = 1: the ADMM penalty rho = 1 of the DIP-ADMM thesis (Sec. 3.3) for the same coupling
    # rho/2 ||x - G + u||^2 with a 1/2-scaled data term and a unit-norm A: our scaling. The CT
    # chapter's text gives no value; its code's admm_weight 10 / n (a data term divided by ||A||^4
    # of its walnut operator) does not carry over.
    beta: float = 1.0
    # None: the strength tuned per denoiser in the DIP-ADMM thesis Sec. 3.3 (common.DEFAULT_STRENGTH)
    strength: float | None = None

    ALIASES = {"N": "inner_steps", "N_sub": "inner_steps", "rho": "beta"}

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.nonnegative("beta")
        c.positive("strength", optional=True)


class ADMMSolver(BlockSolver):
    """Alg. 6: coupling beta/2 ||f(z) - u + mu||^2; u = D(x + mu), mu += x - u per block."""

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        self.denoise = make_denoiser(params.denoiser, params.strength, self.name)
        self.u = torch.zeros(problem.image_shape, device=device)
        self.dual = torch.zeros(problem.image_shape, device=device)  # mu^(0) = 0

    def weight(self, block: int) -> float:
        return self.params.beta

    def outer_update(self, x: torch.Tensor, block: int) -> None:
        self.u = self.denoise(x + self.dual)     # Alg. 6 line 9
        self.dual = self.dual + (x - self.u)      # line 10
        self.target = self.u - self.dual          # ||x - u + mu||^2 = ||x - (u - mu)||^2

    def extra_state(self) -> dict:
        return {**super().extra_state(), "u": self.u, "dual": self.dual}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.u, self.dual = state["u"].to(self.device), state["dual"].to(self.device)
