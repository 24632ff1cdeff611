"""Inpainting: y = m * (x + n) with a central box (HIAR) or randomly missing pixels."""
from __future__ import annotations

from recon.operators import restoration as rest
from recon.tasks.base import (RESTORATION_METRICS, SIGMA_OPTION, CliOption, Task, gaussian, generator,
                              noise_sigma, number)


class Inpaint(Task):
    name = "inpaint"
    # HIAR in {0.1, 0.25}: aSeqDIP paper Table 1; 0.25 in its Fig. 5 (used when neither hole_ratio
    # nor missing is given). Noise-free like the paper's inpainting.
    defaults = {"hole_ratio": None, "missing": None, "sigma": 0.0}
    metric_definition = RESTORATION_METRICS
    cli_options = (SIGMA_OPTION,
                   CliOption("hole_ratio", float, "inpaint: central hole area / image area"),
                   CliOption("missing", float, "inpaint: fraction of randomly missing pixels"))

    def validate(self, p):
        noise_sigma(p)
        if p["hole_ratio"] is not None and p["missing"] is not None:
            raise ValueError("inpaint: give either hole_ratio (central box) or missing (random pixels), not both")
        if p["missing"] is not None:
            number(p, "missing", 0.0, 1.0, lo_open=True, hi_open=True)
            return
        if p["hole_ratio"] is None:
            p["hole_ratio"] = 0.25
        number(p, "hole_ratio", 0.0, 1.0, lo_open=True, hi_open=True)

    def build(self, x, p, seed):
        s = noise_sigma(p)
        _, c, h, w = x.shape
        if p["missing"] is not None:
            mask, kind = rest.random_pixel_mask(h, w, p["missing"], generator(seed, "mask")), "random"
        else:
            mask, kind = rest.box_mask(h, w, p["hole_ratio"]), "box"
        op = rest.Mask(mask, channels=c)
        y = op(x + gaussian(x.shape, s, seed))
        return self.problem(op, y, x, 1.0, s, {"mask_kind": kind, "missing_fraction": op.missing_fraction})


TASK = Inpaint()
