"""How the suite shares a machine when run in parallel (`make test`: pytest-xdist, `-n 2 --dist loadfile`).

Tests are handed out a file at a time, except two groups of files that each run on one worker,
one test after another:
- slurm: the tests on the one Slurm cluster of scripts/slurm-local.sh; they check which of its two
  nodes ran what, which a second test's tasks would change;
- ray: the tests that start Ray clusters (several at once would share 2 cores with their raylets).
Both go out first: they are the longest, and the other files fill the other worker meanwhile.
Run without xdist (`pytest tests/...`), none of this changes anything.

The groups are made by the scheduler below, not by `xdist_group` marks: `--dist loadgroup` of
pytest-xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads, so its groups are ignored.
"""
from __future__ import annotations

import os
from pathlib import Path

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


def group_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its group's name, else its file."""
    path = nodeid.split("::", 1)[0]
    return GROUP_OF.get(Path(path).stem, path)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """For `--dist loadfile` (what `make test` asks for); other modes are xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndGroups(LoadScopeScheduling):
        """LoadScope with a file as the scope, or a group of files (GROUPS)."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return FilesAndGroups(config, log)


def pytest_collection_modifyitems(config, items):
    # the two groups first, in a stable sort (with --no-loadscope-reorder xdist keeps this order)
    def rank(item) -> int:
        group = group_of(item.nodeid)
        return FIRST.index(group) if group in FIRST else len(FIRST)
    items.sort(key=rank)
