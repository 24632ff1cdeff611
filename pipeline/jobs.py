"""Jobs: one reconstruction = one scan × one solver configuration × one seed.

Jobs are frozen, picklable dataclasses so every backend (local pool, Ray, Slurm via submitit)
can ship them to another process unchanged.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# interrupted: stopped by a signal (Ctrl-C, SIGTERM, preemption) at a step boundary; rerun continues it
STATUS_CODES = {"pending": 0, "running": 1, "done": 2, "failed": 3, "diverged": 4, "interrupted": 5}
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
# a job in one of these states is not run again on resume (failed: only with --retry-failed)
FINISHED = ("done", "diverged")


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: the same content always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_hash(value: Any, length: int = 16) -> str:
    """Shortened sha256 of the canonical JSON of `value` (16 hex chars: 64 bits, no clashes in practice)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Resources:
    """What one job asks of the scheduler. gpus may be fractional (e.g. 0.25: four jobs per GPU).

    pack: how many compatible jobs run together as one computation (`pipeline.packing`): a
    number, or 'auto' (chosen from the device's free memory); 1 runs each job alone.
    """

    gpus: float = 0.0
    cpus: int = 1
    mem_gb: float = 4.0
    time_min: float = 60.0
    pack: int | str = 1


@dataclass(frozen=True)
class ScanSpec:
    """One scan of the cohort and how to turn it into a reconstruction problem.

    kind 'simulate': `source` is a ground-truth image; measurements are simulated for `task`
    with `task_params` (deterministic per job seed).
    kind 'measured': `source` holds the measurements (fastMRI k-space, CT sinogram .npy) and
    `reference` an optional ground-truth image for metrics.
    `size` (pixels, square) resizes images before simulation; None keeps the native size.
    `color` keeps RGB for natural-image tasks (the aSeqDIP paper denoises colour CBSD68); gray otherwise.
    Paths are absolute (the manifest resolves them against its own directory).
    """

    id: str
    source: str
    task: str
    task_params: dict = field(default_factory=dict, hash=False)
    kind: str = "simulate"
    reference: str | None = None
    size: int | None = None
    color: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """One reconstruction. `index` is its row in the store's `jobs` group."""

    job_id: str
    index: int
    scan: ScanSpec
    solver: str
    params: dict = field(hash=False)
    config: str = ""          # hash of solver name + params (same for all scans and seeds)
    seed: int = 0
    steps: int = 1
    ssim_every: int = 10
    resources: Resources = field(default_factory=Resources)
    checkpoint_every: int = 0  # 0: no checkpoints; >0 lets a requeued Slurm task resume
    image_group: str = ""      # the store's images/<name> group of this job's image shape
    image_index: int = 0       # its row inside that group

    @property
    def label(self) -> str:
        return f"{self.scan.id}/{self.solver}/{self.config[:6]}/seed{self.seed}"


def job_id_for(scan: ScanSpec, solver: str, params: dict, seed: int, steps: int, ssim_every: int) -> str:
    """Stable id: hash of everything that changes the job's numbers (not resources, not order)."""
    return content_hash({"scan": scan.to_dict(), "solver": solver, "params": params, "seed": seed,
                         "steps": steps, "ssim_every": ssim_every})


def config_id_for(solver: str, params: dict) -> str:
    return content_hash({"solver": solver, "params": params}, length=12)


@dataclass(frozen=True)
class Pack:
    """Compatible jobs run together as one computation (`pipeline.worker.run_pack`).

    A backend treats a pack like one job: it asks for `resources` (one job's CPUs, GPUs and
    memory; the time of all members), names it by `job_id` and follows it through the ledger
    entries of its members (`pipeline.store.snapshot`). `jobs` are the members to run;
    `members` is the pack as first formed from the whole cohort (its id and its ledger entry),
    so a rerun while some members are done still names the same pack.
    """

    jobs: tuple[Job, ...]
    members: tuple[Job, ...]
    resources: Resources
    checkpoint_every: int = 0

    @property
    def job_id(self) -> str:
        return "pack-" + content_hash([j.job_id for j in self.members], length=12)

    @property
    def index(self) -> int:  # the row its ledger entry is reported under (a backend's snapshot key)
        return self.members[0].index

    @property
    def steps(self) -> int:
        return self.members[0].steps

    @property
    def label(self) -> str:
        first = self.jobs[0]
        return f"pack of {len(self.jobs)} ({first.solver}/{first.config[:6]}: {', '.join(j.scan.id for j in self.jobs[:3])}" \
               f"{', ...' if len(self.jobs) > 3 else ''})"


def jobs_of(unit: Job | Pack) -> tuple[Job, ...]:
    """The jobs a unit handed to a backend runs: a pack's members to run, or the job itself."""
    return unit.jobs if isinstance(unit, Pack) else (unit,)
