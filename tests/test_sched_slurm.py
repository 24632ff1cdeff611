"""Slurm backend (submitit) against a real Slurm (scripts/slurm-local.sh up): same numbers as the
local backend; --no-wait, then `dipcohort status`, then a rerun that follows the queued jobs
instead of submitting them again; `scontrol requeue` of a running task resumes its job from the
solver checkpoint with the numbers of an uninterrupted run."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

import sched_common as sc
from pipeline.progress import Progress

pytest.importorskip("submitit", reason="submitit is not installed (pip install 'dipcohort[slurm]')")


def _slurm_up() -> str | None:
    """None when a partition is up, else why the Slurm tests skip."""
    if not sc.have("sinfo") or not sc.have("sbatch"):
        return "no Slurm client (sinfo/sbatch) on this machine; `scripts/slurm-local.sh up` installs a local one"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not reachable (scripts/slurm-local.sh up)"
    states = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not any(s[0] == "up" and s[1].rstrip("*") in ("idle", "mix", "alloc") for s in states):
        said = out.stdout.strip() or out.stderr.strip()
        return f"no Slurm partition is up (sinfo: {said}); run scripts/slurm-local.sh up"
    return None


_WHY = _slurm_up()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]


def _submissions(out) -> list[dict]:
    from pipeline.store import work_dir

    path = work_dir(out) / "slurm" / "submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_wait_status_then_rerun_follows_and_matches_local(tmp_path):
    from schedulers.slurm import active_jobs, max_array_size

    manifest = sc.write_manifest(tmp_path / "cohort.yaml", steps=120)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "slurm.zarr"
    common = ("--out", str(out), "--backend", "slurm", "--device", "cpu", "--progress", "plain")
    submit = sc.cli("run", str(manifest), *common, "--no-wait", "--array-parallelism", "2")
    assert "not waiting" in submit.stderr
    records = _submissions(out)
    # arrays are split at MaxArraySize (3 on scripts/slurm-local.sh's cluster: arrays of 3 and 1 jobs)
    limit = max_array_size()
    assert len(records) == -(-4 // limit)
    assert sorted(len(r["jobs"]) for r in records) == sorted([min(limit, 4 - i) for i in range(0, 4, limit)])
    slurm_ids = {r["slurm_job"] for r in records}
    # returned at submission: the arrays are still in the queue (each task needs seconds to start python)
    assert active_jobs(sorted(slurm_ids)) == slurm_ids
    status = sc.cli("status", str(out)).stdout
    counts = dict(re.findall(r"(pending|running|done|failed|diverged) (\d+)", status))
    assert "4 jobs" in status and int(counts["pending"]) + int(counts["running"]) > 0

    # a rerun while the array is queued submits nothing new and waits for the queued jobs
    follow = sc.cli("run", str(manifest), *common, "-o", "poll_s=1")
    assert "still queued or running from an earlier submission" in follow.stderr
    assert len(_submissions(out)) == len(records)
    assert "done 4" in follow.stdout
    assert set(sc.statuses(out).values()) == {"done"}
    assert set(sc.attempts(out).values()) == {1}
    assert set(sc.threads(out).values()) == {1}
    sc.assert_same_results(out, reference)
    # each job's log names its Slurm task; logs/<job>.slurm.out links to submitit's stdout
    from pipeline.store import log_path

    array_of = {job_id: r["slurm_job"] for r in records for job_id in r["jobs"]}
    for job_id in sc.statuses(out):
        assert f"slurm: job {array_of[job_id]}" in sc.log_text(out, job_id)
        linked = log_path(out, job_id).with_suffix(".slurm.out")
        assert linked.is_symlink() and f"job {job_id}: done" in linked.read_text()


def test_split_parallelism_caps_add_up():
    from schedulers.slurm import split_parallelism

    assert split_parallelism(256, 1) == [256]
    assert split_parallelism(5, 2) == [3, 2]
    assert split_parallelism(2, 3) == [1, 1, 1]   # the third array waits for the first (dependency)


def test_requeued_task_resumes_from_checkpoint_with_same_numbers(tmp_path):
    from pipeline.store import checkpoint_path
    from pipeline.worker import run_job
    from schedulers.slurm import SlurmBackend

    # ~20 s of solving on an idle core: long enough that the requeue always lands mid-run
    manifest = sc.write_manifest(tmp_path / "long.yaml", steps=2000, seeds=(0,), scans={"cam": "skimage:camera"},
                                 checkpoint_every=20)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "requeue.zarr"
    jobs = sc.make_store(manifest, out)
    (job,) = jobs
    SlurmBackend(device="cpu", wait=False).run(jobs, out, Progress(), run_job)
    (record,) = _submissions(out)
    # once the job has written a checkpoint, requeue its task (Slurm kills it and queues it again)
    sc.wait_for(lambda: checkpoint_path(out, job.job_id).is_file(), 180, "the job's first checkpoint")
    subprocess.run(["scontrol", "requeue", record["slurm_job"]], check=True, capture_output=True, timeout=30)
    progress = Progress()
    SlurmBackend(device="cpu", poll_s=1).run(jobs, out, progress, run_job)  # follows the queued task
    assert progress.counts["done"] == 1
    assert sc.statuses(out) == {job.job_id: "done"}
    assert sc.attempts(out)[job.job_id] == 2
    log = sc.log_text(out, job.job_id)
    assert log.count("start job") == 2 and "resuming from checkpoint" in log
    assert not checkpoint_path(out, job.job_id).exists()   # removed once the results were stored
    sc.assert_same_results(out, reference)
