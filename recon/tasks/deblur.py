"""Deblurring: y = k * x + n (circular convolution), or s(k * x) + n with a saturation (non-linear)."""
from __future__ import annotations

import math

import torch

from recon.operators import restoration as rest
from recon.tasks.base import (RESTORATION_METRICS, SIGMA_OPTION, CliOption, Task, boolean, choice, gaussian,
                              noise_sigma, number)


class Deblur(Task):
    name = "deblur"
    # Gaussian blur std 3.0 and measurement noise 0.05 on [-1, 1] (= 6.375 on 0-255): DPS (Chung et
    # al. 2023, Sec. 4), whose setting the aSeqDIP paper uses for deblurring. DPS's 61 px kernel
    # exceeds our images; kernel_size None = 2*ceil(3 sigma)+1 (ours); motion: a straight 9 px streak
    # at 45 degrees (ours; DPS draws random trajectories). nonlinear: blur then tanh saturation of
    # gain 2 (ours; the paper's BKSE blur network needs pretrained weights).
    defaults = {"kernel": "gaussian", "kernel_size": None, "kernel_sigma": 3.0, "motion_angle": 45.0,
                "motion_length": None, "nonlinear": False, "gain": 2.0, "sigma": 0.05 / 2 * 255}
    metric_definition = RESTORATION_METRICS
    cli_options = (SIGMA_OPTION,
                   CliOption("kernel", str, "deblur: blur kernel", ("gaussian", "motion")),
                   CliOption("nonlinear", None, "deblur: blur followed by a pointwise saturation"))

    def validate(self, p):
        noise_sigma(p)
        kind = choice(p, "kernel", ("gaussian", "motion"))
        if kind == "gaussian":
            sigma = number(p, "kernel_sigma", 0.0, lo_open=True)
            if p["kernel_size"] is None:
                p["kernel_size"] = 2 * math.ceil(3 * sigma) + 1
        elif p["kernel_size"] is None:
            p["kernel_size"] = 9
        size = number(p, "kernel_size", 1, integer=True)
        if size % 2 == 0:
            raise ValueError(f"parameter 'kernel_size' must be odd, got {size}")
        if p["motion_length"] is not None:
            number(p, "motion_length", 0.0, size, lo_open=True)
        number(p, "motion_angle")
        boolean(p, "nonlinear")
        number(p, "gain", 0.0, lo_open=True)

    def build(self, x, p, seed):
        _, c, h, w = x.shape
        if p["kernel_size"] > min(h, w):
            raise ValueError(f"parameter 'kernel_size' must lie in [1, {min(h, w)}] for a {h}x{w} image, "
                             f"got {p['kernel_size']}")
        kernel = _kernel(p)
        op = (rest.SaturatedBlur(kernel, x.shape, gain=p["gain"]) if p["nonlinear"]
              else rest.Blur(kernel, x.shape))
        s = noise_sigma(p)
        with torch.no_grad():
            y = op(x) + gaussian(x.shape, s, seed)
        return self.problem(op, y, x, 1.0, s, {"kernel": p["kernel"], "nonlinear": p["nonlinear"]})


def _kernel(p: dict) -> torch.Tensor:
    if p["kernel"] == "gaussian":
        return rest.gaussian_kernel(p["kernel_size"], p["kernel_sigma"])
    return rest.motion_kernel(p["kernel_size"], p["motion_length"], p["motion_angle"])


TASK = Deblur()
