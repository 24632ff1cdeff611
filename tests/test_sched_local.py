"""Local process pool (`--workers N`): same job ids and numbers as the sequential backend, even when
a worker process is killed mid-job (it is replaced and its job retried)."""
from __future__ import annotations

import threading

import pytest

import sched_common as sc
from pipeline.progress import Progress
from pipeline.worker import run_job
from schedulers.local import LocalBackend, worker_devices


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("sched-local")
    manifest = sc.write_manifest(base / "cohort.yaml", steps=120)
    return manifest, sc.reference_store(manifest, base)


def test_pool_of_two_matches_sequential_and_replaces_a_killed_worker(cohort, tmp_path):
    manifest, reference = cohort
    out = tmp_path / "pool-kill.zarr"
    jobs = sc.make_store(manifest, out)
    progress = Progress()
    backend = LocalBackend(device="cpu", workers=2)   # default settings: threads come from the jobs
    runner = threading.Thread(target=backend.run, args=(jobs, out, progress, run_job))
    runner.start()
    try:
        # both workers busy (jobs 0 and 1 started, 4 jobs in all): kill one of them mid-job
        sc.wait_for(lambda: all("start job" in sc.log_text(out, j.job_id) for j in jobs[:2]), 120,
                    "the first two jobs to start")
        sc.kill_a_pool_worker(2)
    finally:
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert sorted(tries.values()) == [1, 1, 1, 2]   # the killed job ran again, the others once
    retried = [j for j, n in tries.items() if n == 2][0]
    assert sc.log_text(out, retried).count("start job") == 2
    assert progress.counts["done"] == len(jobs)
    assert set(sc.threads(out).values()) == {1}
    sc.assert_same_results(out, reference)


def test_a_worker_killed_while_starting_is_replaced_and_its_job_run(cohort, tmp_path):
    """Killed before it read the job handed to it (as a Ctrl-C to the process group can kill a worker
    still importing): the pipe resets rather than ends, and the pool still replaces the worker."""
    import os
    import signal
    import time

    manifest, reference = cohort
    out = tmp_path / "pool-start-kill.zarr"
    jobs = sc.make_store(manifest, out)
    backend = LocalBackend(device="cpu", workers=2)
    runner = threading.Thread(target=backend.run, args=(jobs, out, Progress(), run_job))
    runner.start()
    try:
        workers = sc.wait_for(lambda: sc.pool_workers(os.getpid()), 60, "a pool worker to start", every=0.005)
        time.sleep(0.3)   # its job is in the pipe by now, a second before the worker's imports end
        os.kill(workers[0], signal.SIGKILL)
    finally:
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert set(sc.statuses(out).values()) == {"done"}
    assert all("start job" in sc.log_text(out, j.job_id) for j in jobs)
    sc.assert_same_results(out, reference)


def test_job_threads_are_its_cpus_sequential_and_pool(tmp_path):
    """resources.cpus: 2 gives 2 torch threads in the driver process and in pool workers alike
    (recorded in the ledger), the same numbers, and the caller's thread count back afterwards."""
    import torch

    manifest = sc.write_manifest(tmp_path / "two.yaml", steps=30, seeds=(0,), cpus=2)
    before = torch.get_num_threads()
    reference = sc.reference_store(manifest, tmp_path)
    assert torch.get_num_threads() == before
    assert set(sc.threads(reference).values()) == {2}
    out = tmp_path / "pool.zarr"
    jobs = sc.make_store(manifest, out)
    LocalBackend(device="cpu", workers=2).run(jobs, out, Progress(), run_job)
    assert set(sc.threads(out).values()) == {2}
    sc.assert_same_results(out, reference)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="no option.*threads.*its options: device, max_retries, workers"):
        LocalBackend(threads=1)


def test_worker_devices_round_robin_and_cpu():
    assert worker_devices(3, "cpu") == ["cpu"] * 3
    assert worker_devices(2, "cuda:1") == ["cuda:1"] * 2
    import torch

    if torch.cuda.device_count() == 0:
        assert worker_devices(2, None) == ["cpu", "cpu"]
        with pytest.raises(ValueError, match="no GPU"):
            worker_devices(2, "cuda")
    else:
        n = torch.cuda.device_count()
        assert worker_devices(n + 1, None) == [f"cuda:{i % n}" for i in range(n + 1)]
