"""One driver at a time on a store, and the driver's request that running jobs stop.

The lease is a file beside the store (`<STORE>.work/driver.lease`), created atomically
(O_CREAT | O_EXCL) and holding the driver's host, pid, process start time, start time and a
heartbeat that a background thread renews every `RENEW_S` seconds. A second driver finds it
and exits naming the holder, or waits (`--wait-lock`). A lease is stale when its pid is dead
on this host, or its heartbeat is older than `stale_after` seconds (a driver on another host
of a shared file system, or a frozen one); a stale lease is taken over (renamed aside
atomically, so two drivers cannot both take it) and the caller treats the jobs it left
"running" as interrupted. A holder that finds its lease taken over stops renewing it.

The stop request is a second file (`<STORE>.work/stop`): the driver writes it on Ctrl-C /
SIGTERM; every worker (in this process, a pool process, a Ray task, on any node that sees the
store) polls it at step boundaries through `StopCheck`, stops, and records 'interrupted'.
A scheduler can also stop the jobs of its own process only (`stop_this_process`: Slurm's
preemption / time-limit signal to one array task) through the same check.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import UsageError

STALE_AFTER_S = 120.0  # no lease heartbeat for this long: the driver is gone (renewed every RENEW_S)
RENEW_S = 10.0
JOB_HEARTBEAT_S = 10.0  # workers renew a running job's ledger heartbeat this often (pipeline.worker)
# a 'running' job whose ledger heartbeat is older than this has lost its worker (`status`: stale);
# long steps (a big image on a slow CPU) renew at the first progress call after JOB_HEARTBEAT_S
JOB_STALE_AFTER_S = 6 * JOB_HEARTBEAT_S
STOP_POLL_S = 0.5       # workers look for the stop request at most this often (one stat per look)


class LeaseHeld(UsageError):
    """Another live driver holds the store (exit code 2); the message names it."""


def _work_dir(store: str | Path) -> Path:
    from pipeline.store import work_dir

    return work_dir(store)


def lease_path(store: str | Path) -> Path:
    return _work_dir(store) / "driver.lease"


def stop_path(store: str | Path) -> Path:
    return _work_dir(store) / "stop"


# ---------------------------------------------------------------------------------------------
# who holds it
# ---------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (tells a live pid from a reused one); '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Is `pid` a live process on this host (and the same one, when its start time is known)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie: dead, not yet reaped
    except OSError:
        pass
    now = _process_start(pid)
    return not (start and now and now != start)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    process_start: str = ""

    @classmethod
    def me(cls, token: str) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, token, _process_start(os.getpid()))

    def describe(self) -> str:
        since = _dt.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")
        return (f"pid {self.pid} on {self.host}, since {since}, last heartbeat "
                f"{max(0.0, time.time() - self.heartbeat):.0f} s ago")

    def stale(self, stale_after: float) -> str | None:
        """Why this lease is stale, or None while its driver looks alive."""
        if self.host == socket.gethostname() and not pid_alive(self.pid, self.process_start):
            return f"its driver (pid {self.pid} on {self.host}) is not running"
        age = time.time() - self.heartbeat
        if age > stale_after:
            return f"its heartbeat is {age:.0f} s old (more than {stale_after:g} s)"
        return None


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# the lease
# ---------------------------------------------------------------------------------------------
class Lease:
    """`with Lease(store).acquire(wait) as lease:` — `lease.took_over` says a stale lease was replaced,
    `lease.taken_over` is its holder (None when the file was unreadable), `stale_reason` why."""

    def __init__(self, store: str | Path, stale_after: float = STALE_AFTER_S, renew_s: float = RENEW_S):
        self.store = Path(store)
        self.path = lease_path(store)
        self.stale_after = float(stale_after)
        self.renew_s = float(renew_s)
        self.token = uuid.uuid4().hex
        self.taken_over: Holder | None = None
        self.stale_reason = ""
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def took_over(self) -> bool:
        """True when a stale lease was replaced (its driver's running jobs are interrupted)."""
        return bool(self.stale_reason)

    # ---- taking it ---------------------------------------------------------------------------
    def acquire(self, wait: float | None = None, poll_s: float = 1.0) -> "Lease":
        """Take the lease, waiting up to `wait` seconds (None: not at all) for a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            if self._create():
                self._start_renewing()
                return self
            holder = read_holder(self.path)
            if holder is None:  # being written this instant, or garbage: judge it by its age
                if self._unreadable_and_old():
                    self._take_over(None, "its lease file is unreadable")
                    continue
            else:
                why = holder.stale(self.stale_after)
                if why:
                    self._take_over(holder, why)
                    continue
            if deadline is None or time.monotonic() >= deadline:
                raise LeaseHeld(self._held_message(holder, waited=wait))
            time.sleep(poll_s)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(Holder.me(self.token)), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _unreadable_and_old(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > 5.0
        except FileNotFoundError:
            return False

    def _take_over(self, holder: Holder | None, why: str) -> None:
        """Move the stale lease aside (an atomic rename: of two drivers, one wins), unless it changed."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another driver took it first; try again
        moved = read_holder(aside)
        if holder is not None and (moved is None or moved.token != holder.token):
            # not the lease we judged stale (another driver's fresh one): put it back, never over a new one
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.taken_over, self.stale_reason = holder, why

    def _held_message(self, holder: Holder | None, waited: float | None) -> str:
        who = holder.describe() if holder else "a driver whose lease file is being written"
        if waited:
            return (f"{self.store}: still held by another driver after waiting {waited:g} s ({who}; "
                    f"lease {self.path})")
        return (f"{self.store}: another driver is running on this store ({who}; lease {self.path}). "
                f"Wait for it to finish, or rerun with --wait-lock [SECONDS] to wait for it")

    # ---- keeping it --------------------------------------------------------------------------
    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="dipcohort-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and `lost` set) when another driver took the lease over."""
        current = read_holder(self.path)
        if current is None or current.token != self.token:
            self.lost.set()
            return False
        fresh = Holder(**{**asdict(current), "heartbeat": time.time()})
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(asdict(fresh)))
        os.replace(tmp, self.path)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_holder(self.path)
        if current is not None and current.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# stopping running jobs
# ---------------------------------------------------------------------------------------------
def request_stop(store: str | Path, reason: str) -> None:
    """Ask every worker of this store to stop at its next step boundary."""
    path = stop_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n")


def clear_stop(store: str | Path) -> None:
    stop_path(store).unlink(missing_ok=True)


_PROCESS_STOP: list[str] = []  # reason, once this process was told to stop (stop_this_process)


def stop_this_process(reason: str) -> None:
    """Stop the jobs of this process at their next step boundary (safe in a signal handler:
    it only appends to a list, which `StopCheck` reads at every step)."""
    _PROCESS_STOP.append(reason)


def process_stop_reason() -> str | None:
    return _PROCESS_STOP[0] if _PROCESS_STOP else None


class StopCheck:
    """`check()` is True once the driver asked to stop (the file is looked at most every
    `every_s`) or this process was told to (`stop_this_process`, looked at every call)."""

    def __init__(self, store: str | Path, every_s: float | None = None):
        self.path = stop_path(store)
        self.every_s = STOP_POLL_S if every_s is None else every_s
        self._next = 0.0
        self._stopped = False

    def __call__(self) -> bool:
        if _PROCESS_STOP:
            return True
        now = time.monotonic()
        if not self._stopped and now >= self._next:
            self._next = now + self.every_s
            self._stopped = self.path.exists()
        return self._stopped

    @property
    def reason(self) -> str:
        return process_stop_reason() or "by the driver"
