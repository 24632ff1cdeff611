"""Schedulers: the same Backend contract over local processes, Ray and Slurm (submitit).

Backends are imported lazily so `ray` / `submitit` are only needed when used.
"""
from __future__ import annotations

import importlib
from typing import Any

from schedulers.base import Backend

BACKENDS = ("local", "ray", "slurm")


def get_backend(name: str, **options: Any) -> Backend:
    """Backend `name` built with `options` (each module exposes its class as `BACKEND`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"schedulers.{name}")
    return module.BACKEND(**options)


__all__ = ["Backend", "BACKENDS", "get_backend"]
