"""Multi-coil Cartesian MRI: y = M F S x + n (aSeqDIP paper Sec. 2), simulated or measured (fastMRI).

Images are complex, carried as 2 real channels (real, imag); people see and metrics use the
magnitude. The operator is A = M F S with the orthonormal FFT and coil maps with sum |S|^2 = 1,
so ||A|| is 1 up to the mask (normalised to exactly 1 by power iteration like every task).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from recon.operators import mri as mri_ops
from recon.tasks.base import (PRESET_OPTION, CliOption, Task, as_reference, boolean, choice, generator, number,
                              optional_number)

SIMULATED_DEFAULTS = {
    # named noise setting (PRESETS below)
    "preset": "noise-free",
    # 4x with the fastMRI centre fraction for it (Zbontar et al. 2018; aSeqDIP Table 1 uses 4x and 8x)
    "acceleration": 4,
    "center_fraction": None,   # None: 0.32 / acceleration (fastMRI's 0.08 at 4x, 0.04 at 8x)
    # 4 simulated coils (ours: the paper's 15 measured coils need no simulation)
    "coils": 4,
    # equispaced masks, as fastMRI multi-coil data
    "mask": "equispaced",
    # std per real / imaginary part of complex Gaussian k-space noise (0: none), or snr_db
    "noise": 0.0,
    "snr_db": None,
    # a smooth phase of peak pi/4 rad makes the ground truth genuinely complex (ours)
    "phase": math.pi / 4,
}

PRESETS = {
    # retrospective undersampling of the ground truth without added noise, as the aSeqDIP
    # paper's simulated setting (Sec. 4; measured fastMRI k-space brings its own noise)
    "noise-free": {"snr_db": None},
    # complex Gaussian k-space noise at 30 dB SNR (signal energy of the sampled k-space over the
    # noise's expected energy): our choice, a visible but moderate level; no paper in
    # ../shared/papers states one
    "noisy": {"snr_db": 30.0},
}

MEASURED_DEFAULTS = {
    # 'auto': the file's own mask when undersampled; fully sampled k-space (fastMRI train/val) is
    # undersampled retrospectively at the simulated default (4x). None keeps it fully sampled.
    "acceleration": "auto",
    "center_fraction": None,
    "mask": "equispaced",
    "sensitivities": "acs",    # coil maps from the calibration region ('espirit' needs sigpy)
    "normalise": True,         # scale so the reference (else the zero-filled image) peaks at 1
    "coils": None,             # accepted and ignored: measured k-space brings its own coils
}


class MRI(Task):
    name = "mri"
    defaults = SIMULATED_DEFAULTS
    measured_defaults = MEASURED_DEFAULTS
    presets = PRESETS
    default_input = "adjoint"  # z0 = A^H y (aSeqDIP paper, Algorithm 1)
    gray_only = True
    metric_definition = ("PSNR and SSIM of the magnitude image over the whole frame, data range = the "
                         "reference magnitude's maximum (fastMRI's convention, Zbontar et al. 2018); SSIM "
                         "with scikit-image's defaults (7x7 uniform window).")
    cli_options = (
        CliOption("acceleration", int, "mri: undersampling factor (e.g. 4, 8)"),
        CliOption("coils", int, "mri: simulated coils (ignored for measured k-space)"),
        CliOption("mask", str, "mri: sampling pattern", ("equispaced", "random")),
        CliOption("center_fraction", float, "mri: fully sampled centre fraction"),
        PRESET_OPTION,
    )

    # ---- parameters ---------------------------------------------------------------------------
    def validate(self, p):
        _check_mask_params(p)
        number(p, "coils", 1, integer=True)
        number(p, "noise", 0.0)
        optional_number(p, "snr_db")
        if p["snr_db"] is not None and p["noise"] > 0:
            raise ValueError("mri: give either 'noise' (a std) or 'snr_db', not both")
        number(p, "phase", 0.0, math.pi)

    def validate_measured(self, p):
        if p["acceleration"] in ("auto", None):
            choice(p, "mask", ("equispaced", "random"))
        else:
            _check_mask_params(p)
        choice(p, "sensitivities", ("acs", "espirit"))
        boolean(p, "normalise")

    # ---- simulation ---------------------------------------------------------------------------
    def build(self, x, p, seed):
        _, _, h, w = x.shape
        mask = _mask(p, w, seed)
        sens, coil_draw = _coil_maps(p["coils"], h, w, seed)
        op = mri_ops.MultiCoilMRI(sens, mask)
        # complex ground truth: the magnitude image with a smooth phase (as real MR images have)
        z = x[:, 0:1].to(torch.complex64) * torch.polar(torch.ones(h, w), _smooth_phase(h, w, p["phase"], seed))
        gt = mri_ops.to_channels(z)
        with torch.no_grad():
            clean = op(gt)
        noise = p["noise"] if p["snr_db"] is None else kspace_noise_std(clean, op.mask, p["snr_db"])
        gen = generator(seed, "noise")
        n = torch.complex(torch.randn(clean.shape, generator=gen), torch.randn(clean.shape, generator=gen))
        y = clean + op.mask * noise * n
        meta = {"coils": p["coils"], "acceleration_effective": op.acceleration, "sampled_columns": int(mask.sum()),
                "sensitivities": "birdcage" if p["coils"] > 1 else "none", "coil_draw": coil_draw, "noise_std": noise,
                "snr_db": p["snr_db"]}
        return self.problem(op, y, gt, float(z.abs().max()), noise, meta)

    # ---- measured k-space ---------------------------------------------------------------------
    def measured(self, kspace, p, reference, seed):
        """k-space, complex (coils, H, W) or (H, W) (single coil), e.g. fastMRI; an object with a
        `kspace` attribute (and optionally `reference`) is accepted too. A magnitude `reference`
        (H, W), e.g. fastMRI `reconstruction_rss`, becomes the ground truth's magnitude (phase 0);
        without it, fully sampled data give the coil-combined complex image (meta says which).
        Undersampled data without a reference have no ground truth."""
        if hasattr(kspace, "kspace"):
            reference = getattr(kspace, "reference", None) if reference is None else reference
            kspace = kspace.kspace
        k = _as_kspace(kspace)
        coils, h, w = k.shape
        sampled = k.abs().sum(dim=(0, 1)) > 0
        if not sampled.any():
            raise ValueError("mri k-space is all zeros")
        fully = bool(sampled.all())
        if p["acceleration"] == "auto":
            p["acceleration"] = self.defaults["acceleration"] if fully else None
            if p["acceleration"] is not None:
                _check_mask_params(p)
        if p["acceleration"] is not None and not fully:
            raise ValueError(f"mri k-space is already undersampled ({int(sampled.sum())} of {w} columns); "
                             "drop 'acceleration' to use its own mask")
        mask = _mask(p, w, seed) if p["acceleration"] is not None else sampled
        y = k * mask
        sens = _sensitivities(y, mask, p["sensitivities"]) if coils > 1 else torch.ones(1, h, w, dtype=torch.complex64)
        op = mri_ops.MultiCoilMRI(sens, mask)
        meta = {"coils": coils, "fully_sampled_input": fully, "acceleration_effective": float(w / mask.sum()),
                "sensitivities": p["sensitivities"] if coils > 1 else "none"}
        gt = _measured_ground_truth(as_reference(reference, (h, w), "mri measurements"), fully, sens, k, w, meta)
        scale = _normalisation(gt, op, y) if p["normalise"] else 1.0
        meta["scale"] = scale
        gt = None if gt is None else gt * scale
        data_range = 1.0 if gt is None else float((gt[:, :1] ** 2 + gt[:, 1:] ** 2).sqrt().max())
        return self.problem(op, y[None] * scale, gt, data_range, None, meta)

    @torch.no_grad()
    def degraded_image(self, problem):
        """The zero-filled magnitude image, physical A^H y."""
        return problem.display(problem.physical_adjoint_image().float())


def _check_mask_params(p: dict) -> None:
    acc = number(p, "acceleration", 1.0)
    if p["center_fraction"] is None:
        p["center_fraction"] = mri_ops.default_center_fraction(acc)
    cf = number(p, "center_fraction", 0.0, 1.0, lo_open=True)
    if cf > 1.0 / acc:
        raise ValueError(f"parameter 'center_fraction' = {cf} exceeds 1/acceleration = {1 / acc:.3f}: the fully "
                         "sampled centre alone would exceed the sampling budget")
    choice(p, "mask", ("equispaced", "random"))


def _mask(p: dict, width: int, seed: int) -> torch.Tensor:
    return mri_ops.make_mask(p["mask"], width, p["acceleration"], p["center_fraction"],
                             generator(seed, "mask").initial_seed())


def _coil_maps(coils: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Birdcage maps drawn per scan (ours; a fixed array would give every scan of a cohort the same
    coil geometry): the array rotated by U(0, 2 pi), its centre shifted by U(-0.1, 0.1) of the half
    field of view in each direction, its radius U(1.3, 1.7) (sigpy's default 1.5 in the middle) and a
    constant phase U(0, 2 pi) per coil. Still sum_c |S_c|^2 = 1 per pixel. Returns the maps and the
    drawn values (JSON-friendly, for the problem's meta)."""
    if coils == 1:
        return mri_ops.birdcage_sensitivities(1, h, w), {}
    u = torch.rand(4 + coils, generator=generator(seed, "coils"), dtype=torch.float64)
    draw = {"rotation": float(2 * math.pi * u[0]), "centre": [float(0.2 * u[1] - 0.1), float(0.2 * u[2] - 0.1)],
            "radius": float(1.3 + 0.4 * u[3]), "phases": [float(v) for v in 2 * math.pi * u[4:]]}
    sens = mri_ops.birdcage_sensitivities(coils, h, w, radius=draw["radius"], rotation=draw["rotation"],
                                          centre=tuple(draw["centre"]), phases=torch.tensor(draw["phases"]))
    return sens, draw


def _smooth_phase(h: int, w: int, peak: float, seed: int) -> torch.Tensor:
    """A random second-order polynomial phase map with max |phase| = peak (radians)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * yy, xx ** 2, yy ** 2])
    coef = torch.randn(6, generator=generator(seed, "phase"), dtype=torch.float64)
    phi = torch.einsum("k,khw->hw", coef, basis)
    return (peak * phi / phi.abs().max().clamp(min=1e-12)).float()


def kspace_noise_std(clean: torch.Tensor, mask: torch.Tensor, snr_db: float) -> float:
    """Std per real / imaginary part of complex Gaussian noise giving `snr_db` =
    10 log10(||M F S x||^2 / E||M n||^2) over the sampled k-space (E||M n||^2 = 2 std^2 per sample)."""
    sampled = float(mask.expand_as(clean).sum())
    energy = float((clean.abs() ** 2).sum())
    return math.sqrt(energy / (2.0 * sampled * 10 ** (snr_db / 10)))


def _as_kspace(kspace) -> torch.Tensor:
    k = torch.as_tensor(np.asarray(kspace))
    if not k.is_complex():
        raise ValueError(f"mri k-space must be complex, got dtype {k.dtype}")
    if k.dim() == 2:
        k = k[None]
    if k.dim() != 3:
        raise ValueError(f"mri k-space must be (coils, H, W) or (H, W), got shape {tuple(k.shape)}")
    k = k.to(torch.complex64)
    if not torch.isfinite(torch.view_as_real(k)).all():
        raise ValueError("mri k-space has NaN or infinite values")
    return k


def _sensitivities(y: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    try:
        return mri_ops.estimate_sensitivities(y, mask, method=method)
    except ValueError as err:
        raise ValueError(f"mri: cannot estimate sensitivities ({err})") from err


def _measured_ground_truth(ref, fully: bool, sens, k, w: int, meta: dict) -> torch.Tensor | None:
    if ref is not None:
        meta["ground_truth"] = "reference magnitude (phase 0)"  # meta stays JSON-friendly
        return torch.stack([ref, torch.zeros_like(ref)])[None]
    if fully:
        meta["ground_truth"] = "coil-combined fully sampled image"
        return mri_ops.MultiCoilMRI(sens, torch.ones(w)).adjoint(k[None])
    return None


def _normalisation(gt, op, y) -> float:
    peak = float((gt[:, :1] ** 2 + gt[:, 1:] ** 2).sqrt().max()) if gt is not None else \
        float(op.adjoint(y[None]).pow(2).sum(1).sqrt().max())
    if peak <= 0:
        raise ValueError("mri: reference / zero-filled image is all zeros; cannot normalise")
    return 1.0 / peak


TASK = MRI()
