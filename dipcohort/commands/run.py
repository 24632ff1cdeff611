"""`dipcohort run MANIFEST --out STORE`: validate, create or reopen the store, run what is left.

Everything is checked before anything is written: the manifest, every scan's task parameters
and every solver configuration on its scans (the checks of `dipcohort recon`), the sources
(a missing or unreadable one is an error unless --allow-missing), and the backend (its
commands, cluster address, GPUs). An existing store made from the same manifest is resumed
(done and diverged jobs are skipped; failed ones only rerun with --retry-failed). One driver
at a time holds the store's lease; a second one exits 2 naming the holder, or waits with
--wait-lock. Ctrl-C / SIGTERM stop the running jobs at a step boundary (exit 130 / 143); a
rerun continues them. --pack N|auto runs compatible jobs together (`pipeline.packing`).
--dry-run prints the job count, resources, how jobs are packed and a storage estimate and
writes nothing. Backend-specific flags come from each `schedulers.<backend>` module's
`add_arguments(group)` / `options_from_args(args)` (its `FLAGS` names their dests), plus
generic `--option KEY=VALUE`; a flag or option the chosen backend does not take is an error.
"""
from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UsageError


def register(subparsers) -> None:
    from pipeline.lease import STALE_AFTER_S

    p = subparsers.add_parser("run", help="run a cohort manifest into a Zarr results store",
                              description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="cohort manifest (YAML), e.g. manifests/demo.yaml")
    p.add_argument("--out", required=True, help="results store (a directory, e.g. results/demo.zarr)")
    p.add_argument("--backend", default="local", choices=_backends(), help="where jobs run (default: local)")
    p.add_argument("--workers", type=int, default=1, help="jobs at once (local: processes; default 1)")
    p.add_argument("--resume", action="store_true", help="require an existing store and continue it")
    p.add_argument("--retry-failed", action="store_true", help="also rerun jobs whose status is failed")
    p.add_argument("--allow-missing", action="store_true",
                   help="scans whose source is missing or unreadable: record their jobs failed and run the "
                        "rest (default: stop before writing anything)")
    p.add_argument("--dry-run", action="store_true",
                   help="print jobs, resources, packing and storage estimate; write nothing")
    add_pack_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: CUDA when available)")
    p.add_argument("--progress", default="auto", choices=("auto", "rich", "plain", "quiet"),
                   help="progress display (auto: a bar on a terminal, one line per job otherwise)")
    p.add_argument("--wait-lock", type=float, nargs="?", const=math.inf, default=None, metavar="SECONDS",
                   help="another driver holds the store: wait for it (forever, or SECONDS) instead of exiting")
    p.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="SECONDS",
                   help=f"a driver lease whose heartbeat is older than this is taken over (default "
                        f"{STALE_AFTER_S:g} s; a dead pid on this host is taken over at once)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option passed through (repeatable), e.g. -o max_in_flight=64")
    for name in _backends():  # backend-specific flags live with their backend
        module = _backend_module(name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p.add_argument_group(f"{name} backend"))
    p.set_defaults(func=main, parser=p)


def add_pack_argument(p) -> None:
    p.add_argument("--pack", default=None, metavar="N|auto",
                   help="run up to N compatible jobs (same task, shape, solver configuration; other scans or "
                        "seeds) together as one computation, or 'auto' (N from the device's free memory); "
                        "default: the manifest's resources.pack (1: each job alone)")


def pack_option(args: argparse.Namespace):
    from pipeline.packing import pack_setting

    return None if args.pack is None else pack_setting(args.pack)


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


def check_backend_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A flag of another backend given with this one (--partition on local) is an error naming it."""
    owners: dict[str, list[str]] = {}
    for name in _backends():
        module = _backend_module(name)
        for dest in getattr(module, "FLAGS", ()):
            owners.setdefault(dest, []).append(name)
    for action in parser._actions:
        backends = owners.get(action.dest)
        if not backends or args.backend in backends:
            continue
        if getattr(args, action.dest, action.default) != action.default:
            raise UsageError(f"{action.option_strings[0]} applies to --backend {' or '.join(backends)}, "
                             f"not --backend {args.backend}")


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
        if not sep or not key.strip():
            raise UsageError(f"-o/--option {pair!r}: expected KEY=VALUE")
        try:
            opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UsageError(f"-o {key.strip()}: value {value!r} is not valid YAML ({err})") from None
    return opts


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """The output path must be a directory or not exist yet (an existing file is a mistake)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is a file; expected a directory (a results store) or a new path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {out}: {parent} is a file, not a directory")
            break
    return out


def main(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.wait_lock is not None and args.wait_lock < 0:
        raise UsageError(f"--wait-lock must be >= 0 seconds, got {args.wait_lock:g}")
    if args.stale_after <= 0:
        raise UsageError(f"--stale-after must be > 0 seconds, got {args.stale_after:g}")
    from pipeline.driver import dry_run, run_cohort

    out = check_out(args.out)
    check_backend_flags(args, args.parser)
    pack = pack_option(args)
    if args.dry_run:
        return dry_run(args.manifest, out, pack=pack, device=args.device)
    _check_device(args.device)
    backend = make_backend(args.backend, backend_options(args))
    counts = run_cohort(args.manifest, out, backend, resume=args.resume, retry_failed=args.retry_failed,
                        progress=args.progress, allow_missing=args.allow_missing, wait_lock=args.wait_lock,
                        stale_after=args.stale_after, pack=pack)
    return 1 if counts.get("failed") else 0


def make_backend(name: str, options: dict[str, Any]):
    """The scheduler backend `name` built with `options`; a bad or unknown option is a usage error."""
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
