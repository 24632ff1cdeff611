"""Progress display for a cohort run: done / failed / running counts and an ETA.

`make_progress('auto')` gives a rich bar on a terminal, one plain line per finished job
otherwise (Slurm logs, CI), and `quiet` for tests. Every reporter counts statuses, so the
closing summary and tests can read `counts`.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pipeline.jobs import Job


class Progress:
    """Quiet reporter (the base): counts only."""

    def __init__(self) -> None:
        self.total = 0
        self.counts: Counter[str] = Counter()
        self.running = 0
        self.t0 = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self.t0 = time.monotonic()

    def job_started(self, job: "Job") -> None:
        self.running += 1

    def job_finished(self, job: "Job", status: str) -> None:
        self.running = max(0, self.running - 1)
        self.counts[status] += 1

    def close(self) -> None:
        pass

    def note(self, text: str) -> None:
        """A line about the run itself (e.g. waiting for a cluster), not about one job; quiet: nothing."""

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts["failed"] + self.counts["diverged"]

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace so far (None before the first job ends)."""
        if not self.finished or self.total <= self.finished:
            return None if not self.finished else 0.0
        pace = (time.monotonic() - self.t0) / self.finished
        return pace * (self.total - self.finished)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainProgress(Progress):
    """One line per finished job: readable in log files."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr

    def job_finished(self, job: "Job", status: str) -> None:
        super().job_finished(job, status)
        eta = self.eta_s()
        eta_text = "" if eta is None else f", ETA {_clock(eta)}"
        print(f"[{self.finished}/{self.total}] {status:8s} {job.label} "
              f"(done {self.counts['done']}, failed {self.failed}{eta_text})", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichProgress(Progress):
    """A rich bar with done / failed / running counts and time remaining."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichBar, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = RichBar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.task = None

    def _counts_text(self) -> str:
        return (f"[green]done {self.counts['done']}[/] [red]failed {self.counts['failed']}[/] "
                f"[yellow]diverged {self.counts['diverged']}[/] running {self.running}")

    def start(self, total: int) -> None:
        super().start(total)
        self.bar.start()
        self.task = self.bar.add_task("reconstructing", total=total, counts=self._counts_text())

    def job_started(self, job: "Job") -> None:
        super().job_started(job)
        self.bar.update(self.task, counts=self._counts_text())

    def job_finished(self, job: "Job", status: str) -> None:
        super().job_finished(job, status)
        self.bar.update(self.task, advance=1, counts=self._counts_text())

    def note(self, text: str) -> None:
        self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(mode: str = "auto") -> Progress:
    """'auto' (rich on a terminal, plain otherwise), 'rich', 'plain' or 'quiet'."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    reporters = {"rich": RichProgress, "plain": PlainProgress, "quiet": Progress}
    if mode not in reporters:
        raise ValueError(f"unknown progress mode {mode!r}; expected auto, rich, plain or quiet")
    return reporters[mode]()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
