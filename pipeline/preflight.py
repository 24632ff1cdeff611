"""Checks of a manifest's scans and solver configurations before the driver writes anything.

The same checks as `dipcohort recon`: every scan's source is loaded (a few threads: I/O bound),
its problem is built once per distinct signature (task, task parameters, kind, reference, array
shapes: what the shape probe keys on), and every solver configuration is constructed on it (on
the CPU: networks, inputs, options such as 'fbp' needing a CT operator). What fails is named
with the manifest, the scan and the configuration; the shapes found are what the store is
created with.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UsageError
from pipeline.jobs import ScanSpec, canonical_json
from pipeline.manifest import Manifest, ManifestError

MAX_LISTED = 10  # scans named in one message; the rest are counted


@dataclass
class ScanCheck:
    """Image shape per usable scan; the load error of each scan whose source is missing or unreadable."""

    shapes: dict = field(default_factory=dict)
    unloadable: dict[str, str] = field(default_factory=dict)


def check_manifest(manifest: Manifest, allow_missing: bool = False, threads: int = 4) -> ScanCheck:
    """Load every scan, build its problem, construct every solver configuration on it.

    A missing or unreadable source raises UsageError unless `allow_missing` (then it is listed
    in `unloadable`); an invalid task parameter or solver configuration always raises ManifestError.
    """
    data, unloadable = _load_all(manifest.scans, threads)
    if unloadable and not allow_missing:
        raise UsageError(_unloadable_message(manifest, unloadable) + "\n  fix these sources, or pass "
                         "--allow-missing to record their jobs failed and run the others")
    check = ScanCheck(unloadable=unloadable)
    by_signature: dict[str, object] = {}
    for spec in manifest.scans:
        if spec.id in unloadable:
            continue
        key = _signature(spec, data[spec.id])
        if key not in by_signature:
            by_signature[key] = _shape_and_solvers(manifest, spec, data[spec.id])
        check.shapes[spec.id] = by_signature[key]
    return check


def _load_all(scans: list[ScanSpec], threads: int) -> tuple[dict, dict[str, str]]:
    def load(spec: ScanSpec):
        from pipeline.scans import load  # a measured CT sinogram as raw numbers, an image otherwise

        try:
            return spec.id, load(spec), None
        except Exception as err:  # noqa: BLE001 - any failure to read the file is the file's problem
            return spec.id, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(load, scans))
    return ({i: d for i, d, e in results if e is None}, {i: e for i, _, e in results if e is not None})


def _signature(spec: ScanSpec, data) -> str:
    arrays = [list(data.shape)] if isinstance(data, np.ndarray) else \
        {k: list(np.shape(v)) for k, v in vars(data).items() if isinstance(v, np.ndarray)}
    return canonical_json([spec.task, spec.task_params, spec.kind, spec.reference, arrays])


def _shape_and_solvers(manifest: Manifest, spec: ScanSpec, data):
    """The scan's image shape, after building its problem and every solver configuration on it."""
    import torch

    from pipeline.scans import build_problem, image_shape
    from recon.solvers import get_solver
    from recon.solvers.base import make_params

    what = f"{manifest.path}: scan {spec.id} (task {spec.task}, params {canonical_json(spec.task_params)})"
    try:
        problem = build_problem(spec, 0, data)
    except (ValueError, TypeError, KeyError) as err:
        raise ManifestError(f"{what}: {err}") from None
    names, _ = manifest.scan_plans.get(spec.id, (None, None))
    for cfg in manifest.configs:
        if names is not None and cfg.solver not in names:  # the entry runs only some of the solvers
            continue
        cls = get_solver(cfg.solver)
        try:
            cls(problem, make_params(cls.Params, cfg.params, where=cfg.where), seed=0, device=torch.device("cpu"))
        except (ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError) as err:
            raise ManifestError(f"{cfg.where}: {cfg.label} cannot run on {what.split(': ', 1)[1]}: {err}") from None
    return image_shape(problem)


def _unloadable_message(manifest: Manifest, unloadable: dict[str, str]) -> str:
    by_id = {s.id: s for s in manifest.scans}
    lines = [f"{manifest.path}: {len(unloadable)} scan source(s) cannot be loaded:"]
    for scan_id, err in list(unloadable.items())[:MAX_LISTED]:
        lines.append(f"  {scan_id} ({by_id[scan_id].source}): {err.splitlines()[0]}")
    if len(unloadable) > MAX_LISTED:
        lines.append(f"  ... and {len(unloadable) - MAX_LISTED} more")
    return "\n".join(lines)
