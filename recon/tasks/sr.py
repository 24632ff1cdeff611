"""Super-resolution: y = D(k * x) + n, Lanczos-2 antialiasing then decimation by `factor`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recon.operators import restoration as rest
from recon.tasks.base import RESTORATION_METRICS, SIGMA_OPTION, CliOption, Task, gaussian, noise_sigma, number


class SuperResolution(Task):
    name = "sr"
    # x4 is DIP's main super-resolution setting (Ulyanov et al. 2018, Sec. 4), noise-free
    defaults = {"factor": 4, "sigma": 0.0}
    metric_definition = RESTORATION_METRICS
    cli_options = (SIGMA_OPTION, CliOption("factor", int, "sr: downsampling factor (2 or 4)"))

    def validate(self, p):
        noise_sigma(p)
        number(p, "factor", 2, integer=True)

    def build(self, x, p, seed):
        s = noise_sigma(p)
        op = rest.Downsample(p["factor"], x.shape)
        with torch.no_grad():
            clean = op(x)
        y = clean + gaussian(clean.shape, s, seed)  # physical: the low-resolution image itself
        return self.problem(op, y, x, 1.0, s, {"low_res_shape": list(y.shape[-2:])})

    @torch.no_grad()
    def degraded_image(self, problem):
        """The low-resolution image upsampled (bicubic) to the image size."""
        x = F.interpolate(problem.physical_measurements().float(), size=tuple(problem.image_shape[2:]),
                          mode="bicubic", align_corners=False)
        return problem.display(x)


TASK = SuperResolution()
