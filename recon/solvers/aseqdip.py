"""Autoencoding Sequential DIP (aSeqDIP): Alg. 1 of Alkhouri et al. 2024 / Alg. 8 of the CT chapter.

Block k (k = 1..K) warm-starts the network from block k-1 and takes N Adam steps on
    1/2 ||A f(z_{k-1}) - y||^2 + lambda/2 ||f(z_{k-1}) - z_{k-1}||^2,
then sets z_k = f(z_{k-1}). The budget is `steps` = N*K optimiser updates; the result is z_K.

Paper vs public code: the public aSeqDIP notebook computes the autoencoding term but leaves it
out of the loss it back-propagates; we follow the paper and minimise both terms (a test checks it).
We use the chapter's 1/2-scaled terms; the paper's unscaled form has the same minimiser and ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from recon.solvers import register
from recon.problem import IMAGE_INPUTS
from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks


@dataclass
class ASeqDIPParams(NetworkParams):
    ALIASES: ClassVar[dict] = {"lambda": "lam", "N": "inner_steps"}

    # lambda = 1: paper Sec. 4.1 "Setup" (ablation App. C.4), for ||A f - y||^2 + lambda ||f - z||^2
    # (eq. 3); halving both terms keeps the ratio, so 1 is our 1/2-scaled lambda too. The public
    # denoising script weighs two per-pixel MSEs 1:1, the same ratio where y is an image; its CT and
    # MRI scripts use unsquared norms, N = 10 and lr 2e-4 / 1e-4: they depart from the paper, which we follow.
    lam: float = 1.0
    inner_steps: int = 2      # N = 2 (K = steps / N = 2000 at 4000 steps): App. C.5
    lr: float = 1e-4          # Adam, beta = 1e-4: paper Sec. 4.1 "Setup" (also the chapter's code)
    # network: the shared default, the CT chapter's U-Net (Sec. 6.2), so aSeqDIP compares with the
    # other methods on one network. The paper says only "U-Net [19]"; its public code uses a
    # Pytorch-UNet (64-1024 channels) with N(0, 0.02) weight initialisation.
    input: str = "auto"       # z0: Problem.initial_image('auto'), y for restoration, A^H y for MRI and CT (Sec. 3.2)

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.one_of("input", IMAGE_INPUTS, " (z_0 is an image, Sec. 3.2)")
        c.nonnegative("lam")
        c.at_least(1, "inner_steps")


@register
class ASeqDIP(NetworkSolver):
    name = "aseqdip"
    Params = ASeqDIPParams
    packable = True
    terms = ("data", "autoencoding")

    def initial_input(self) -> torch.Tensor:
        return self.image_input()  # z_0: never a noise input (Sec. 3.2)

    def objective(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        data = self.problem.data_fidelity(x)
        autoencoding = 0.5 * torch.sum((x - self.z) ** 2)
        return {"loss": data + p.lam * autoencoding, "data": data, "autoencoding": autoencoding}

    def refresh_input(self, k: int) -> bool:
        self.in_block = (k + 1) % self.params.inner_steps != 0
        return not self.in_block  # end of block: z_k = f_{phi_k}(z_{k-1})

    in_block = False

    def final_image(self) -> torch.Tensor:
        if not self.in_block:
            return self.z  # z_K: Alg. 1 returns f_{phi_K}(z_{K-1})
        return super().final_image()  # budget not a multiple of N: evaluate the open block

    def extra_state(self) -> dict:
        return {"in_block": self.in_block}

    def load_extra_state(self, state: dict) -> None:
        self.in_block = bool(state["in_block"])
