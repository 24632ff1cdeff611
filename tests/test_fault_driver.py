"""Kill the driver (`dipcohort run --workers 2`) in the middle of a cohort, rerun: only the
unfinished jobs run, the pool workers died with the driver, and the store ends complete with the
numbers of an uninterrupted run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import sched_common as sc


def test_killed_driver_rerun_runs_only_unfinished_jobs(tmp_path):
    manifest = sc.write_manifest(tmp_path / "cohort.yaml", steps=120)
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "driver.zarr"
    args = ["run", str(manifest), "--out", str(out), "--workers", "2", "--device", "cpu", "--progress", "plain"]
    driver = subprocess.Popen([sys.executable, "-m", "dipcohort", *args], cwd=sc.REPO, env=sc.cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # as soon as one job is done (the others pending or mid-run), kill the driver
        sc.wait_for(lambda: "done" in sc.ledger_if_created(out).values(), 240, "the first finished job")
        workers = sc.pool_workers(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    assert workers, "the driver had started no pool workers"
    # the pool workers die with the driver: nothing keeps writing into the store
    sc.wait_for(lambda: not any(sc.alive(p) for p in workers), 30, "the pool workers to exit")

    before = sc.statuses(out)
    finished = {j for j, s in before.items() if s == "done"}
    assert 1 <= len(finished) < 4
    rerun = sc.cli("run", *args[1:])
    assert f"{4 - len(finished)} of 4 jobs to run" in rerun.stdout
    assert re.search(r"done 4\b", rerun.stdout)
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert all(tries[j] == 1 for j in finished)   # finished jobs did not run again
    interrupted = [j for j, s in before.items() if s == "running"]
    assert all(tries[j] == 2 for j in interrupted)
    sc.assert_same_results(out, reference)

