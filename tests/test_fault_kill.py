"""kill -9 of the driver at random moments (a fixed RNG) of running and of creating the store;
after each, one more `run` finishes the store with every job done, and no job that was done at
a kill ran again (its attempt count is unchanged)."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

import sched_common as sc
from dipcohort.cli import main

MOMENTS = 5  # per phase: 10 kills in all


def _kill_at(args: list[str], started, delay: float) -> None:
    """Start a driver, wait for `started()`, let it run `delay` seconds more, kill -9 it."""
    driver = sc.start_driver(*args)
    try:
        sc.wait_for(lambda: started() or driver.poll() is not None, 240, "the driver to get going")
        time.sleep(delay)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)   # the driver and whatever it started
        driver.wait()


def _finish_and_check(args: list[str], out, done_at_kills: list[dict[str, int]]) -> None:
    assert main(args) == 0
    assert set(sc.statuses(out).values()) == {"done"}
    final = sc.attempts(out)
    for seen in done_at_kills:   # what was done at each kill never ran again
        assert all(final[j] == n for j, n in seen.items()), (seen, final)


def _done_attempts(out) -> dict[str, int]:
    states = sc.ledger_if_created(out)
    if not states:
        return {}
    tries = sc.attempts(out)
    return {j: tries[j] for j, s in states.items() if s == "done"}


def test_kill_9_while_running_at_random_moments(tmp_path):
    rng = random.Random(20261201)
    manifest = sc.write_manifest(tmp_path / "cohort.yaml", steps=80)   # 4 jobs of a few seconds
    reference = sc.reference_store(manifest, tmp_path)
    out = tmp_path / "killed.zarr"
    args = ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "quiet"]
    seen: list[dict[str, int]] = []
    for k in range(MOMENTS):
        starts = sum(sc.log_text(out, j).count("start job") for j in sc.ledger_if_created(out))
        workers = ["--workers", "2"] if k % 2 else []
        _kill_at(args + workers, lambda: sum(sc.log_text(out, j).count("start job")
                                             for j in sc.ledger_if_created(out)) > starts, rng.uniform(0, 4))
        seen.append(_done_attempts(out))
        if len(seen[-1]) == 4:
            break
    _finish_and_check(args, out, seen)
    sc.assert_same_results(out, reference)


def test_kill_9_while_creating_the_store_at_random_moments(tmp_path):
    rng = random.Random(8)
    manifest = tmp_path / "many.yaml"   # 300 cheap jobs: creating the store takes a moment
    manifest.write_text("cohort: many\nsteps: 2\nsize: 32\nseeds: [" + ", ".join(map(str, range(150))) + "]\n"
                        "scans:\n  - {id: cam, source: 'skimage:camera', task: denoise, params: {sigma: 25}}\n"
                        "  - {id: moon, source: 'skimage:moon', task: denoise, params: {sigma: 25}}\n"
                        "solvers:\n  - {name: tv}\n")
    out = tmp_path / "created.zarr"
    args = ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "quiet"]
    seen = []
    for _ in range(MOMENTS):
        _kill_at(args, lambda: (out / "zarr.json").exists(), rng.uniform(0, 0.5))
        seen.append(_done_attempts(out))
        if (out / "zarr.json").exists() and sc.ledger_if_created(out):
            break   # created: the later moments would only kill running (the test above)
    _finish_and_check(args, out, seen)
