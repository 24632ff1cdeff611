"""`dipcohort status --watch`: refreshes, measures throughput while jobs end, stops when nothing is left."""
from __future__ import annotations

import io
import threading
import time

from rich.console import Console

import store_factory as sf
from dipcohort.cli import main
from pipeline.store import JobWriter
from pipeline.watch import Rate, eta_s, watch


def _console():
    return Console(file=io.StringIO(), width=160, force_terminal=False)


def test_rate_and_eta():
    rate = Rate()
    assert rate.per_s() is None
    rate.add(0.0, 4)
    rate.add(10.0, 9)
    assert rate.per_s() == 0.5
    snap = {"counts": {"done": 9, "pending": 3, "running": 2}, "runtime_s": 8.0}
    assert eta_s(snap, rate) == 10.0                       # 5 left at 0.5 jobs/s
    assert eta_s(snap, Rate()) == 5 * 8.0 / 2              # not measured: mean runtime x left / running
    assert eta_s({"counts": {"done": 3}, "runtime_s": 1.0}, Rate()) == 0.0


def test_watch_of_an_ended_store_shows_counts_and_stops(tmp_path):
    fab = sf.fabricate_store(tmp_path / "s.zarr", statuses={1: "failed"}, n_scans=1, seeds=(0,))
    console = _console()
    snap = watch(fab.path, interval=0.01, console=console)
    text = console.file.getvalue()
    assert snap["counts"]["failed"] == 1 and "failed 1" in text and "ETA" in text and "0s" in text
    assert "boom" in text                                  # the latest failure's error


def test_watch_measures_jobs_ending_and_stops_by_itself(tmp_path):
    statuses = {i: "pending" for i in range(4)}
    fab = sf.fabricate_store(tmp_path / "s.zarr", statuses=statuses, n_scans=1, seeds=(0,))
    waiting = [j for j in fab.jobs if j.index in statuses]

    def finish_them():
        for job in waiting:
            time.sleep(0.3)
            JobWriter(fab.path, job).finish("done", 1.0)

    worker = threading.Thread(target=finish_them)
    worker.start()
    console = _console()
    snap = watch(fab.path, interval=0.1, iterations=200, console=console)
    worker.join()
    assert snap["counts"].get("pending", 0) == 0           # it stopped because nothing was left
    assert "jobs/h (measured while watching)" in console.file.getvalue()


def test_watch_flag(tmp_path, capsys):
    fab = sf.fabricate_store(tmp_path / "s.zarr", n_scans=1, seeds=(0,))
    assert main(["status", str(fab.path), "--watch", "0.01"]) == 0
    assert main(["status", str(fab.path), "--watch", "0"]) == 2
    assert "--watch must be > 0" in capsys.readouterr().err
