"""Checks of a manifest's scans and solver configurations before the driver writes anything.

Every solver configuration's option names, types and values were already checked when the
manifest was loaded (`pipeline.manifest`: `make_params(..., solver=name)` runs the solver's own
`Params.validate`, once per configuration, nothing built); what is left here needs a scan.

The driver runs this on the login node, so it reads as little as it can: every scan's file
header (`pipeline.io.scan_header`: PNG/JPEG/BMP, TIFF, NPY/NPZ, DICOM, HDF5; a few threads, I/O
bound), which refuses missing, empty and header-truncated files, then groups the scans by
signature (task, task parameters, kind, reference, size, colour and header: what decides the
image shape). One scan per signature is probed: loaded in full, its problem built and every
solver configuration constructed on it (on the CPU: networks, inputs, options such as 'fbp'
needing a CT operator), as `dipcohort recon` does; the others get its shape. A file whose
pixels are damaged behind an intact header is found when its job runs (recorded failed with
the error). What fails is named with the manifest, the scan and the configuration; the shapes
found are what the store is created with.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.errors import UsageError
from pipeline.jobs import ScanSpec, canonical_json
from pipeline.manifest import Manifest, ManifestError

MAX_LISTED = 10  # scans named in one message; the rest are counted


@dataclass
class ScanCheck:
    """Image shape per usable scan; the load error of each scan whose source is missing or
    unreadable; `probed`: the scans loaded in full (one per signature)."""

    shapes: dict = field(default_factory=dict)
    unloadable: dict[str, str] = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)


def check_manifest(manifest: Manifest, allow_missing: bool = False, threads: int = 4) -> ScanCheck:
    """Read every scan's header, probe one scan per signature (see the module doc).

    A missing or unreadable source raises UsageError unless `allow_missing` (then it is listed
    in `unloadable`); an invalid task parameter or solver configuration always raises ManifestError.
    """
    headers, unloadable = _headers(manifest.scans, threads)
    _refuse(manifest, unloadable, allow_missing)
    check = ScanCheck(unloadable=unloadable)
    groups: dict[str, list[ScanSpec]] = {}
    for spec in manifest.scans:
        if spec.id not in unloadable:
            groups.setdefault(_signature(spec, headers[spec.id]), []).append(spec)
    for specs in groups.values():
        shape = _probe(manifest, specs, check)
        check.shapes.update({s.id: shape for s in specs if s.id not in check.unloadable and shape is not None})
    _refuse(manifest, check.unloadable, allow_missing)
    return check


def _refuse(manifest: Manifest, unloadable: dict[str, str], allow_missing: bool) -> None:
    if unloadable and not allow_missing:
        raise UsageError(_unloadable_message(manifest, unloadable) + "\n  fix these sources, or pass "
                         "--allow-missing to record their jobs failed and run the others")


def _headers(scans: list[ScanSpec], threads: int) -> tuple[dict, dict[str, str]]:
    """Header per scan (None: no cheap header read, the probe loads it), and the header errors."""
    def read(spec: ScanSpec):
        from pipeline.io import scan_header

        try:
            return spec.id, scan_header(spec.source), None
        except NotImplementedError:
            return spec.id, None, None
        except Exception as err:  # noqa: BLE001 - any failure to read the file is the file's problem
            return spec.id, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(read, scans))
    return ({i: h for i, h, e in results if e is None}, {i: e for i, _, e in results if e is not None})


def _signature(spec: ScanSpec, header) -> str:
    # no header: the scan is its own signature (loaded in full)
    what = repr(header) if header is not None else f"source {spec.source}"
    return canonical_json([spec.task, spec.task_params, spec.kind, spec.reference, spec.size, spec.color, what])


def _probe(manifest: Manifest, specs: list[ScanSpec], check: ScanCheck):
    """Load the first scan of a signature that loads; its shape (None if none of them loads)."""
    from pipeline.scans import load  # a measured CT sinogram as raw numbers, an image otherwise

    for spec in specs:
        try:
            data = load(spec)
        except Exception as err:  # noqa: BLE001 - the header looked fine, the pixels do not
            check.unloadable[spec.id] = f"{type(err).__name__}: {err}"
            continue
        check.probed.append(spec.id)
        return _shape_and_solvers(manifest, spec, data)
    return None


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
