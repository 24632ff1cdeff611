"""The Ray backend on a real multi-node Ray cluster started on this machine (`ray.cluster_utils`:
a head without CPUs, so every job runs on a worker node, and two worker nodes of 1 CPU), driven
through the CLI with `--ray-address` (the code shipped with runtime_env):

- jobs run on both nodes (the ledger's ray_node_id and node), each node's warm worker (actor) runs
  several jobs in one process, and the numbers equal the local backend's;
- one node's raylet killed (SIGKILL) mid-job loses nothing: its running job is retried on the
  other node and a rerun has nothing left to do;
- a run whose jobs ask for a GPU the cluster does not have yet waits, says so, and runs when a
  node with a GPU joins (Ray's GPU resource on a node of this GPU-less machine; the jobs run on CPU).

The cluster is started once for the module (~6 s on a quiet machine, ~30 s on a loaded one) and
each test is one or two CLI runs of six 32 px jobs.
"""
from __future__ import annotations

import socket
import threading

import pytest

import sched_common as sc
from pipeline import store as st

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dipcohort[ray]')")

pytestmark = pytest.mark.ray

# node death noticed in seconds (Ray's default is about 30 s); generous for a loaded 2-core machine
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "_system_config": HEALTH})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes(timeout=120)
    yield c, nodes
    c.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray-cluster")
    manifest = sc.write_manifest(base / "cohort.yaml", steps=200, seeds=(0, 1, 2))  # jobs of ~1-2 s
    return manifest, sc.reference_store(manifest, base)


def ledger(store) -> dict[str, dict[str, object]]:
    """{field: {job id: value}} for the placement fields, or {} while the store is being created."""
    try:
        return {name: sc.ledger_field(store, name) for name in ("ray_node_id", "node", "host", "status")}
    except (KeyError, FileNotFoundError, ValueError, st.StoreError):
        return {}


def ray_run(manifest, out, address, *extra):
    return ("run", str(manifest), "--out", str(out), "--backend", "ray", "--ray-address", address,
            "--progress", "plain", *extra)


def test_cohort_on_two_nodes_survives_a_killed_raylet(cluster, cohort, tmp_path):
    from pipeline.jobs import STATUS_CODES

    c, (survivor, victim) = cluster
    manifest, reference = cohort
    out = tmp_path / "two-nodes.zarr"
    driver = sc.start_driver(*ray_run(manifest, out, c.address, "--device", "cpu"))
    running = STATUS_CODES["running"]

    seen_running: set[str] = set()

    def victim_starts():
        """A job that has just started on the victim, after one finished there: (job id) or None.
        Just started, so it still has most of its steps to go when the node is killed."""
        led = ledger(out)
        on_victim = [j for j, n in led.get("ray_node_id", {}).items() if n == victim.node_id]
        done = [j for j in on_victim if led["status"][j] == STATUS_CODES["done"]]
        busy = [j for j in on_victim if led["status"][j] == running]
        new = [j for j in busy if j not in seen_running]
        seen_running.update(busy)
        return new[0] if done and new else None

    try:
        sc.wait_for(victim_starts, 240, "a second job starting on the victim node", every=0.05)
        c.remove_node(victim, allow_graceful=False)  # SIGKILL to its raylet and the node's other processes
        # the jobs cut mid-run: still 'running' on the victim once its processes are dead (a job that
        # finished in the moment before the kill is done, not cut)
        led = ledger(out)
        cut = [j for j, n in led["ray_node_id"].items() if n == victim.node_id and led["status"][j] == running]
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert cut, "no job was running on the victim when it was killed"
    assert driver.returncode == 0, stderr
    assert set(sc.statuses(out).values()) == {"done"}
    led = ledger(out)
    attempts = sc.attempts(out)
    assert all(attempts[j] == 2 and led["ray_node_id"][j] == survivor.node_id for j in cut), attempts  # retried elsewhere
    assert all(n == 1 for j, n in attempts.items() if j not in cut)
    # jobs ran on both nodes; node names and the host are recorded (all nodes share this host here)
    assert set(led["ray_node_id"].values()) == {survivor.node_id, victim.node_id}
    assert all(led["node"].values()) and set(led["host"].values()) == {socket.gethostname()}
    # warm workers: the survivor's one actor ran all its jobs in one process
    on_survivor = [j for j, n in led["ray_node_id"].items() if n == survivor.node_id]
    assert len(on_survivor) >= 2 and len({sc.start_pids(out, j)[-1] for j in on_survivor}) == 1
    sc.assert_same_results(out, reference)

    rerun = sc.cli(*ray_run(manifest, out, c.address, "--device", "cpu"))
    assert f"0 of {len(attempts)} jobs to run" in rerun.stdout + rerun.stderr
    assert sc.attempts(out) == attempts


def test_run_waits_for_a_gpu_node_to_join(cluster, cohort, tmp_path):
    c, _ = cluster
    manifest, reference = cohort
    out = tmp_path / "scale-up.zarr"
    driver = sc.start_driver(*ray_run(manifest, out, c.address, "--gpus-per-job", "1"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(driver.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        sc.wait_for(lambda: any("waiting" in line and "Ray cluster" in line for line in lines), 240,
                    "the driver to say it waits for the cluster")
        assert not any(v for v in ledger(out).get("ray_node_id", {}).values())  # nothing could run yet
        gpu_node = c.add_node(num_cpus=1, num_gpus=1)  # the cluster scales up
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    reader.join(timeout=10)
    assert driver.returncode == 0, "".join(lines)
    note = next(line for line in lines if "waiting" in line)
    assert "asks 1 CPU(s) and 1 GPU(s)" in note and "0 GPUs" in note
    assert set(sc.statuses(out).values()) == {"done"}
    assert set(ledger(out)["ray_node_id"].values()) == {gpu_node.node_id}
    sc.assert_same_results(out, reference)


def test_each_request_gets_its_own_actors_and_one_no_node_holds_fails(cluster, tmp_path):
    """Two solver configurations asking for different CPUs: the 1-CPU jobs get 1-CPU actors of
    their own, although the first job's request (2 CPUs) fits no node of the 1-CPU cluster; after
    --ray-fit-timeout of an unchanged cluster those jobs fail, saying what they asked for and what
    the nodes have, and the run exits as for failed jobs."""
    c, _ = cluster
    manifest = sc.write_manifest(tmp_path / "mixed.yaml", steps=20, seeds=(0,), cohort="mixed")
    text = manifest.read_text().replace(
        "solvers:\n", "solvers:\n  - {name: es-dip, params: {network: tiny}, resources: {cpus: 2}}\n")
    manifest.write_text(text)
    out = tmp_path / "mixed.zarr"
    run = sc.cli(*ray_run(manifest, out, c.address, "--ray-fit-timeout", "5"), check=False)
    printed = run.stdout + run.stderr
    assert run.returncode == 1, printed
    table = st.ledger_table(out)
    assert sorted(table["status"][table["solver"] == "dip"]) == ["done"] * 2
    assert set(table["threads"][table["solver"] == "dip"]) == {1}
    wide = table[table["solver"] == "es-dip"]
    assert list(wide["status"]) == ["failed"] * 2 and set(wide["attempts"]) == {0}
    assert all("asks for 2 CPU(s) and 0 GPU(s)" in e and "live node(s)" in e and "1 CPU(s)" in e
               for e in wide["error"])
    assert "2 job(s) failed: no node of the Ray cluster can run this job" in printed
