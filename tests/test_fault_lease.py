"""One driver at a time: a second driver exits 2 naming the holder (started while the first runs,
or both at once) or waits with --wait-lock; a stale lease (dead pid on this host, or an old
heartbeat from another host) is taken over and the jobs it left running are shown, recorded
interrupted and run again; nothing that was done runs again."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import zarr

import sched_common as sc
from dipcohort.cli import main
from pipeline.jobs import STATUS_CODES
from pipeline.lease import Lease, LeaseHeld, lease_path


@pytest.fixture
def manifest(tmp_path):
    return sc.write_manifest(tmp_path / "cohort.yaml", steps=150, seeds=(0,))


def _args(manifest, out, *extra):
    return ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "quiet", *extra]


def test_second_driver_exits_2_naming_the_holder_or_waits(manifest, tmp_path, capsys):
    out = tmp_path / "two.zarr"
    first = sc.start_driver(*_args(manifest, out))
    try:
        sc.wait_for(lambda: lease_path(out).is_file() and sc.any_log_contains(out, "start job"), 240,
                    "the first driver to hold the lease and start a job")
        assert main(_args(manifest, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid} on {socket.gethostname()}, since" in err and "--wait-lock" in err, err
        # waiting: it runs once the first driver has finished, and finds nothing left to do
        assert main(_args(manifest, out, "--wait-lock", "300")) == 0
        assert "0 of 2 jobs to run" in capsys.readouterr().out
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert set(sc.statuses(out).values()) == {"done"}
    assert set(sc.attempts(out).values()) == {1}   # each job ran once
    assert not lease_path(out).exists()


def test_two_drivers_started_together_one_runs_one_exits_2(manifest, tmp_path):
    out = tmp_path / "together.zarr"
    drivers = [sc.start_driver(*_args(manifest, out)) for _ in range(2)]
    results = [d.communicate(timeout=400) for d in drivers]
    codes = sorted(d.returncode for d in drivers)
    assert codes == [0, 2], results
    loser = results[[d.returncode for d in drivers].index(2)]
    assert "another driver is running on this store" in loser[1] and "Traceback" not in loser[1]
    assert set(sc.statuses(out).values()) == {"done"}
    assert set(sc.attempts(out).values()) == {1}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _forge_lease(out, **fields) -> None:
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
              "token": "forged", "process_start": ""}
    holder.update(fields)
    lease_path(out).parent.mkdir(parents=True, exist_ok=True)
    lease_path(out).write_text(json.dumps(holder))


def test_stale_lease_of_a_dead_driver_is_taken_over_and_its_running_job_rerun(manifest, tmp_path, capsys):
    out = tmp_path / "stale.zarr"
    assert main(_args(manifest, out)) == 0
    capsys.readouterr()
    left = list(sc.statuses(out))[1]
    root = zarr.open_group(str(out), mode="r+")
    root["jobs/status"][1] = STATUS_CODES["running"]   # as a killed driver leaves it
    _forge_lease(out, pid=_dead_pid())
    assert main(_args(manifest, out)) == 0
    printed = capsys.readouterr().out
    assert "took over the lease of a driver that is gone" in printed and "is not running" in printed
    assert "1 job(s) were left running" in printed and "recorded as interrupted" in printed
    assert "1 of 2 jobs to run" in printed
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert tries[left] == 2 and [n for j, n in tries.items() if j != left] == [1]
    assert not lease_path(out).exists()


def test_lease_of_another_host_is_kept_while_fresh_and_taken_over_when_old(manifest, tmp_path, capsys):
    out = tmp_path / "remote.zarr"
    assert main(_args(manifest, out)) == 0
    capsys.readouterr()
    _forge_lease(out, host="node-elsewhere", pid=1, heartbeat=time.time() - 5)
    assert main(_args(manifest, out)) == 2
    assert "pid 1 on node-elsewhere" in capsys.readouterr().err
    _forge_lease(out, host="node-elsewhere", pid=1, heartbeat=time.time() - 50)
    assert main(_args(manifest, out, "--stale-after", "30")) == 0
    assert "its heartbeat is 50 s old (more than 30 s)" in capsys.readouterr().out
    assert set(sc.attempts(out).values()) == {1}   # nothing was running: nothing rerun


def test_lease_renews_releases_and_notices_a_takeover(tmp_path):
    store = tmp_path / "s.zarr"
    lease = Lease(store, renew_s=0.1).acquire()
    first = json.loads(lease_path(store).read_text())
    assert first["pid"] == os.getpid()
    sc.wait_for(lambda: json.loads(lease_path(store).read_text())["heartbeat"] > first["heartbeat"], 10,
                "a renewed heartbeat")
    with pytest.raises(LeaseHeld, match="another driver is running"):
        Lease(store).acquire()
    with pytest.raises(LeaseHeld, match="after waiting 0.3 s"):
        Lease(store).acquire(wait=0.3, poll_s=0.1)
    _forge_lease(store, token="someone-else")   # taken over behind its back
    sc.wait_for(lambda: lease.lost.is_set(), 10, "the holder to notice it lost the lease")
    lease.release()
    assert lease_path(store).is_file()   # not its lease any more: left alone
