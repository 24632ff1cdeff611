"""Ctrl-C and SIGTERM to a real `python -m dipcohort run`: running jobs stop at a step boundary
and leave a checkpoint, are recorded 'interrupted', one line is printed, the exit code is 130 /
143, no traceback, the lease is released; the rerun continues them from their checkpoints and
ends with the numbers of an uninterrupted run, running nothing that was done again."""
from __future__ import annotations

import signal
import time

import pytest

import sched_common as sc
from dipcohort.cli import main
from pipeline.lease import lease_path, stop_path
from pipeline.store import checkpoint_path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("signals")
    # several seconds per job on a loaded 2-core machine: the signal lands mid-job
    manifest = sc.write_manifest(base / "cohort.yaml", steps=250, scans={"cam": "skimage:camera"})
    return manifest, sc.reference_store(manifest, base)


CASES = [  # (extra flags, signal, to the whole process group as a terminal's Ctrl-C does)
    pytest.param((), signal.SIGINT, True, id="sequential-ctrl-c"),
    pytest.param((), signal.SIGTERM, False, id="sequential-sigterm"),
    pytest.param(("--workers", "2"), signal.SIGINT, True, id="pool-ctrl-c"),
    pytest.param(("--workers", "2"), signal.SIGTERM, False, id="pool-sigterm"),
    pytest.param(("--backend", "ray"), signal.SIGINT, True, id="ray-ctrl-c", marks=pytest.mark.ray),
]


@pytest.mark.parametrize("extra, sig, group", CASES)
def test_signal_stops_at_a_step_and_the_rerun_continues(cohort, tmp_path, capsys, extra, sig, group):
    if "ray" in extra:
        pytest.importorskip("ray", reason="ray is not installed")
    manifest, reference = cohort
    out = tmp_path / "sig.zarr"
    args = ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "plain", *extra]
    with sc.running_driver(*args) as driver:
        sc.wait_for(lambda: sc.any_log_contains(out, "start job"), 240, "a job to start")
        time.sleep(1.0)  # some steps in
        stdout, stderr = sc.signal_driver(driver, sig, group)
    assert driver.returncode == 128 + sig, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.count(f"{signal.Signals(sig).name}: stopping") == 1, stderr
    assert "interrupted jobs continue when you rerun" in stderr
    before = sc.statuses(out)
    assert "running" not in before.values() and "interrupted" in before.values(), before
    interrupted = [j for j, s in before.items() if s == "interrupted"]
    assert all(checkpoint_path(out, j).is_file() for j in interrupted)
    assert all("stopped by the driver" in sc.log_text(out, j) for j in interrupted)
    assert not lease_path(out).exists() and not stop_path(out).exists()

    done_before = {j for j, s in before.items() if s == "done"}
    tries_before = sc.attempts(out)
    assert main(args[:len(args) - len(extra)] + ["--progress", "quiet"]) == 0  # the rerun (sequential)
    assert "done 2" in capsys.readouterr().out
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert all(tries[j] == tries_before[j] for j in done_before)   # nothing done ran again
    assert all(tries[j] == tries_before[j] + 1 for j in interrupted)
    assert all("resuming from checkpoint" in sc.log_text(out, j) for j in interrupted)
    sc.assert_same_results(out, reference)   # continued from the checkpoint: the numbers of one run


def test_ctrl_c_while_pool_workers_start_stops_cleanly(cohort, tmp_path, capsys):
    """Ctrl-C reaches the pool's workers too: one still importing must not die printing a traceback."""
    manifest, reference = cohort
    out = tmp_path / "early.zarr"
    args = ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "plain"]
    with sc.running_driver(*args, "--workers", "2") as driver:
        sc.wait_for(lambda: sc.pool_workers(driver.pid), 240, "a pool worker to start")
        time.sleep(0.3)   # it is importing: seconds before it reads its job
        stdout, stderr = sc.signal_driver(driver, signal.SIGINT)
    assert driver.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.count("SIGINT: stopping") == 1, stderr
    assert "running" not in sc.statuses(out).values()
    assert not lease_path(out).exists()
    assert main(args + ["--progress", "quiet"]) == 0   # one command finishes the rest
    assert set(sc.statuses(out).values()) == {"done"}
    sc.assert_same_results(out, reference)
