"""How the suite shares a machine when run in parallel (`make test`: pytest-xdist, `-n 2`).

Tests are handed out a file at a time (`--dist loadgroup`), except two groups that each run on one
worker, one test after another:
- slurm: the tests on the one Slurm cluster of scripts/slurm-local.sh; they check which of its two
  nodes ran what, which a second test's tasks would change;
- ray: the tests that start Ray clusters (several at once would share 2 cores with their raylets).
Both go out first: they are the longest, and the files fill the other worker meanwhile. Run without
xdist (`pytest tests/...`), none of this changes anything.
"""
from __future__ import annotations

import os

import pytest

GROUPS = {
    "slurm": ("test_sched_slurm", "test_aggregate_dask", "test_pack_pipeline"),
    "ray": ("test_sched_ray", "test_sched_ray_cluster", "test_tune", "test_fault_signals", "test_fault_backends"),
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}
FIRST = list(GROUPS)

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # one thread per worker on a 2-core machine: two workers at 2 threads each would oversubscribe
    # (a job sets its own threads from its resources.cpus, as in production)
    torch.set_num_threads(1)


def _group(item: pytest.Item) -> str:
    module = item.module.__name__.rpartition(".")[2] if item.module else item.nodeid
    return GROUP_OF.get(module, module)


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    # stable sort: the two groups first (with --no-loadscope-reorder xdist keeps this order)
    items.sort(key=lambda item: FIRST.index(_group(item)) if _group(item) in FIRST else len(FIRST))
