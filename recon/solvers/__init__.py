"""Solver registry: names → solver classes, and `run_solver`, the one entry point."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from recon.problem import Problem
from recon.solvers.base import Solver, make_params
from recon.solvers.loop import LoopSettings, Loop, ProgressFn, SolverResult
from recon.solvers.step_records import METRICS_BLOCK

SOLVERS: dict[str, type[Solver]] = {}

# one module per solver; importing a module registers its solvers
_MODULES = ("dip", "es_dip", "tv_dip", "self_guided", "aseqdip", "dip_red", "dip_denoiser",
            "dip_admm", "pnp_admm", "deep_decoder", "classical")


def register(cls: type[Solver]) -> type[Solver]:
    SOLVERS[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"recon.solvers.{mod}")
        except ModuleNotFoundError as err:
            if err.name != f"recon.solvers.{mod}":
                raise


def get_solver(name: str) -> type[Solver]:
    _load_all()
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def solver_names() -> list[str]:
    _load_all()
    return sorted(SOLVERS)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_device(dev: torch.device) -> torch.device:
    """Same job on the same device gives the same numbers (DESIGN.md): deterministic cuDNN."""
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return dev


def run_solver(name: str, problem: Problem, *, steps: int | None = None, params: dict[str, Any] | None = None,
               seed: int = 0, device: str | torch.device | None = None, ssim_every: int = 10,
               checkpoint_path: str | Path | None = None, checkpoint_every: int = 0,
               progress: ProgressFn | None = None, save_weights: str | Path | None = None,
               should_stop=None, metrics_block: int = METRICS_BLOCK) -> SolverResult:
    """Run solver `name` on `problem` for `steps` optimiser updates and return its result.

    should_stop: polled before each step; when it returns True the loop raises
    `recon.solvers.loop.StopRequested` (after a checkpoint where `checkpoint_path` is given).
    metrics_block: steps between host copies of the per-step values (the numbers do not depend on it)."""
    cls = get_solver(name)
    p = make_params(cls.Params, params, where=f"solver {name!r} params")
    dev = prepare_device(torch.device(device) if device is not None else default_device())
    solver = cls(problem.to(dev), p, seed=seed, device=dev)
    steps = cls.default_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    settings = LoopSettings(steps=steps, ssim_every=ssim_every, progress=progress,
                            checkpoint_path=Path(checkpoint_path) if checkpoint_path else None,
                            checkpoint_every=checkpoint_every, should_stop=should_stop,
                            metrics_block=metrics_block)
    result = Loop(solver, settings).run()
    if save_weights and getattr(solver, "net", None) is not None:
        torch.save(solver.net.state_dict(), save_weights)
    return result


from recon.solvers.packed import pack_footprint, packable, run_solver_pack  # noqa: E402 - needs run_solver's module

__all__ = ["SOLVERS", "register", "get_solver", "solver_names", "run_solver", "SolverResult", "default_device",
           "run_solver_pack", "packable", "pack_footprint"]
