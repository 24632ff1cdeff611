"""A scan spec becomes a reconstruction problem here: loading, simulation or measured data, shapes.

The one place that turns a `ScanSpec` (a manifest row, or the single-scan CLI's arguments) into a
`recon.Problem`; the worker and the driver (which learns image shapes before workers start) use it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from pipeline.jobs import ScanSpec, canonical_json
from pipeline.store import ImageShape


# ---------------------------------------------------------------------------------------------
def load(spec: ScanSpec):
    """The scan's data (pipeline.io): gray unless the task takes colour (natural-image tasks);
    a measured CT sinogram as raw numbers (not an image to normalise)."""
    from pipeline.io import load_array, load_scan
    from recon.tasks import get_task

    if spec.kind == "measured" and spec.task == "ct":
        return load_array(spec.source)
    gray = not spec.color or get_task(spec.task).gray_only
    return load_scan(spec.source, size=spec.size, grayscale=gray)


def build_problem(spec: ScanSpec, seed: int, data=None):
    """The recon.Problem for this scan: simulated from its ground-truth image, or from its
    measured data (fastMRI k-space, a CT sinogram) with an optional reference image. The one
    path from a scan to a problem, for the worker, the driver and `dipcohort recon`.
    Its random draws (noise, masks, MRI phase and coil maps) come from (scan id, seed): no two scans share one,
    and every solver of a scan and seed sees the same measurements."""
    from pipeline.io import ScanError, load_scan
    from recon.rng import measurement_seed
    from recon.tasks import from_measurements, simulate

    seed = measurement_seed(spec.id, seed)
    data = load(spec) if data is None else data
    params = dict(spec.task_params)
    if spec.kind == "simulate":
        if data.image is None:
            raise ScanError(f"{spec.source}: has no image to simulate task {spec.task!r} from")
        return simulate(spec.task, data.image, params, seed)
    reference = None
    if spec.reference:
        reference = load_scan(spec.reference, size=spec.size, grayscale=True).image
    return from_measurements(spec.task, data, params, reference=reference, seed=seed)


def image_shape(problem) -> ImageShape:
    from recon.tasks import degraded_image

    _, c, h, w = problem.image_shape
    return ImageShape(channels=int(c), display_channels=int(degraded_image(problem).shape[1]),
                      height=int(h), width=int(w))


def probe_shapes(scans: Sequence[ScanSpec], threads: int = 4) -> dict[str, ImageShape]:
    """Image shape of every scan, for the driver to create image groups before workers start.

    Scans are loaded in a few threads (I/O bound); a problem is built once per distinct
    (task, params, kind, array shapes), since the shape depends on nothing else.
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:
        data = list(pool.map(load, scans))
    by_signature: dict[str, ImageShape] = {}
    out: dict[str, ImageShape] = {}
    for spec, d in zip(scans, data):
        arrays = [list(d.shape)] if isinstance(d, np.ndarray) else \
            {k: list(np.shape(v)) for k, v in vars(d).items() if isinstance(v, np.ndarray)}
        key = canonical_json([spec.task, spec.task_params, spec.kind, spec.reference, arrays])
        if key not in by_signature:
            by_signature[key] = image_shape(build_problem(spec, 0, d))
        out[spec.id] = by_signature[key]
    return out


def reference_image(problem) -> torch.Tensor | None:
    """The ground truth in display format (1, Cd, H, W), or None without one."""
    gt = problem.ground_truth
    return None if gt is None else problem.display(gt).detach().float().cpu()
