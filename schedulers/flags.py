"""Command-line flags of the ray and slurm backends (`dipcohort run`), and their options.

`dipcohort.commands.run` calls each backend module's `add_arguments(group)` and
`options_from_args(args)`. The per-job resource flags are shared by both backends, so they are
added once, by whichever backend comes first. Unset flags (None) fall back to the manifest's
`resources` for each job.
"""
from __future__ import annotations

import argparse
from typing import Any


def _add_once(group, *names: str, **kwargs: Any) -> None:
    if any(name in group._option_string_actions for name in names):  # shared with the parser
        return
    group.add_argument(*names, **kwargs)


def add_resource_arguments(group) -> None:
    """--gpus-per-job and --cpus-per-job (ray and slurm)."""
    _add_once(group, "--gpus-per-job", type=float, default=None, metavar="G",
              help="ray, slurm: GPUs per job (ray: fractions such as 0.25 pack jobs on a GPU; "
                   "slurm rounds up); default: the manifest's resources")
    _add_once(group, "--cpus-per-job", type=float, default=None, metavar="C",
              help="ray, slurm: CPUs per job (torch threads); default: the manifest's resources")


def resource_options(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def sbatch_pairs(pairs: list[str]) -> dict[str, Any]:
    """`--sbatch KEY=VALUE` (or a bare KEY for a flag such as `exclusive`) → submitit's extra sbatch options."""
    from pipeline.errors import UsageError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise UsageError(f"--sbatch {pair!r}: expected KEY=VALUE (an sbatch option without its dashes, "
                             f"e.g. account=myproj or qos=high) or a bare KEY for a flag")
        out[key] = value.strip() if sep else True
    return out
