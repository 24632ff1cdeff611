"""dipcohort pipeline: manifests, workers, the Zarr results store, aggregation and xarray queries.

    import pipeline
    ds = pipeline.open_results("results/demo.zarr")      # per-job metrics over (job, step)
    agg = pipeline.open_aggregate("results/demo.zarr")   # per task × solver config statistics

The query helpers are imported on first use, so the command line does not pay for xarray/Dask
unless a command needs them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "open_results": "pipeline.query", "open_aggregate": "pipeline.query", "open_images": "pipeline.query",
    "load_image": "pipeline.query", "display_image": "pipeline.query", "image_groups": "pipeline.query",
}  # the aggregation itself: pipeline.aggregate.aggregate(store) (the module shares the name)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
