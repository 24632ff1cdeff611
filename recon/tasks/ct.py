"""2-D parallel-beam sparse-view CT: post-log data y = A x (+ noise), simulated or a measured sinogram.

Physical scale: sinograms are line integrals in pixel units (unit pixel size), FBP returns the
attenuation image. The operator solvers see is A / ||A|| (||A||^2 ~ 513 at 32 px / 18 views,
~1029 at 64 px), computed once per geometry; `Problem.measurement_scale` keeps ||A||.
Metrics inside the reconstruction disc, as the DIP-for-CT chapter's code scores.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from recon.operators import ct as ct_ops
from recon.tasks.base import PRESET_OPTION, CliOption, Task, as_reference, boolean, choice, gaussian, generator, number

SIMULATED_DEFAULTS = {
    # named noise setting (PRESETS below)
    "preset": "noise-free",
    # 18 views (aSeqDIP Table 1: 18 or 30)
    "views": 18,
    # incident photons per ray I0 (None: noise-free post-log data)
    "photons": None,
    # images in [0, 1] scaled to attenuation coefficients as in LoDoPaB-CT when photons are given
    "attenuation": ct_ops.LODOPAB_ATTENUATION,
    # std of additive Gaussian noise relative to the mean |A x| (0: none)
    "noise": 0.0,
    # field of view = the inscribed disc (skimage's convention)
    "circle": True,
    "filter": "ramp",
}

PRESETS = {
    # the aSeqDIP paper's setting (Sec. 4): noise-free post-log data, I0 "assumed 1 for simplicity"
    "noise-free": {"photons": None},
    # post-log Poisson noise at I0 = 4096 photons per ray: LoDoPaB-CT's low-dose data (Leuschner et
    # al. 2021, Sci. Data 8:109, "Methods"), with its attenuation scaling
    "low-dose": {"photons": ct_ops.LODOPAB_PHOTONS},
}

MEASURED_DEFAULTS = {
    "angles": None,       # degrees, one per sinogram row; None: equispaced over 180
    "size": None,         # image side in pixels; None: the number of detectors
    "circle": True,
    "filter": "ramp",
    "pixel_size": 1.0,    # in the sinogram's length unit: line integrals / pixel_size = pixel units
}


class CT(Task):
    name = "ct"
    defaults = SIMULATED_DEFAULTS
    measured_defaults = MEASURED_DEFAULTS
    presets = PRESETS
    # z0 = A^H y with the unit-norm A (aSeqDIP paper, Algorithm 1); 'fbp' stays an option
    default_input = "adjoint"
    gray_only = True
    metric_definition = ("PSNR and SSIM inside the reconstruction disc (pixels with distance <= N//2 from "
                         "pixel (N//2, N//2)), data range = the reference's maximum inside the disc, as "
                         "MaskedPSNR in the DIP-for-CT chapter's code (alexdenker/deep-image-prior-handbook, "
                         "dip/model/utils.py); SSIM = scikit-image's SSIM map (7x7 uniform window) averaged "
                         "over the disc (the chapter's code has no SSIM). psnr_full / ssim_full: the same over "
                         "the whole square.")
    cli_options = (
        CliOption("views", int, "ct: number of projection angles over 180 degrees"),
        CliOption("photons", float, "ct: incident photons per ray (Poisson noise); none = noise-free"),
        PRESET_OPTION,
    )

    # ---- parameters ---------------------------------------------------------------------------
    def validate(self, p):
        number(p, "views", 1, integer=True)
        if p["photons"] is not None:
            number(p, "photons", 0.0, lo_open=True)
        number(p, "attenuation", 0.0, lo_open=True)
        number(p, "noise", 0.0)
        boolean(p, "circle")
        choice(p, "filter", ct_ops.FILTERS)

    def validate_measured(self, p):
        if p["angles"] is not None:
            angles = np.asarray(p["angles"], dtype=object).reshape(-1)
            if angles.size == 0 or not all(isinstance(a, numbers.Real) and not isinstance(a, bool)
                                           and np.isfinite(a) for a in angles):
                raise ValueError(f"parameter 'angles' must be a non-empty list of finite numbers (degrees), "
                                 f"got {p['angles']!r}")
        if p["size"] is not None:
            number(p, "size", 2, integer=True)
        boolean(p, "circle")
        choice(p, "filter", ct_ops.FILTERS)
        number(p, "pixel_size", 0.0, lo_open=True)

    # ---- simulation ---------------------------------------------------------------------------
    def build(self, x, p, seed):
        _, _, h, w = x.shape
        if h != w:
            raise ValueError(f"ct needs a square image, got {h}x{w}")
        op = ct_ops.ray_transform(h, views=p["views"], circle=p["circle"], filter_name=p["filter"])
        # outside the field-of-view disc the scanner measures nothing consistent: zero ground truth
        gt = x * op.disc if p["circle"] else x
        with torch.no_grad():
            clean = op(gt)
        y = ct_ops.post_log_measurements(clean, h, p["photons"], p["attenuation"], generator(seed, "poisson"))
        std = p["noise"] * float(clean.abs().mean())
        y = y + gaussian(y.shape, std, seed)
        meta = {"views": p["views"], "detectors": op.detectors, "angles_deg": op.angles.tolist(),
                "photons": p["photons"], "noise_std": std, "masked_outside_disc": p["circle"]}
        sigma = std if p["photons"] is None else None  # Poisson noise varies per ray: no single sigma
        return self._problem(op, y, gt, sigma, meta)

    # ---- measured sinogram --------------------------------------------------------------------
    def measured(self, sinogram, p, reference, seed):
        """A post-log sinogram (views, detectors) in physical units; reference: the attenuation
        image (N, N) if known."""
        s = torch.as_tensor(np.asarray(sinogram)).float()
        if s.dim() != 2:
            raise ValueError(f"ct sinogram must be (views, detectors), got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError("ct sinogram has NaN or infinite values")
        views, detectors = s.shape
        if p["angles"] is None:
            angles = ct_ops.equispaced_angles(views)
        else:
            angles = np.asarray(p["angles"], dtype=np.float64).reshape(-1)
            if angles.size != views:
                raise ValueError(f"parameter 'angles' has {angles.size} entries, the sinogram {views} views (rows)")
        size = detectors if p["size"] is None else p["size"]
        op = ct_ops.ray_transform(size, angles=angles, circle=p["circle"], detectors=detectors,
                                 filter_name=p["filter"])
        ref = as_reference(reference, (size, size), "ct measurements")
        gt = None if ref is None else ref[None, None]
        meta = {"views": views, "detectors": detectors, "angles_deg": angles.tolist()}
        return self._problem(op, (s / p["pixel_size"])[None, None], gt, None, meta)

    def _problem(self, op, y, gt, sigma, meta):
        disc = op.disc.bool() if op.circle else None
        data_range = 1.0 if gt is None else _data_range(gt, disc)
        return self.problem(op, y, gt, data_range, sigma, meta, fbp=op.fbp, metric_mask=disc)

    @torch.no_grad()
    def degraded_image(self, problem):
        """FBP of the physical sinogram."""
        return problem.display(problem.fbp_image().float())


def _data_range(gt: torch.Tensor, disc: torch.Tensor | None) -> float:
    """The reference's maximum inside the disc (`MaskedPSNR`: data_range = x_masked.max())."""
    inside = gt[0, 0][disc] if disc is not None else gt
    return max(float(inside.max()), 1e-12)


TASK = CT()
