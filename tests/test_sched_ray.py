"""Ray backend against a real local Ray cluster (2 CPUs, no dashboard): same ids and numbers as the
local backend; a warm worker (actor) runs job after job in one process and builds a CT geometry's
operator once; a worker killed mid-job is replaced and the job retried, the store ends intact; an
exception inside a job is recorded as failed and not retried. Multi-node: test_sched_ray_cluster.py."""
from __future__ import annotations

import os
import signal
import threading

import pytest

import sched_common as sc
from pipeline.progress import Progress

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dipcohort[ray]')")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("sched-ray")
    manifest = sc.write_manifest(base / "cohort.yaml", steps=120)
    return manifest, sc.reference_store(manifest, base)


def _run(jobs, out, **options):
    from pipeline.worker import run_job
    from schedulers import get_backend

    progress = Progress()
    progress.start(len(jobs))
    get_backend("ray", device="cpu", **options).run(jobs, out, progress, run_job)  # default settings
    return progress


def test_ray_matches_local(cluster, cohort, tmp_path):
    manifest, reference = cohort
    out = tmp_path / "ray.zarr"
    jobs = sc.make_store(manifest, out)
    progress = _run(jobs, out, max_in_flight=3)   # fewer in flight than jobs: the bounded queue refills
    assert progress.counts["done"] == len(jobs) == 4
    assert set(sc.statuses(out).values()) == {"done"}
    assert set(sc.attempts(out).values()) == {1}
    assert set(sc.threads(out).values()) == {1}   # the manifest's resources.cpus, as in the reference
    sc.assert_same_results(out, reference)


def test_killed_ray_worker_is_retried(cluster, cohort, tmp_path):
    """The actor running the job is killed (SIGKILL): a new actor runs the job again."""
    manifest, reference = cohort
    out = tmp_path / "ray-kill.zarr"
    jobs = sc.make_store(manifest, out)
    victim = jobs[0]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("progress", _run(jobs, out)))
    runner.start()
    try:
        sc.wait_for(lambda: "start job" in sc.log_text(out, victim.job_id), 120, "the first job to start")
        # Ray titles a worker process after the task it runs: ray::dipcohort:<job_id>
        pids = sc.wait_for(lambda: sc.pids_named(f"dipcohort:{victim.job_id}"), 30, "the job's Ray worker")
        os.kill(pids[0], signal.SIGKILL)
    finally:
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert result["progress"].counts["done"] == len(jobs)
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert tries[victim.job_id] == 2 and all(n == 1 for j, n in tries.items() if j != victim.job_id)
    assert sc.log_text(out, victim.job_id).count("start job") == 2
    sc.assert_same_results(out, reference)


def test_exception_in_job_is_failed_not_retried(cluster, tmp_path):
    import numpy as np
    from skimage import data

    image = tmp_path / "scan.npy"
    np.save(image, data.camera()[::16, ::16].astype(np.float32) / 255)
    manifest = sc.write_manifest(tmp_path / "bad.yaml", steps=20, seeds=(0,),
                                 scans={"good": "skimage:camera", "gone": str(image)})
    out = tmp_path / "bad.zarr"
    jobs = sc.make_store(manifest, out)
    image.unlink()  # the scan loaded when the store was made, and is gone when its job runs
    progress = _run(jobs, out)
    by_scan = {j.scan.id: j.job_id for j in jobs}
    assert sc.statuses(out) == {by_scan["good"]: "done", by_scan["gone"]: "failed"}
    assert sc.attempts(out)[by_scan["gone"]] == 1   # an exception is not a crash: no retry
    assert progress.counts == {"done": 1, "failed": 1}
    error = sc.ledger_field(out, "error")[by_scan["gone"]]
    assert "scan.npy" in error


def test_warm_worker_keeps_its_process_and_operator_cache(cluster, tmp_path):
    from pipeline.worker import run_job
    from schedulers.ray import JobRunner

    # three CT jobs of one geometry (32 px, 18 views), two scans: one actor runs them one after another
    manifest = sc.write_manifest(tmp_path / "ct.yaml", steps=5, seeds=(0, 1), task="ct", task_params="{}",
                                 scans={"cam": "skimage:camera", "moon": "skimage:moon"})
    out = tmp_path / "ct.zarr"
    jobs = sc.make_store(manifest, out)[:3]
    actor = ray.remote(JobRunner).options(num_cpus=1).remote("cpu", 0.0)
    try:
        pid = ray.get(actor.ready.remote())["pid"]
        assert [ray.get(actor.run.remote(run_job, job, str(out))) for job in jobs] == ["done"] * 3

        def probe(runner):
            import os

            from recon.operators.ct import operator_builds

            return os.getpid(), operator_builds()
        # built once for the three jobs (recon.operators.ct caches the operator of a geometry)
        assert ray.get(actor.__ray_call__.remote(probe)) == (pid, 1)
    finally:
        ray.kill(actor)
    assert {p for job in jobs for p in sc.start_pids(out, job.job_id)} == {pid}
