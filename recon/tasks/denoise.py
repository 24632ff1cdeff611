"""Denoising: y = x + n, n ~ N(0, sigma^2) per pixel (A = I)."""
from __future__ import annotations

from recon.operators import restoration as rest
from recon.tasks.base import RESTORATION_METRICS, SIGMA_OPTION, Task, gaussian, noise_sigma


class Denoise(Task):
    name = "denoise"
    # sigma in {15, 25} on the 0-255 scale: aSeqDIP paper Table 1; 25 in its Fig. 5
    defaults = {"sigma": 25.0}
    metric_definition = RESTORATION_METRICS
    cli_options = (SIGMA_OPTION,)

    def validate(self, p):
        noise_sigma(p)

    def build(self, x, p, seed):
        s = noise_sigma(p)
        # no clipping: the noise stays Gaussian with the stated sigma (DIP's public code clips)
        y = x + gaussian(x.shape, s, seed)
        return self.problem(rest.Identity(x.shape), y, x, 1.0, s, {})


TASK = Denoise()
