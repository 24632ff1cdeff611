"""Build a `Problem` from a ground-truth image (simulated study) or from measured data.

    simulate(task, image, params, seed) -> Problem
    from_measurements(task, measurements, params, reference=None, seed=0) -> Problem
    degraded_image(problem) -> the image a person sees of the measurements (display format)

Images are float in [0, 1]: (H, W) grayscale, (H, W, 3) RGB (restoration tasks only) or a
network-format (1, C, H, W) tensor. Parameters per task (defaults in TASK_DEFAULTS, each with
its source); restoration noise `sigma` is a standard deviation on the 0-255 scale:

  denoise  sigma
  inpaint  hole_ratio (central box, area fraction) | missing (random pixels, fraction), sigma
  deblur   kernel ('gaussian' | 'motion'), kernel_size, kernel_sigma, motion_angle,
           motion_length, nonlinear (blur then saturation), gain, sigma
  sr       factor, sigma
  mri      acceleration, center_fraction, coils, mask ('equispaced' | 'random'), noise
           (std of complex Gaussian k-space noise per real/imag part; with the orthonormal FFT
           the same std in the image, whose peak magnitude is 1), phase (peak smooth phase, rad)
  ct       views, photons (I0; None = noise-free), attenuation, noise (std of additive
           Gaussian noise relative to the mean |A x|), circle, filter

Randomness comes from torch.Generators seeded by (seed, stream): the mask, the phase and the
noise have separate streams, so changing one setting does not reshuffle the others.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recon.operators import ct as ct_ops
from recon.operators import mri as mri_ops
from recon.operators import restoration as rest
from recon.operators.base import LinearOperator, unit_norm
from recon.problem import TASKS, Problem

__all__ = ["simulate", "from_measurements", "degraded_image", "TASK_DEFAULTS"]

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # sigma in {15, 25}: aSeqDIP paper Table 1; 25 in its Fig. 5.
    "denoise": {"sigma": 25.0},
    # HIAR in {0.1, 0.25}: aSeqDIP paper Table 1; 0.25 in its Fig. 5 (used when neither
    # hole_ratio nor missing is given). Noise-free like the paper's inpainting.
    "inpaint": {"hole_ratio": None, "missing": None, "sigma": 0.0},
    # Gaussian blur std 3.0 and measurement noise 0.05 on [-1, 1] (= 6.375 on 0-255): DPS
    # (Chung et al. 2023, Sec. 4), whose setting the aSeqDIP paper uses for deblurring. DPS's
    # 61 px kernel exceeds our images; kernel_size None = 2*ceil(3 sigma)+1 (ours); motion:
    # a straight 9 px streak at 45 degrees (ours; DPS draws random trajectories).
    "deblur": {"kernel": "gaussian", "kernel_size": None, "kernel_sigma": 3.0, "motion_angle": 45.0,
               "motion_length": None, "nonlinear": False, "gain": 2.0, "sigma": 0.05 / 2 * 255},
    # x4 is DIP's main super-resolution setting (Ulyanov et al. 2018, Sec. 4), noise-free.
    "sr": {"factor": 4, "sigma": 0.0},
    # 4x with the fastMRI centre fraction for it (Zbontar et al. 2018; aSeqDIP Table 1 uses 4x
    # and 8x); equispaced masks as fastMRI multi-coil data; 4 simulated coils (ours, the paper's
    # 15 measured coils need no simulation); noise-free, like retrospective undersampling;
    # a smooth phase of peak pi/4 rad makes the ground truth genuinely complex (ours).
    "mri": {"preset": "noise-free", "acceleration": 4, "center_fraction": None, "coils": 4, "mask": "equispaced",
            "noise": 0.0, "snr_db": None, "phase": math.pi / 4},
    # 18 views (aSeqDIP Table 1: 18 or 30), noise-free post-log data (Sec. 4: I0 "assumed 1 for
    # simplicity"); attenuation scaling of LoDoPaB-CT when photons are given.
    "ct": {"preset": "noise-free", "views": 18, "photons": None, "attenuation": ct_ops.LODOPAB_ATTENUATION,
           "noise": 0.0, "circle": True, "filter": "ramp"},
}

# Named noise settings: a preset fills in noise parameters the user did not give.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ct": {
        # the aSeqDIP paper's setting (Sec. 4): noise-free post-log data, I0 "assumed 1 for simplicity"
        "noise-free": {"photons": None},
        # post-log Poisson noise, I0 = 4096 photons per ray: LoDoPaB-CT's low-dose data
        # (Leuschner et al. 2021, Sci. Data 8:109, "Methods"), with its attenuation scaling
        "low-dose": {"photons": ct_ops.LODOPAB_PHOTONS},
    },
    "mri": {
        # retrospective undersampling of the ground truth without added noise, as the aSeqDIP
        # paper's simulated setting (Sec. 4; fastMRI k-space brings its own noise)
        "noise-free": {"snr_db": None},
        # complex Gaussian k-space noise at 30 dB SNR (signal energy of the sampled k-space over
        # the noise's expected energy): our choice, a clearly visible but moderate noise level; no
        # paper in ../shared/papers states one
        "noisy": {"snr_db": 30.0},
    },
}

# measured-data parameters (from_measurements)
MEASURED_DEFAULTS: dict[str, dict[str, Any]] = {
    # coils is accepted and ignored: measured k-space brings its own coils
    "mri": {"acceleration": None, "center_fraction": None, "mask": "equispaced", "sensitivities": "acs",
            "normalise": True, "coils": None},
    "ct": {"angles": None, "size": None, "circle": True, "filter": "ramp", "pixel_size": 1.0},
}

_STREAMS = {"mask": 1, "noise": 2, "phase": 3, "poisson": 4}


# ------------------------------------------------------------------------------ helpers

def _generator(seed: int, stream: str) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _resolve(task: str, params: dict | None, table: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task not in table:
        raise ValueError(f"{where}: task {task!r} is not supported; expected one of {', '.join(table)}")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a dict of task parameters, got {type(params).__name__}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(table[task]))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)} for task {task!r}; "
                         f"expected any of {', '.join(sorted(table[task]))}")
    return _apply_preset(task, {**table[task], **params}, params)


def _apply_preset(task: str, p: dict, given: dict) -> dict:
    """Fill in the preset's noise parameters the user did not give; a noise parameter that
    contradicts 'noise-free' is an error rather than silently winning."""
    if "preset" not in p:
        return p
    presets = PRESETS[task]
    if p["preset"] not in presets:
        raise ValueError(f"parameter 'preset' must be one of {', '.join(presets)}, got {p['preset']!r}")
    for key, value in presets[p["preset"]].items():
        if key not in given:
            p[key] = value
        elif given[key] is not None and p["preset"] == "noise-free":
            if "preset" in given:
                raise ValueError(f"parameter {key!r} = {given[key]!r} adds noise, but preset is 'noise-free'; "
                                 f"drop {key!r} or choose another preset")
            p["preset"] = "custom"  # noise set by hand, not by a named setting (meta says so)
    return p


def _number(p: dict, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False, hi_open: bool = False) -> float:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"parameter {key!r} must be a finite number, got {v!r}")
    if integer and int(v) != v:
        raise ValueError(f"parameter {key!r} must be an integer, got {v!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"parameter {key!r} must lie in {rng}, got {v!r}")
    return int(v) if integer else float(v)


def _as_image(image, task: str) -> torch.Tensor:
    """Ground truth as a (1, C, H, W) float32 tensor in [0, 1]."""
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"image must be real numbers in [0, 1], got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3 and x.shape[-1] == 3:
        x = x.permute(2, 0, 1)[None]
    elif not (x.dim() == 4 and x.shape[0] == 1 and x.shape[1] in (1, 3)):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (1, C, H, W) with C in (1, 3); "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] == 3 and task in ("mri", "ct"):
        raise ValueError(f"task {task!r} needs a grayscale (H, W) image, got 3 channels")
    if min(x.shape[-2:]) < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got {tuple(x.shape[-2:])}")
    if not torch.isfinite(x).all():
        raise ValueError("image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x.clamp(0.0, 1.0).contiguous()


def _gaussian(shape, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(shape, generator=_generator(seed, "noise"))


def _problem(task, op, y, gt, data_range, noise_sigma, meta, fbp=None, metric_mask=None) -> Problem:
    """The problem with the unit-norm operator A / c and y / c (one scale for every task);
    `y`, `op` and `noise_sigma` are physical. Non-linear operators keep their scale (c = 1)."""
    scale = 1.0
    if isinstance(op, LinearOperator):
        op, scale = unit_norm(op)
    meta = {**meta, "measurement_scale": scale}
    return Problem(task=task, operator=op, measurements=(y / scale).detach().contiguous(), ground_truth=gt,
                   data_range=float(data_range), fbp=fbp, noise_sigma=noise_sigma, measurement_scale=scale,
                   metric_mask=metric_mask, meta=meta)


# ------------------------------------------------------------------------------ simulate

def simulate(task: str, image, params: dict | None = None, seed: int = 0) -> Problem:
    """A simulated problem for `task` from a ground-truth image, deterministic given `seed`."""
    p = _resolve(task, params, TASK_DEFAULTS, "simulate")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    x = _as_image(image, task)
    build = {"denoise": _denoise, "inpaint": _inpaint, "deblur": _deblur, "sr": _sr, "mri": _mri, "ct": _ct}[task]
    problem = build(x, p, int(seed))
    problem.meta = {"source": "simulated", "task": task, "seed": int(seed), "params": p, **problem.meta}
    return problem


def _noise_sigma(p: dict) -> float:
    return _number(p, "sigma", 0.0) / 255.0


def _denoise(x, p, seed):
    s = _noise_sigma(p)
    op = rest.Identity(x.shape)
    # no clipping: the noise stays Gaussian with the stated sigma (DIP's public code clips)
    y = x + _gaussian(x.shape, s, seed)
    return _problem("denoise", op, y, x, 1.0, s, {})


def _inpaint(x, p, seed):
    s = _noise_sigma(p)
    _, c, h, w = x.shape
    if p["hole_ratio"] is not None and p["missing"] is not None:
        raise ValueError("inpaint: give either hole_ratio (central box) or missing (random pixels), not both")
    if p["missing"] is not None:
        frac = _number(p, "missing", 0.0, 1.0, lo_open=True, hi_open=True)
        mask = rest.random_pixel_mask(h, w, frac, _generator(seed, "mask"))
        kind = "random"
    else:
        if p["hole_ratio"] is None:
            p["hole_ratio"] = 0.25
        ratio = _number(p, "hole_ratio", 0.0, 1.0, lo_open=True, hi_open=True)
        mask = rest.box_mask(h, w, ratio)
        kind = "box"
    op = rest.Mask(mask, channels=c)
    y = op(x + _gaussian(x.shape, s, seed))
    return _problem("inpaint", op, y, x, 1.0, s, {"mask_kind": kind, "missing_fraction": op.missing_fraction})


def _kernel(p: dict, h: int, w: int) -> torch.Tensor:
    kind = p["kernel"]
    if kind not in ("gaussian", "motion"):
        raise ValueError(f"parameter 'kernel' must be 'gaussian' or 'motion', got {kind!r}")
    if kind == "gaussian":
        sigma = _number(p, "kernel_sigma", 0.0, lo_open=True)
        if p["kernel_size"] is None:
            p["kernel_size"] = 2 * math.ceil(3 * sigma) + 1
    elif p["kernel_size"] is None:
        p["kernel_size"] = 9
    size = _number(p, "kernel_size", 1, min(h, w), integer=True)
    if size % 2 == 0:
        raise ValueError(f"parameter 'kernel_size' must be odd, got {size}")
    if kind == "gaussian":
        return rest.gaussian_kernel(size, p["kernel_sigma"])
    length = None if p["motion_length"] is None else _number(p, "motion_length", 0.0, size, lo_open=True)
    return rest.motion_kernel(size, length, _number(p, "motion_angle"))


def _deblur(x, p, seed):
    s = _noise_sigma(p)
    _, c, h, w = x.shape
    kernel = _kernel(p, h, w)
    if not isinstance(p["nonlinear"], bool):
        raise ValueError(f"parameter 'nonlinear' must be true or false, got {p['nonlinear']!r}")
    if p["nonlinear"]:
        op = rest.SaturatedBlur(kernel, x.shape, gain=_number(p, "gain", 0.0, lo_open=True))
    else:
        op = rest.Blur(kernel, x.shape)
    with torch.no_grad():
        y = op(x) + _gaussian(x.shape, s, seed)
    return _problem("deblur", op, y, x, 1.0, s, {"kernel": p["kernel"], "nonlinear": p["nonlinear"]})


def _sr(x, p, seed):
    s = _noise_sigma(p)
    factor = _number(p, "factor", 2, integer=True)
    op = rest.Downsample(factor, x.shape)
    with torch.no_grad():
        clean = op(x)
    y = clean + _gaussian(clean.shape, s, seed)
    return _problem("sr", op, y, x, 1.0, s, {"low_res_shape": list(y.shape[-2:])})


def _smooth_phase(h: int, w: int, peak: float, seed: int) -> torch.Tensor:
    """A random second-order polynomial phase map with max |phase| = peak (radians)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * yy, xx ** 2, yy ** 2])
    coef = torch.randn(6, generator=_generator(seed, "phase"), dtype=torch.float64)
    phi = torch.einsum("k,khw->hw", coef, basis)
    return (peak * phi / phi.abs().max().clamp(min=1e-12)).float()


def _mri_mask(p: dict, width: int, seed: int) -> torch.Tensor:
    acc = _number(p, "acceleration", 1.0)
    if p["center_fraction"] is None:
        p["center_fraction"] = mri_ops.default_center_fraction(acc)
    cf = _number(p, "center_fraction", 0.0, 1.0, lo_open=True)
    if p["mask"] not in ("equispaced", "random"):
        raise ValueError(f"parameter 'mask' must be 'equispaced' or 'random', got {p['mask']!r}")
    return mri_ops.make_mask(p["mask"], width, acc, cf, seed)


def _mri(x, p, seed):
    _, _, h, w = x.shape
    coils = _number(p, "coils", 1, integer=True)
    noise = _number(p, "noise", 0.0)
    snr_db = None if p["snr_db"] is None else _number(p, "snr_db")
    if snr_db is not None and noise > 0:
        raise ValueError("mri: give either 'noise' (a std) or 'snr_db', not both")
    peak = _number(p, "phase", 0.0, math.pi)
    mask = _mri_mask(p, w, _generator(seed, "mask").initial_seed())
    sens = mri_ops.birdcage_sensitivities(coils, h, w)
    op = mri_ops.MultiCoilMRI(sens, mask)
    # complex ground truth: the magnitude image with a smooth phase (as real MR images have)
    z = x[:, 0:1].to(torch.complex64) * torch.polar(torch.ones(h, w), _smooth_phase(h, w, peak, seed))
    gt = mri_ops.to_channels(z)
    with torch.no_grad():
        clean = op(gt)
    if snr_db is not None:
        noise = kspace_noise_std(clean, op.mask, snr_db)
    gen = _generator(seed, "noise")
    n = torch.complex(torch.randn(clean.shape, generator=gen), torch.randn(clean.shape, generator=gen))
    y = clean + op.mask * noise * n
    meta = {"coils": coils, "acceleration_effective": op.acceleration,
            "sampled_columns": int(mask.sum()), "sensitivities": "birdcage" if coils > 1 else "none"}
    meta.update(noise_std=noise, snr_db=snr_db)
    return _problem("mri", op, y, gt, float(z.abs().max()), noise, meta)


def kspace_noise_std(clean: torch.Tensor, mask: torch.Tensor, snr_db: float) -> float:
    """Std per real / imaginary part of complex Gaussian noise giving `snr_db` =
    10 log10(||M F S x||^2 / E||M n||^2) over the sampled k-space (E||M n||^2 = 2 std^2 per sample)."""
    sampled = float(mask.expand_as(clean).sum())
    energy = float((clean.abs() ** 2).sum())
    return math.sqrt(energy / (2.0 * sampled * 10 ** (snr_db / 10)))


def _ct(x, p, seed):
    _, _, h, w = x.shape
    if h != w:
        raise ValueError(f"ct needs a square image, got {h}x{w}")
    views = _number(p, "views", 1, integer=True)
    if p["filter"] not in ct_ops.FILTERS:
        raise ValueError(f"parameter 'filter' must be one of {', '.join(ct_ops.FILTERS)}, got {p['filter']!r}")
    if not isinstance(p["circle"], bool):
        raise ValueError(f"parameter 'circle' must be true or false, got {p['circle']!r}")
    photons = None if p["photons"] is None else _number(p, "photons", 0.0, lo_open=True)
    attenuation = _number(p, "attenuation", 0.0, lo_open=True)
    rel = _number(p, "noise", 0.0)
    op = ct_ops.RayTransform(h, views=views, circle=p["circle"], filter_name=p["filter"])
    # circle=True: the field of view is the inscribed disc (skimage's convention); outside it
    # the scanner measures nothing consistent, so the ground truth is zero there
    gt = x * op.disc if p["circle"] else x
    with torch.no_grad():
        clean = op(gt)
    y = ct_ops.post_log_measurements(clean, h, photons, attenuation, _generator(seed, "poisson"))
    std = rel * float(clean.abs().mean())
    y = y + _gaussian(y.shape, std, seed)
    meta = {"views": views, "detectors": op.detectors, "angles_deg": op.angles.tolist(),
            "photons": photons, "noise_std": std, "masked_outside_disc": bool(p["circle"])}
    sigma = std if photons is None else None  # Poisson noise varies per ray: no single sigma
    disc = op.disc.bool() if p["circle"] else None
    return _problem("ct", op, y, gt, _ct_data_range(gt, disc), sigma, meta, fbp=op.fbp, metric_mask=disc)


def _ct_data_range(gt: torch.Tensor, disc: torch.Tensor | None) -> float:
    """The reference's maximum inside the disc: `MaskedPSNR` of the DIP-for-CT chapter's code
    (github.com/alexdenker/deep-image-prior-handbook, dip/model/utils.py: data_range = x_masked.max())."""
    inside = gt[0, 0][disc] if disc is not None else gt
    return max(float(inside.max()), 1e-12)


# -------------------------------------------------------------------- measured data

def from_measurements(task: str, measurements, params: dict | None = None, reference=None,
                      seed: int = 0) -> Problem:
    """A problem from measured data.

    mri: k-space, complex (coils, H, W) or (H, W) (single coil), e.g. fastMRI; an object with a
        `kspace` attribute (and optionally `reference`) is accepted too. Fully sampled k-space is
        undersampled retrospectively when `acceleration` is given (mask from `seed`); otherwise
        the mask is the set of non-zero columns. Sensitivities from the calibration region
        ('acs', built in) or ESPIRiT ('espirit', needs sigpy). A magnitude `reference` (H, W),
        e.g. fastMRI `reconstruction_rss`, becomes the ground truth's magnitude (phase 0); without
        it, fully sampled data give the coil-combined complex image as ground truth (meta says
        which). Undersampled data without a reference have no ground truth. With normalise,
        k-space and reference are scaled so the reference (else the image) peaks at 1.
    ct: a post-log sinogram (views, detectors), angles in degrees (default equispaced over
        180); reference: the attenuation image (N, N) if known.
    """
    p = _resolve(task, params, MEASURED_DEFAULTS, "from_measurements")
    if task == "mri":
        if hasattr(measurements, "kspace"):
            if reference is None:
                reference = getattr(measurements, "reference", None)
            measurements = measurements.kspace
        return _measured_mri(measurements, p, reference, int(seed))
    return _measured_ct(measurements, p, reference)


def _as_reference(reference, shape, where: str) -> torch.Tensor | None:
    if reference is None:
        return None
    r = torch.as_tensor(np.asarray(reference)).float()
    if r.dim() == 3 and r.shape[0] == 1:
        r = r[0]
    if tuple(r.shape) != tuple(shape):
        raise ValueError(f"{where}: reference of shape {tuple(r.shape)} must match the image shape {tuple(shape)}")
    if not torch.isfinite(r).all():
        raise ValueError(f"{where}: reference has NaN or infinite values")
    return r


def _measured_mri(kspace, p, reference, seed) -> Problem:
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
    coils, h, w = k.shape
    sampled = k.abs().sum(dim=(0, 1)) > 0
    if not sampled.any():
        raise ValueError("mri k-space is all zeros")
    fully = bool(sampled.all())
    meta = {"coils": coils, "fully_sampled_input": fully}
    if p["acceleration"] is not None:
        if not fully:
            raise ValueError(f"mri k-space is already undersampled ({int(sampled.sum())} of {w} "
                             "columns); drop 'acceleration' to use its own mask")
        mask = _mri_mask(p, w, _generator(seed, "mask").initial_seed())
    else:
        mask = sampled
    meta["acceleration_effective"] = float(w / mask.sum())
    ref = _as_reference(reference, (h, w), "from_measurements(mri)")
    y = k * mask
    if coils > 1:
        try:
            sens = mri_ops.estimate_sensitivities(y, mask, method=p["sensitivities"])
        except ValueError as err:
            raise ValueError(f"mri: cannot estimate sensitivities ({err})") from err
    else:
        sens = torch.ones(1, h, w, dtype=torch.complex64)
    op = mri_ops.MultiCoilMRI(sens, mask)
    if ref is not None:
        gt = torch.stack([ref, torch.zeros_like(ref)])[None]
        # meta stays JSON-friendly: the reference itself is display(ground_truth)
        meta["ground_truth"] = "reference magnitude (phase 0)"
    elif fully:
        full = mri_ops.MultiCoilMRI(sens, torch.ones(w))
        gt = full.adjoint(k[None])
        meta["ground_truth"] = "coil-combined fully sampled image"
    else:
        gt = None
    scale = 1.0
    if p["normalise"]:
        peak = float((gt[:, :1] ** 2 + gt[:, 1:] ** 2).sqrt().max()) if gt is not None else \
            float(op.adjoint(y[None]).pow(2).sum(1).sqrt().max())
        if peak <= 0:
            raise ValueError("mri: reference / zero-filled image is all zeros; cannot normalise")
        scale = 1.0 / peak
    meta.update(scale=scale, sensitivities=p["sensitivities"] if coils > 1 else "none")
    gt = None if gt is None else gt * scale
    data_range = 1.0 if gt is None else float((gt[:, :1] ** 2 + gt[:, 1:] ** 2).sqrt().max())
    problem = _problem("mri", op, y[None] * scale, gt, data_range, None, meta)
    problem.meta = {"source": "measured", "task": "mri", "seed": seed, "params": p, **problem.meta}
    return problem


def _measured_ct(sinogram, p, reference) -> Problem:
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
    size = detectors if p["size"] is None else _number(p, "size", 2, integer=True)
    pixel = _number(p, "pixel_size", 0.0, lo_open=True)
    op = ct_ops.RayTransform(size, angles=angles, circle=bool(p["circle"]), detectors=detectors,
                             filter_name=p["filter"])
    ref = _as_reference(reference, (size, size), "from_measurements(ct)")
    gt = None if ref is None else ref[None, None]
    disc = op.disc.bool() if op.circle else None
    data_range = 1.0 if ref is None else _ct_data_range(gt, disc)
    # line integrals in physical units / pixel size = pixel units, those of the operator
    y = (s / pixel)[None, None]
    meta = {"views": views, "detectors": detectors, "angles_deg": angles.tolist()}
    problem = _problem("ct", op, y, gt, data_range, None, meta, fbp=op.fbp, metric_mask=disc)
    problem.meta = {"source": "measured", "task": "ct", "params": p, **problem.meta}
    return problem


# --------------------------------------------------------------------------- display

@torch.no_grad()
def degraded_image(problem: Problem) -> torch.Tensor:
    """What a person sees of the measurements, display format (1, Cd, H, W): the noisy / masked /
    blurred image, the low-res image upsampled (bicubic) for SR, zero-filled magnitude for MRI,
    FBP for CT."""
    if problem.task == "ct":
        x = problem.fbp_image()
    elif problem.task == "sr":
        x = F.interpolate(problem.physical_measurements().float(), size=tuple(problem.image_shape[2:]),
                          mode="bicubic", align_corners=False)
    elif problem.task == "mri":
        x = problem.physical_adjoint_image()
    else:
        x = problem.measurement_image()
    return problem.display(x.float())
