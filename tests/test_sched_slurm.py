"""Slurm backend (submitit) against a real Slurm (scripts/slurm-local.sh up; CI: NODES=2): same
numbers as the local backend; --no-wait, then `dipcohort status`, then a rerun that follows the
queued jobs instead of submitting them again, array tasks on both nodes; Slurm's USR2 and
`scontrol requeue` of a running task stop its job at a step boundary with a checkpoint, and the
requeued task resumes at that step with the numbers of an uninterrupted run; a node taken down
loses nothing. Also, without running anything: the sbatch file (no wckey, SRUN_CPUS_PER_TASK),
the `--jobs-per-task auto` rule and the polling (what it reads, how often).

The cluster tests run real cohorts (20-120 s each on a loaded 2-core machine): submitting,
starting Python on a node and requeueing take seconds each in Slurm."""
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


def _nodes() -> list[str]:
    return sorted(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                                 timeout=20).stdout.split())


def _ledger(out, name: str) -> dict[str, str]:
    return {j: str(v) for j, v in sc.ledger_field(out, name).items()}


def _log(out, job_id: str) -> str:
    """What `dipcohort status OUT --log JOB` prints (in this process)."""
    from pipeline.store import job_log_text
    from pipeline.worker import log_section

    return log_section(job_log_text(out, job_id), job_id)


def test_no_wait_status_then_rerun_follows_and_matches_local(tmp_path):
    from pipeline.store import work_dir
    from schedulers.slurm import active_jobs, auto_jobs_per_task, max_array_size

    # 2 CPUs a job: a node of scripts/slurm-local.sh (2 CPUs) holds one task at a time, so the two
    # tasks that --array-parallelism 2 lets run at once sit on two nodes
    manifest = sc.write_manifest(tmp_path / "cohort.yaml", steps=120, cpus=2)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "slurm.zarr"
    common = ("--out", str(out), "--backend", "slurm", "--device", "cpu", "--progress", "plain")
    submit = sc.cli("run", str(manifest), *common, "--no-wait", "--array-parallelism", "2")
    assert "not waiting" in submit.stderr
    records = _submissions(out)
    # --jobs-per-task auto: time_min 10 fits 3 jobs in 30 min, but 4 jobs over 2 running tasks: 2 each
    per_task = auto_jobs_per_task(10, 4, 2)
    assert per_task == 2
    tasks = [t for r in records for t in r["tasks"].values()]
    assert sorted(tasks.count(t) for t in set(tasks)) == [per_task] * (4 // per_task)
    # arrays are split at MaxArraySize (3 on scripts/slurm-local.sh's cluster)
    assert len(records) == -(-len(set(tasks)) // max_array_size())
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
    assert set(sc.threads(out).values()) == {2}
    sc.assert_same_results(out, reference)
    nodes = _ledger(out, "node")
    assert set(nodes.values()) <= set(_nodes())
    if len(_nodes()) >= 2:  # CI's 2-node cluster: the array tasks ran on both nodes
        assert len(set(nodes.values())) >= 2, nodes
    # each job's log section (in its array task's one log file) names its Slurm task and node
    for k, (job_id, task) in enumerate((j, t) for r in records for j, t in r["tasks"].items()):
        log = sc.cli("status", str(out), "--log", job_id).stdout if k == 0 else _log(out, job_id)
        assert log.count(f"=== job {job_id} begin ===") == 1 and f"=== job {job_id} end ===" in log
        assert f"slurm: job {task} on node {nodes[job_id]}" in log and f"job {job_id}: done" in log
        assert "=== job " not in log.replace(f"=== job {job_id} ", "")   # no other job's section
    # work files the admin sees: per array its sbatch file, per task one log; pickles removed
    folder = work_dir(out) / "slurm"
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.endswith(".pkl")], files
    assert len([f for f in files if f.endswith("_log.out")]) == len(set(tasks))
    assert not (work_dir(out) / "logs").exists()    # no per-job log files
    scripts = [p for p in folder.iterdir() if p.suffix == ".sh"]   # submitit: .submission_file_<uuid>.sh
    assert len(scripts) == len(records)
    for script in scripts:
        text = script.read_text()
        assert "--wckey" not in text and "export SRUN_CPUS_PER_TASK=2" in text


def test_sbatch_file_has_no_wckey_unless_asked_and_exports_srun_cpus(tmp_path):
    from schedulers.slurm import SlurmBackend

    def sbatch_text(**options) -> str:
        ex = SlurmBackend(device="cpu", **options)._executor(tmp_path, (0, 3, 1.0, 10.0), 2, "c")
        return ex._make_submission_file_text("python -c pass", "uid")

    plain = sbatch_text()
    assert "--wckey" not in plain                                # submitit's default --wckey=submitit is gone
    assert "export SRUN_CPUS_PER_TASK=3" in plain and "#SBATCH --cpus-per-task=3" in plain
    assert "#SBATCH --signal=USR2@90" in plain and "#SBATCH --requeue" in plain
    assert "#SBATCH --time=25" in plain                          # 2 jobs x 10 min + 5 min margin
    assert "#SBATCH --error" not in plain                        # one log file per task
    assert "#SBATCH --wckey=proj" in sbatch_text(sbatch={"wckey": "proj"})
    # one srun task, so one copy of the chunk, even on an exclusive node
    assert "#SBATCH --ntasks-per-node=1" in sbatch_text(sbatch={"exclusive": True})


def test_jobs_per_task_auto_rule():
    from schedulers.slurm import auto_jobs_per_task

    # floor(30 / time_min) jobs: 15-30 min of time limits per task while a job's limit is < 15 min
    assert auto_jobs_per_task(1, 10_000, 256) == 30
    assert auto_jobs_per_task(2, 10_000, 256) == 15
    assert auto_jobs_per_task(7, 10_000, 256) == 4              # 28 min
    assert auto_jobs_per_task(14, 10_000, 256) == 2             # 28 min
    assert auto_jobs_per_task(16, 10_000, 256) == 1             # longer than 15 min: one job a task
    assert auto_jobs_per_task(120, 10_000, 256) == 1
    # never fewer tasks than --array-parallelism: 100 jobs over 256 running tasks stay 1 a task
    assert auto_jobs_per_task(1, 100, 256) == 1
    assert auto_jobs_per_task(1, 100, 10) == 10


def test_poll_reads_only_jobs_of_started_tasks_once_per_interval(tmp_path, monkeypatch):
    import schedulers.slurm as slurm
    from pipeline.manifest import load_manifest
    from pipeline.store import Snapshot

    from dataclasses import replace

    jobs = load_manifest(sc.write_manifest(tmp_path / "c.yaml", seeds=(0, 1))).jobs   # 4 jobs, no store needed
    jobs = [replace(j, index=k) for k, j in enumerate(jobs)]                         # their ledger rows
    task_of = {j.job_id: f"7_{k}" for k, j in enumerate(jobs)}
    queue = [{"7_0": "RUNNING", "7_1": "PENDING", "7_2": "PENDING", "7_3": "PENDING"},  # poll 1
             {"7_2": "RUNNING", "7_3": "PENDING"},                                       # poll 2: 7_0, 7_1 left
             {"7_3": "RUNNING"}]                                                         # poll 3
    done = (2, 1)                                           # (status code, attempts): done, first attempt
    read, waits = [], []
    monkeypatch.setattr(slurm, "task_states", lambda ids: queue[len(read)] if len(read) < len(queue) else {})
    monkeypatch.setattr(slurm, "tidy", lambda folder, gone: None)

    def snapshot(store, look):
        read.append(sorted(task_of[j.job_id] for j in look))
        ended = {1: {"7_0"}, 2: {"7_1", "7_2"}, 3: {"7_3"}}.get(len(read), set())   # 7_1 ended unseen while pending
        return Snapshot({j.index: done if task_of[j.job_id] in ended else (1, 1) for j in look})

    monkeypatch.setattr(slurm, "snapshot", snapshot)
    backend = slurm.SlurmBackend(device="cpu")
    monkeypatch.setattr(backend.stopping, "wait", lambda timeout: waits.append(timeout) or False)
    progress = Progress()
    backend._poll({j.job_id: j for j in jobs}, set(), str(tmp_path / "s.zarr"), Snapshot({}), task_of, progress)
    # one ledger read per poll, of the jobs whose task is not pending only
    assert read == [["7_0"], ["7_1", "7_2"], ["7_3"]]
    assert waits == [30.0, 30.0]                                 # default: at most every 30 s
    assert progress.counts["done"] == 4


def test_split_parallelism_caps_add_up():
    from schedulers.slurm import split_parallelism

    assert split_parallelism(256, 1) == [256]
    assert split_parallelism(5, 2) == [3, 2]
    assert split_parallelism(2, 3) == [1, 1, 1]   # the third array waits for the first (dependency)


def test_usr2_and_requeue_stop_at_a_step_and_resume_there_with_same_numbers(tmp_path):
    from pipeline.store import checkpoint_path
    from pipeline.worker import run_job
    from schedulers.slurm import SlurmBackend

    # ~20 s of solving on an idle core; checkpoint_every 5000 > steps: no periodic checkpoint,
    # so every checkpoint here is one the signals made
    manifest = sc.write_manifest(tmp_path / "long.yaml", steps=2000, seeds=(0,), scans={"cam": "skimage:camera"},
                                 checkpoint_every=5000)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "requeue.zarr"
    jobs = sc.make_store(manifest, out)
    (job,) = jobs
    SlurmBackend(device="cpu", wait=False).run(jobs, out, Progress(), run_job)
    (record,) = _submissions(out)
    (task,) = record["tasks"].values()
    ckpt = checkpoint_path(out, job.job_id)

    def signal_mid_run(attempt: int, command: list[str]) -> int:
        """Once attempt `attempt` has run a few seconds, send the signal; the step it stopped at."""
        sc.wait_for(lambda: sc.attempts(out)[job.job_id] == attempt and sc.statuses(out)[job.job_id] == "running",
                    300, f"attempt {attempt} running")
        # the worker renews the heartbeat from the solver loop only: a newer one means steps are running
        started = _ledger(out, "heartbeat")[job.job_id]
        sc.wait_for(lambda: _ledger(out, "heartbeat")[job.job_id] != started, 300, f"attempt {attempt} solving")
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        sc.wait_for(lambda: sc.statuses(out)[job.job_id] == "interrupted", 120, "the job recording 'interrupted'")
        stopped = re.findall(r"stopped before step (\d+)", _log(out, job.job_id))
        assert len(stopped) == attempt and ckpt.is_file()
        return int(stopped[-1])

    # USR2: what Slurm sends 90 s before the time limit or a preemption (submitit then requeues)
    first = signal_mid_run(1, ["scancel", "--signal=USR2", task])
    # scontrol requeue: Slurm sends SIGTERM, kills the task KillWait later and queues it again
    second = signal_mid_run(2, ["scontrol", "requeue", task])
    progress = Progress()
    SlurmBackend(device="cpu", poll_s=1).run(jobs, out, progress, run_job)  # follows the queued task
    assert progress.counts["done"] == 1
    assert sc.statuses(out) == {job.job_id: "done"}
    assert sc.attempts(out)[job.job_id] == 3
    log = _log(out, job.job_id)
    assert "stopped by Slurm's SIGUSR2" in log and "stopped by Slurm's SIGTERM" in log
    # each restart resumed exactly where the signal stopped it: no step redone, none skipped
    assert [int(k) for k in re.findall(r"resuming from checkpoint \S+ at step (\d+)", log)] == [first, second]
    assert 0 < first < second < 2000
    assert not ckpt.exists()   # removed once the results were stored
    sc.assert_same_results(out, reference)


@pytest.mark.skipif(_WHY is None and len(_nodes()) < 2, reason="needs 2 Slurm nodes (NODES=2 scripts/slurm-local.sh up)")
def test_node_taken_down_loses_nothing(tmp_path):
    from pipeline.store import checkpoint_path

    manifest = sc.write_manifest(tmp_path / "down.yaml", steps=600, checkpoint_every=100)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "down.zarr"
    common = ("--out", str(out), "--backend", "slurm", "--device", "cpu", "--progress", "plain")
    # --exclusive: a task holds a whole node, so two run at once on two nodes
    sc.cli("run", str(manifest), *common, "--no-wait", "--jobs-per-task", "1", "--sbatch", "exclusive")
    nodes = lambda: _ledger(out, "node")  # noqa: E731
    running = lambda: [j for j, s in sc.statuses(out).items() if s == "running"]  # noqa: E731
    try:
        # a job running on n2, then n2 goes down under it
        victim = sc.wait_for(lambda: next((j for j in running() if nodes()[j] == "n2"), None), 300, "a job on n2")
        # a node going down kills its jobs without warning: they fall back to the periodic checkpoint
        sc.wait_for(lambda: checkpoint_path(out, victim).is_file(), 300, "the job's first periodic checkpoint")
        subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=dipcohort-test"], check=True,
                       capture_output=True, timeout=30)
        # Slurm requeues its task; it runs again on n1 while n2 is down
        sc.wait_for(lambda: sc.attempts(out)[victim] >= 2 and nodes()[victim] == "n1", 300, "the job again, on n1")
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True, timeout=30)
    follow = sc.cli("run", str(manifest), *common, "-o", "poll_s=1")   # one rerun command finishes the rest
    assert "done 4" in follow.stdout, follow.stdout + follow.stderr
    assert set(sc.statuses(out).values()) == {"done"}
    log = _log(out, victim)
    assert "on node n2" in log and "on node n1" in log and "resuming from checkpoint" in log
    sc.assert_same_results(out, reference)
