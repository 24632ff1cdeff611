"""Aggregation on real Dask clusters: a 2-worker LocalCluster (processes) and a dask-jobqueue
SLURMCluster over the local Slurm give exactly the threaded run's statistics and compact copy;
an active client is used; `dipcohort aggregate --dask` prints the dashboard; bad values exit 2."""
from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

import store_factory as sf
from dipcohort.cli import main
from pipeline import dask_cluster, query
from pipeline.aggregate import COMPACT, aggregate

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")


def _results(path) -> tuple[xr.Dataset, np.ndarray]:
    import zarr

    stats = query.open_aggregate(path).load()
    compact = zarr.open_group(str(path), mode="r")[COMPACT]["metrics"][:]
    return stats, compact


def _assert_same(got, want) -> None:
    xr.testing.assert_equal(got[0], want[0])              # values and coordinates, exactly
    assert np.array_equal(got[1], want[1], equal_nan=True)


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    fab = sf.fabricate_store(tmp_path_factory.mktemp("dask") / "fab.zarr", statuses={3: "failed", 5: "diverged"})
    aggregate(fab.path, scheduler="threads", workers=2)
    return fab, _results(fab.path)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def test_local_cluster_equals_threads_given_or_active_client(fab, cluster):
    fab, threaded = fab
    with distributed.Client(cluster, set_as_default=False) as client:
        with distributed.get_task_stream(client) as given:
            aggregate(fab.path, client=client, full=True)
        _assert_same(_results(fab.path), threaded)
        assert len(given.data) > 0
    with distributed.Client(cluster) as client:               # made current: aggregate finds it
        with distributed.get_task_stream(client) as active:
            aggregate(fab.path, full=True)
        assert {t["worker"] for t in active.data} <= set(client.scheduler_info()["workers"])
        assert len(active.data) == len(given.data)            # every task went to the cluster
    _assert_same(_results(fab.path), threaded)


def test_cli_dask_address_prints_the_dashboard(fab, cluster, capsys):
    fab, threaded = fab
    assert main(["aggregate", str(fab.path), "--dask", cluster.scheduler_address, "--full"]) == 0
    out = capsys.readouterr().out
    assert f"Dask cluster {cluster.scheduler_address}: 2 workers; dashboard http" in out
    _assert_same(_results(fab.path), threaded)


@pytest.mark.parametrize("spec, said", [("local:0", "local:N needs a number"), ("slurm:two", "slurm:N needs"),
                                        ("threads", "expected tcp://HOST:PORT"),
                                        ("tcp://127.0.0.1:1", "no Dask scheduler answers there")])
def test_bad_dask_values_exit_2(fab, spec, said, capsys, monkeypatch):
    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT_S", 2)
    assert main(["aggregate", str(fab[0].path), "--dask", spec]) == 2
    err = capsys.readouterr().err
    assert said in err and "--dask" in err and "Traceback" not in err


def _slurm_skip() -> str | None:
    from test_sched_slurm import _WHY  # the Slurm tests' own check: a partition is up

    if _WHY:
        return _WHY
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'dipcohort[slurm]')"
    return None


def _slurm_nodes() -> tuple[list[str], int]:
    """The Slurm node names and the fewest CPUs of a node (sinfo)."""
    import subprocess

    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, timeout=20).stdout
    rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}
    return sorted(rows), min(rows.values())


@pytest.mark.slurm
def test_slurm_cluster_equals_threads_on_two_nodes(fab):
    why = _slurm_skip()
    if why:
        pytest.skip(why)
    import dask

    fab, threaded = fab
    names, cpus = _slurm_nodes()
    # on 2+ nodes a job asks for a whole node's CPUs, so the two workers land on two nodes
    cores = cpus if len(names) >= 2 else 1
    with dask.config.set({"jobqueue.slurm.cores": cores}), dask_cluster.connect("slurm", fab.path) as client:
        nodes = client.run(lambda: os.environ.get("SLURMD_NODENAME"))
        aggregate(fab.path, client=client, full=True)
    assert len(nodes) == 2 and set(nodes.values()) <= set(names)
    if len(names) >= 2:
        assert len(set(nodes.values())) == 2, nodes
    _assert_same(_results(fab.path), threaded)
    logs = sorted(p.name for p in (fab.path.parent / "fab.zarr.work" / "dask-slurm").iterdir())
    assert len([n for n in logs if n.endswith(".err")]) >= 2, logs
