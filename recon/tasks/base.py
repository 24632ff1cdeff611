"""What every task shares: its contract (`Task`), parameter checks, seeded draws, the unit-norm problem.

A task module (denoise, inpaint, deblur, sr, mri, ct) subclasses `Task` and holds everything the
task means: defaults with their citations, parameter validation, simulation, measured data,
degraded image, default network input, metric mask and definition, and its CLI options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recon.operators.base import LinearOperator, Operator, unit_norm
from recon.problem import Problem

# independent torch.Generator streams per kind of draw: changing one setting (e.g. the mask)
# does not reshuffle the others (e.g. the noise)
STREAMS = {"mask": 1, "noise": 2, "phase": 3, "poisson": 4, "coils": 5}


def generator(seed: int, stream: str) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), STREAMS[stream]]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def gaussian(shape, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(shape, generator=generator(seed, "noise"))


# ----------------------------------------------------------------------------- parameter checks
def number(p: dict, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """p[key] as a finite number inside the bounds (stored back coerced); ValueError names the key."""
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"parameter {key!r} must be a finite number, got {v!r}")
    if integer and int(v) != v:
        raise ValueError(f"parameter {key!r} must be an integer, got {v!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"parameter {key!r} must lie in {span}, got {v!r}")
    p[key] = int(v) if integer else float(v)
    return p[key]


def optional_number(p: dict, key: str, **bounds) -> float | None:
    return None if p[key] is None else number(p, key, **bounds)


def boolean(p: dict, key: str) -> bool:
    if not isinstance(p[key], bool):
        raise ValueError(f"parameter {key!r} must be true or false, got {p[key]!r}")
    return p[key]


def choice(p: dict, key: str, options) -> str:
    if p[key] not in tuple(options):
        raise ValueError(f"parameter {key!r} must be one of {', '.join(map(str, options))}, got {p[key]!r}")
    return p[key]


@dataclass(frozen=True)
class CliOption:
    """A task parameter offered by `dipcohort recon` as --name (underscores become dashes).
    type None: an on/off flag. The value reaches the task under `name`."""

    name: str
    type: type | None
    help: str
    choices: tuple = ()


# ----------------------------------------------------------------------------------- the task
class Task:
    """One task's knowledge. Subclasses set the class attributes and implement `validate`,
    `build` (simulation) and, for measured data, `validate_measured` and `measured`."""

    name: str = ""
    defaults: dict[str, Any] = {}                   # simulated studies, each value cited in the module
    measured_defaults: dict[str, Any] | None = None  # measured data (mri, ct); None: simulation only
    presets: dict[str, dict[str, Any]] = {}          # named noise settings (parameter 'preset')
    metric_definition: str = ""                      # written into the store's attributes and the README
    default_input: str = "measurements"              # Problem.initial_image('auto')
    gray_only: bool = False
    cli_options: tuple[CliOption, ...] = ()

    # ---- parameters (no image, nothing built: the manifest pre-flight calls this) -------------
    def check_params(self, params: dict | None = None, kind: str = "simulate") -> dict[str, Any]:
        """The parameters in force (defaults, preset, then `params`), every value checked;
        ValueError names the parameter and what was expected."""
        table = self._table(kind)
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"task {self.name!r}: params must be a dict of task parameters, "
                             f"got {type(params).__name__}")
        given = dict(params or {})
        unknown = sorted(set(given) - set(table))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for task {self.name!r} ({kind}); "
                             f"expected any of {', '.join(sorted(table))}")
        p = self._apply_preset({**table, **given}, given)
        (self.validate if kind == "simulate" else self.validate_measured)(p)
        return p

    def parameter_names(self, kind: str = "simulate") -> tuple[str, ...]:
        return tuple(self._table(kind))

    def _table(self, kind: str) -> dict[str, Any]:
        if kind == "simulate":
            return self.defaults
        if kind == "measured" and self.measured_defaults is not None:
            return self.measured_defaults
        if kind == "measured":
            raise ValueError(f"task {self.name!r} cannot use measured data; it simulates its measurements "
                             "from a ground-truth image (kind 'simulate')")
        raise ValueError(f"kind must be 'simulate' or 'measured', got {kind!r}")

    def _apply_preset(self, p: dict, given: dict) -> dict:
        """Fill in the preset's noise parameters the user did not give; a noise parameter given
        with preset 'noise-free' is an error rather than silently winning."""
        if "preset" not in p:
            return p
        choice(p, "preset", self.presets)
        for key, value in self.presets[p["preset"]].items():
            if key not in given:
                p[key] = value
            elif given[key] is not None and p["preset"] == "noise-free":
                if "preset" in given:
                    raise ValueError(f"parameter {key!r} = {given[key]!r} adds noise, but preset is 'noise-free'; "
                                     f"drop {key!r} or choose another preset")
                p["preset"] = "custom"  # noise set by hand, not by a named setting (meta says so)
        return p

    def validate(self, p: dict) -> None:
        """Check (and coerce in place) the values of simulation parameters."""

    def validate_measured(self, p: dict) -> None:
        """Check (and coerce in place) the values of measured-data parameters."""

    # ---- problems -----------------------------------------------------------------------------
    def simulate(self, image, params: dict | None = None, seed: int = 0) -> Problem:
        """A simulated problem from a ground-truth image in [0, 1], deterministic given `seed`."""
        p = self.check_params(params, "simulate")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        problem = self.build(as_image(image, self.name, self.gray_only), p, int(seed))
        problem.meta = {"source": "simulated", "task": self.name, "seed": int(seed), "params": p, **problem.meta}
        return problem

    def from_measurements(self, measurements, params: dict | None = None, reference=None, seed: int = 0) -> Problem:
        """A problem from measured data (see the task module)."""
        p = self.check_params(params, "measured")
        problem = self.measured(measurements, p, reference, int(seed))
        problem.meta = {"source": "measured", "task": self.name, "seed": int(seed), "params": p, **problem.meta}
        return problem

    def build(self, x: torch.Tensor, p: dict, seed: int) -> Problem:  # pragma: no cover - abstract
        raise NotImplementedError

    def measured(self, measurements, p: dict, reference, seed: int) -> Problem:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def degraded_image(self, problem: Problem) -> torch.Tensor:
        """What a person sees of the measurements, display format (1, Cd, H, W)."""
        return problem.display(problem.measurement_image().float())

    def problem(self, op: Operator, y: torch.Tensor, gt: torch.Tensor | None, data_range: float,
                noise_sigma: float | None, meta: dict, fbp=None, metric_mask=None) -> Problem:
        """The problem with the unit-norm operator A / c and y / c (one scale for every task);
        `op`, `y` and `noise_sigma` are physical. Non-linear operators keep their scale (c = 1)."""
        scale = 1.0
        if isinstance(op, LinearOperator):
            op, scale = unit_norm(op)
        return Problem(task=self.name, operator=op, measurements=(y / scale).detach().contiguous(),
                       ground_truth=gt, data_range=float(data_range), fbp=fbp, noise_sigma=noise_sigma,
                       measurement_scale=scale, metric_mask=metric_mask, default_input=self.default_input,
                       meta={**meta, "measurement_scale": scale})


# -------------------------------------------------------------------------------------- images
def as_image(image, task: str, gray_only: bool) -> torch.Tensor:
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
    if x.shape[1] == 3 and gray_only:
        raise ValueError(f"task {task!r} needs a grayscale (H, W) image, got 3 channels")
    if min(x.shape[-2:]) < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got {tuple(x.shape[-2:])}")
    if not torch.isfinite(x).all():
        raise ValueError("image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x.clamp(0.0, 1.0).contiguous()


def as_reference(reference, shape, where: str) -> torch.Tensor | None:
    """A measured scan's reference image (H, W) as float32, checked against the image shape."""
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


# restoration tasks share one noise parameter and one scoring convention
RESTORATION_METRICS = ("PSNR and SSIM over the whole image, all channels, data range 1 (images in [0, 1]); "
                       "SSIM with scikit-image's defaults (7x7 uniform window).")
# one --preset flag for the tasks with named noise settings (each checks its own names)
PRESET_OPTION = CliOption("preset", str, "named noise setting: mri noise-free | noisy, ct noise-free | low-dose",
                          ("noise-free", "noisy", "low-dose"))
SIGMA_OPTION = CliOption("sigma", float, "noise std on the 0-255 scale (denoise; also inpaint, deblur, sr)")


def noise_sigma(p: dict) -> float:
    """The restoration noise std on the image's [0, 1] scale (parameter `sigma` is on 0-255)."""
    return number(p, "sigma", 0.0) / 255.0
