"""The worker: results and ledger (status last), failure and divergence isolation, resume."""
from __future__ import annotations

import io
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import store as st
from pipeline.driver import create_cohort_store
from pipeline.jobs import STATUS_CODES
from pipeline.manifest import load_manifest
from pipeline.progress import Progress
from pipeline.scans import build_problem
from pipeline.worker import run_job
from schedulers import get_backend

STEPS = 20


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: no oversubscription
    yield
    torch.set_num_threads(before)


def cohort(tmp_path: Path, solvers: str, scans: str | None = None, extra: str = "") -> tuple[Path, list]:
    np.save(tmp_path / "img.npy", np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32))
    scans = scans or """
  - {id: cam, source: "skimage:camera", task: denoise, params: {sigma: 25}}
  - {id: file, source: img.npy, task: inpaint, params: {hole_ratio: 0.25}}"""
    (tmp_path / "m.yaml").write_text(f"""
cohort: worker-test
steps: {STEPS}
size: 32
metrics: {{ssim_every: 5}}
{extra}
scans:{scans}
solvers:
{solvers}
""")
    manifest = load_manifest(tmp_path / "m.yaml")
    out = tmp_path / "res.zarr"
    jobs = create_cohort_store(out, manifest, io.StringIO())
    return out, jobs


def ledger(out: Path) -> dict[str, np.ndarray]:
    """The ledger as the store's readers see it (a job run without the driver: its entry unsettled)."""
    return st.read_ledger(st.open_store(out))[0]


def test_success_writes_everything_and_status_last(tmp_path, monkeypatch):
    out, jobs = cohort(tmp_path, "  - {name: es-dip, params: {network: tiny, variance_window: 5, patience: 5}}")
    job = jobs[0]
    writes: list[str] = []
    original = zarr.Array.__setitem__

    def recording(self, key, value):
        writes.append(self.path)
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", recording)
    assert run_job(job, out, device="cpu") == "done"
    monkeypatch.undo()

    # the worker's ledger is its entry alone (one file, rewritten whole), never the columns
    assert {w for w in writes if w.startswith("jobs/")} == {"jobs/entry"}
    assert writes[0] == "jobs/entry" and writes[-1] == "jobs/entry", "'running' first, the outcome last"
    data = {"metrics/values", "summary/values", f"images/{job.image_group}/final",
            f"images/{job.image_group}/reference", f"images/{job.image_group}/degraded"}
    assert data <= set(writes[:-1])
    entries = st.read_entries(zarr.open_group(str(out), mode="r")["jobs"], [job.index])[0]
    assert entries[job.index]["status"] == STATUS_CODES["done"] and entries[job.index]["checksum"]

    root = zarr.open_group(str(out), mode="r")
    i = job.index
    g = ledger(out)
    assert g["status"][i] == STATUS_CODES["done"] and g["attempts"][i] == 1
    assert g["device"][i] == "cpu" and g["error"][i] == "" and g["runtime_s"][i] > 0
    # off a cluster the node is the host; only Ray records a Ray node id
    assert g["node"][i] == g["host"][i] == socket.gethostname() and g["ray_node_id"][i] == ""
    names = list(root.attrs["metric_names"])
    m = root["metrics/values"][i]
    steps_run = int(root["summary/values"][i][list(st.SUMMARY_FIELDS).index("steps")])
    assert 0 < steps_run <= STEPS
    assert np.isfinite(m[names.index("loss"), :steps_run]).all()
    assert np.isfinite(m[names.index("psnr"), :steps_run]).all()
    assert np.isfinite(m[names.index("ssim"), 0])  # ssim_every 5: step 0 computed
    assert np.isnan(m[names.index("ssim"), 1])      # ...step 1 not
    assert names == [*st.BASE_METRICS, "data"]  # es-dip's one term: data
    np.testing.assert_array_equal(m[names.index("data"), :steps_run], m[names.index("loss"), :steps_run])
    assert np.isfinite(m[names.index("movvar"), 4:steps_run]).all()  # window 5
    summary = dict(zip(st.SUMMARY_FIELDS, root["summary/values"][i]))
    assert math.isfinite(summary["final_psnr"]) and math.isfinite(summary["peak_psnr"])
    assert summary["peak_psnr"] >= np.nanmax(m[names.index("psnr")]) - 1e-4

    grp = root["images"][job.image_group]
    r = job.image_index
    problem = build_problem(job.scan, job.seed)
    np.testing.assert_allclose(grp["reference"][r], problem.ground_truth[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(grp["degraded"][r], problem.measurements[0].numpy(), atol=1e-6)
    final = grp["final"][r]
    assert final.shape == (1, 32, 32) and np.isfinite(final).all()
    # the stored final image has the PSNR the summary reports
    mse = float(np.mean((final - grp["reference"][r]) ** 2))
    assert abs(10 * math.log10(1.0 / mse) - summary["final_psnr"]) < 1e-3
    log = Path(st.resolve_in_store(out, str(g["log_path"][i]))).read_text()  # stored relative to the store
    assert f"start job {job.job_id}" in log and f"end job {job.job_id}: done" in log

    assert run_job(job, out, device="cpu") == "done"  # a rerun counts a second attempt
    assert ledger(out)["attempts"][i] == 2


def test_exception_is_failed_with_traceback_and_other_jobs_still_run(tmp_path):
    out, jobs = cohort(tmp_path, "  - {name: dip, params: {network: tiny}}", scans="""
  - {id: a, source: "skimage:camera", task: denoise}
  - {id: gone, source: img.npy, task: denoise}
  - {id: c, source: "skimage:moon", task: denoise}""")
    (tmp_path / "img.npy").unlink()  # the file disappears after the store was made
    progress = Progress()
    progress.start(len(jobs))
    get_backend("local", device="cpu").run(jobs, out, progress, run_job)
    assert progress.counts == {"done": 2, "failed": 1}

    table = st.ledger_table(out)
    assert list(table["status"]) == ["done", "failed", "done"]
    error = table["error"][1]
    assert "no such file" in error and "Traceback (most recent call last)" in error
    assert "pipeline/worker.py" in error  # the traceback names where it happened
    log = Path(table["log_path"][1]).read_text()
    assert "no such file" in log and "Traceback" in log and "end job" in log
    root = zarr.open_group(str(out), mode="r")
    assert np.isnan(root["metrics/values"][1]).all()  # nothing half-written for the failed job


def test_non_finite_loss_is_diverged_with_metrics_kept(tmp_path):
    # Adam with lr 1e8 blows the tiny network up within a few steps (a real divergence)
    out, jobs = cohort(tmp_path, "  - {name: dip, params: {network: tiny, lr: 1.0e+8}}",
                       scans='\n  - {id: a, source: "skimage:camera", task: denoise}')
    assert run_job(jobs[0], out, device="cpu") == "diverged"
    root = zarr.open_group(str(out), mode="r")
    names = list(root.attrs["metric_names"])
    loss = root["metrics/values"][0][names.index("loss")]
    bad = int(np.flatnonzero(~np.isfinite(loss))[0])
    assert 0 < bad < STEPS - 1
    assert np.isfinite(loss[:bad]).all(), "metrics before the divergence are kept"
    assert np.isfinite(root["metrics/values"][0][names.index("psnr"), :bad]).all()
    assert np.isnan(loss[bad + 1:]).all()
    summary = dict(zip(st.SUMMARY_FIELDS, root["summary/values"][0]))
    assert summary["diverged"] == 1.0 and summary["steps"] == bad + 1
    assert ledger(out)["status"][0] == STATUS_CODES["diverged"]


def test_resumes_from_checkpoint_with_the_same_numbers(tmp_path):
    from recon.solvers import run_solver

    from recon.rng import solver_seed

    solvers, scans = "  - {name: dip, params: {network: tiny}}", '\n  - {id: b, source: "skimage:camera", task: denoise}'
    (tmp_path / "fresh").mkdir()
    fresh, (a,) = cohort(tmp_path / "fresh", solvers, extra="checkpoint_every: 10", scans=scans)
    out, (b,) = cohort(tmp_path, solvers, extra="checkpoint_every: 10", scans=scans)
    # the same job in two stores: uninterrupted in one (draws per scan id: no other row shares its numbers)
    assert run_job(a, fresh, device="cpu") == "done"
    ckpt = st.checkpoint_path(out, b.job_id)
    assert not st.checkpoint_path(fresh, a.job_id).exists(), "checkpoint removed after a successful write"
    # an interrupted run of b: a checkpoint at step 10 is left behind (as after a Slurm requeue)
    run_solver(b.solver, build_problem(b.scan, b.seed), steps=STEPS, params=b.params,
               seed=solver_seed(b.scan.id, b.seed), device="cpu",
               ssim_every=b.ssim_every, checkpoint_path=ckpt, checkpoint_every=10)
    assert ckpt.is_file()
    assert run_job(b, out, device="cpu") == "done"
    assert "resuming from checkpoint" in st.log_path(out, b.job_id).read_text()
    assert not ckpt.exists()
    root, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(fresh), mode="r")
    np.testing.assert_array_equal(root["metrics/values"][b.index], ref["metrics/values"][a.index])
    np.testing.assert_array_equal(root["images"][b.image_group]["final"][b.image_index],
                                  ref["images"][a.image_group]["final"][a.image_index])


def test_running_job_renews_its_heartbeat(tmp_path, monkeypatch):
    import pipeline.worker as worker

    out, jobs = cohort(tmp_path, "  - {name: dip, params: {network: tiny}}",
                       scans='\n  - {id: a, source: "skimage:camera", task: denoise}')
    beats: list[float] = []
    original = st.JobWriter.heartbeat
    monkeypatch.setattr(worker, "JOB_HEARTBEAT_S", 0.0)   # every progress call (every 10 steps)
    monkeypatch.setattr(st.JobWriter, "heartbeat", lambda self: (beats.append(1), original(self)))
    assert run_job(jobs[0], out, device="cpu") == "done"
    assert len(beats) >= STEPS // 10 - 1
    g = ledger(out)
    assert g["heartbeat"][0] > 0 and g["threads"][0] == 1


def test_stop_request_interrupts_at_a_step_and_the_rerun_continues_exactly(tmp_path, monkeypatch):
    """The driver's stop request (pipeline.lease.request_stop): the job stops at a step boundary,
    leaves a checkpoint, is recorded 'interrupted'; run again, it continues to the numbers of an
    uninterrupted run. A job not started yet is left untouched."""
    import pipeline.lease as lease
    from pipeline.lease import clear_stop, request_stop
    from recon.solvers import loop

    monkeypatch.setattr(lease, "STOP_POLL_S", 0.0)   # look at every step: the stop lands at step 8
    solvers, scans = "  - {name: dip, params: {network: tiny}}", '\n  - {id: b, source: "skimage:camera", task: denoise}'
    (tmp_path / "fresh").mkdir()
    fresh, (a,) = cohort(tmp_path / "fresh", solvers, scans=scans)
    out, (b,) = cohort(tmp_path, solvers, scans=scans)
    assert run_job(a, fresh, device="cpu") == "done"   # the same job uninterrupted, in a store of its own
    original = loop.Loop.push
    calls = []

    def stop_after_7(self, k, out):   # the driver asks to stop during step 7
        calls.append(k)
        if k == 7:
            request_stop(out_store, "test")
        return original(self, k, out)

    out_store = out
    loop.Loop.push = stop_after_7
    try:
        assert run_job(b, out, device="cpu") == "interrupted"
    finally:
        loop.Loop.push = original
    root = zarr.open_group(str(out), mode="r")
    assert ledger(out)["status"][b.index] == STATUS_CODES["interrupted"]
    assert "stopped by the driver" in str(ledger(out)["error"][b.index])
    assert st.checkpoint_path(out, b.job_id).is_file()
    assert max(calls) == 7   # stopped at the next step boundary
    assert run_job(b, out, device="cpu") == "interrupted"   # still asked to stop: not even started
    assert ledger(out)["attempts"][b.index] == 1
    clear_stop(out)
    assert run_job(b, out, device="cpu") == "done"
    assert "resuming from checkpoint" in st.log_path(out, b.job_id).read_text()
    root, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(fresh), mode="r")
    np.testing.assert_array_equal(root["metrics/values"][b.index], ref["metrics/values"][a.index])
    np.testing.assert_array_equal(root["images"][b.image_group]["final"][b.image_index],
                                  ref["images"][a.image_group]["final"][a.image_index])
