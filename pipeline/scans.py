"""A scan spec becomes a reconstruction problem here: loading, simulation or measured data, shapes.

The one place that turns a `ScanSpec` (a manifest row, or the single-scan CLI's arguments) into a
`recon.Problem`; the worker and the driver (which learns image shapes before workers start) use it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.jobs import ScanSpec, canonical_json
from pipeline.store import ImageShape


# ---------------------------------------------------------------------------------------------
def load(spec: ScanSpec):
    """The scan's data (pipeline.io): gray unless the task takes colour (natural-image tasks)."""
    from pipeline.io import load_scan

    gray = not spec.color or spec.task in ("mri", "ct")
    return load_scan(spec.source, size=spec.size, grayscale=gray)


def build_problem(spec: ScanSpec, seed: int, data=None):
    """A recon.Problem for this scan: simulated from the ground truth, or from measured data.
    Its random draws (noise, masks, coil maps) come from (scan id, seed): no two scans share one."""
    from recon import simulate as sim
    from recon.rng import measurement_seed

    seed = measurement_seed(spec.id, seed)
    if spec.kind == "simulate":
        data = load(spec) if data is None else data
        return sim.simulate(spec.task, data.image, dict(spec.task_params), seed)
    reference = None
    if spec.reference:
        from pipeline.io import load_scan

        reference = load_scan(spec.reference, size=spec.size, grayscale=True).image
    if spec.task == "ct":  # a post-log sinogram: raw numbers, not an image to normalise
        measured = load_array(spec.source) if data is None else data
    else:  # fastMRI k-space (ScanData with kspace and its reference)
        measured = load(spec) if data is None else data
    if spec.task == "mri" and getattr(measured, "kspace", None) is not None:
        # the same problem the single-scan CLI builds (default acceleration included)
        from pipeline.io import scan_problem

        return scan_problem(measured, "mri", dict(spec.task_params), seed, reference=reference)
    return sim.from_measurements(spec.task, measured, dict(spec.task_params), reference=reference, seed=seed)


def load_array(source: str) -> np.ndarray:
    """A measured array (CT sinogram) from .npy or .npz (`FILE.npz#key=NAME`), without pickle."""
    file, _, fragment = source.partition("#")
    path = Path(file)
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"{source}: a measured sinogram must be a .npy or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        key = fragment.removeprefix("key=") or ("sinogram" if "sinogram" in loaded.files else None)
        if key is None and len(loaded.files) == 1:
            key = loaded.files[0]
        if key not in loaded.files:
            raise ValueError(f"{source}: expected an array named by '#key=NAME' or 'sinogram'; "
                             f"found {', '.join(loaded.files)}")
        return loaded[key]


def image_shape(problem) -> ImageShape:
    from recon.simulate import degraded_image

    _, c, h, w = problem.image_shape
    return ImageShape(channels=int(c), display_channels=int(degraded_image(problem).shape[1]),
                      height=int(h), width=int(w))


def probe_shapes(scans: Sequence[ScanSpec], threads: int = 4) -> dict[str, ImageShape]:
    """Image shape of every scan, for the driver to create image groups before workers start.

    Scans are loaded in a few threads (I/O bound); a problem is built once per distinct
    (task, params, kind, array shapes), since the shape depends on nothing else.
    """
    def loaded(spec: ScanSpec):
        return load_array(spec.source) if spec.kind == "measured" and spec.task == "ct" else load(spec)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        data = list(pool.map(loaded, scans))
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
