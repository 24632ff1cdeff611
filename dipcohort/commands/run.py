"""`dipcohort run MANIFEST --out STORE`: validate, create or reopen the store, run what is left.

An invalid manifest exits with code 2 and writes nothing. An existing store made from the
same manifest is resumed (done and diverged jobs are skipped; failed ones only rerun with
--retry-failed). --dry-run prints the job count, resources and a storage estimate and writes
nothing. Backend-specific flags come from each `schedulers.<backend>` module's optional
`add_arguments(parser)` / `options_from_args(args)`, plus generic `--option KEY=VALUE`.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any

import yaml

from pipeline.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a cohort manifest into a Zarr results store",
                              description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="cohort manifest (YAML), e.g. manifests/demo.yaml")
    p.add_argument("--out", required=True, help="results store (a directory, e.g. results/demo.zarr)")
    p.add_argument("--backend", default="local", choices=_backends(), help="where jobs run (default: local)")
    p.add_argument("--workers", type=int, default=1, help="jobs at once (local: processes; default 1)")
    p.add_argument("--resume", action="store_true", help="require an existing store and continue it")
    p.add_argument("--retry-failed", action="store_true", help="also rerun jobs whose status is failed")
    p.add_argument("--dry-run", action="store_true", help="print jobs, resources and storage estimate; write nothing")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: CUDA when available)")
    p.add_argument("--progress", default="auto", choices=("auto", "rich", "plain", "quiet"),
                   help="progress display (auto: a bar on a terminal, one line per job otherwise)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option passed through (repeatable), e.g. -o max_in_flight=64")
    for name in _backends():  # backend-specific flags live with their backend
        module = _backend_module(name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p.add_argument_group(f"{name} backend"))
    p.set_defaults(func=main)


def _backends() -> tuple[str, ...]:
    from schedulers import BACKENDS

    return BACKENDS


def _backend_module(name: str):
    try:
        return importlib.import_module(f"schedulers.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"schedulers.{name}":
            return None
        raise


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options for `get_backend`: device, workers, the backend's own flags, then --option pairs."""
    opts: dict[str, Any] = {"device": args.device, "workers": args.workers}
    module = _backend_module(args.backend)
    if module is None:
        raise UsageError(f"--backend {args.backend}: not available in this installation")
    if hasattr(module, "options_from_args"):
        opts.update(module.options_from_args(args))
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def main(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    from pipeline.driver import dry_run, run_cohort

    if args.dry_run:
        return dry_run(args.manifest, args.out)
    _check_device(args.device)
    backend = make_backend(args.backend, backend_options(args))
    counts = run_cohort(args.manifest, args.out, backend, resume=args.resume, retry_failed=args.retry_failed,
                        progress=args.progress)
    return 1 if counts.get("failed") else 0


def make_backend(name: str, options: dict[str, Any]):
    """The scheduler backend `name` built with `options`; a bad option is a usage error."""
    from schedulers import get_backend

    try:
        return get_backend(name, **options)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--backend {name}: {err}") from None


def _check_device(device: str | None) -> None:
    """Fail once at the start rather than in every job."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:K") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
