"""`dipcohort status STORE --watch`: counts, throughput, ETA and the latest failures, refreshed in place.

Reads only the ledger (one read per refresh). Throughput is measured while watching (jobs that
ended between the first and the latest refresh); before a job has ended in view, the ETA is
estimated from the mean runtime of the jobs already done and the number running. It stops by
itself when no job is pending, running or interrupted (or after `iterations` refreshes).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ENDED = ("done", "diverged", "failed")
WAITING = ("pending", "running", "interrupted")


@dataclass
class Rate:
    """Jobs ended per second, from the ended counts seen at each refresh."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, ended: int) -> None:
        self.samples.append((t, ended))

    def per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None


def snapshot(store) -> dict:
    """What one refresh shows: counts per status, mean runtime of done jobs, latest failures."""
    from pipeline.store import ledger_table

    table = ledger_table(store)
    counts = Counter(table["status"])
    done = table[table["status"] == "done"]
    runtime = float(done["runtime_s"].mean()) if len(done) else math.nan
    failed = table[table["status"] == "failed"]
    if "heartbeat" in failed:
        failed = failed.sort_values("heartbeat", na_position="first")
    latest = [(str(r["job_id"]), f"{r['scan_id']}/{r['solver']}/seed{r['seed']}",
               (str(r["error"]).strip().splitlines() or ["(no message)"])[0]) for _, r in failed.tail(5).iterrows()]
    return {"total": len(table), "counts": dict(counts), "runtime_s": runtime, "latest_failures": latest}


def eta_s(snap: dict, rate: Rate) -> float | None:
    remaining = sum(snap["counts"].get(s, 0) for s in WAITING)
    if remaining == 0:
        return 0.0
    measured = rate.per_s()
    if measured:
        return remaining / measured
    running = snap["counts"].get("running", 0)
    if running and math.isfinite(snap["runtime_s"]):
        return remaining * snap["runtime_s"] / running
    return None


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def render(store, snap: dict, rate: Rate):
    from rich.table import Table

    counts = snap["counts"]
    ended = sum(counts.get(s, 0) for s in ENDED)
    per_s = rate.per_s()
    grid = Table.grid(padding=(0, 2))
    grid.add_row(f"[bold]{store}[/bold]", f"{ended}/{snap['total']} ended")
    grid.add_row("counts", ", ".join(f"{s} {counts.get(s, 0)}" for s in (*ENDED, *WAITING)))
    grid.add_row("throughput", f"{per_s * 3600:.1f} jobs/h (measured while watching)" if per_s else
                 "not measured yet (no job ended while watching)")
    grid.add_row("mean runtime", _duration(snap["runtime_s"]) + " per done job")
    grid.add_row("ETA", _duration(eta_s(snap, rate)))
    for job_id, label, error in snap["latest_failures"]:
        grid.add_row("[red]failed[/red]", f"{label} ({job_id}): {error}")
    return grid


def watch(store: str | Path, interval: float = 5.0, iterations: int | None = None, console=None) -> dict:
    """Refresh the display every `interval` seconds until nothing is left to run; returns the last snapshot."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    rate = Rate()
    snap = snapshot(store)
    with Live(render(store, snap, rate), console=console, auto_refresh=False, transient=False) as live:
        k = 0
        while True:
            snap = snapshot(store)
            rate.add(time.monotonic(), sum(snap["counts"].get(s, 0) for s in ENDED))
            live.update(render(store, snap, rate), refresh=True)
            k += 1
            if sum(snap["counts"].get(s, 0) for s in WAITING) == 0 or (iterations is not None and k >= iterations):
                return snap
            time.sleep(interval)
