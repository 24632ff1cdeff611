"""Packs: compatible jobs of a cohort run together, as one computation on one device.

Jobs are compatible (one *signature*) when they differ only in scan and seed: same task (kind
and parameters), image shape (the store's image group), solver and configuration, steps,
ssim_every, checkpoint_every and resources. The driver cuts each signature's jobs, in manifest
order, into packs of up to N, from the whole cohort rather than from the jobs left to run, so
a rerun names the same packs; it hands the backends the packs that still have jobs to run
(`pipeline.jobs.Pack`, run by `pipeline.worker.run_pack`), and jobs of a solver that cannot be
packed (`recon.solvers.packable`) one by one.

N is `--pack` or else each configuration's `resources.pack` (default 1: every job alone, so a
cohort's numbers never depend on the machine it ran on unless packing is asked for; a pack's
numbers agree with the unpacked run's only to floating-point spread). `auto` chooses N per
signature (`auto_size`): the footprint of one more job in a pack, measured on the run's device
by `recon.solvers.pack_footprint` on the signature's first job (CUDA: the peak memory of a
step; CPU: network, gradient, Adam moments, saved activations and the problem's tensors),
divides AUTO_MEMORY_SHARE of the free memory (CUDA: `torch.cuda.mem_get_info`; CPU: available
RAM). On CPU the pack also stays small enough that every core gets one (the signature's jobs /
cores), since one pack runs on one job's threads. Both are capped (AUTO_MAX) and never exceed
the signature's jobs. The measurement is made where the driver runs: for a Ray or Slurm
cluster with other devices, give N.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Sequence

from pipeline.errors import UsageError
from pipeline.jobs import Job, Pack, canonical_json, jobs_of

AUTO = "auto"
AUTO_MAX = {"cuda": 64, "cpu": 16}            # beyond these a bigger pack gains little per job
AUTO_MEMORY_SHARE = {"cuda": 0.8, "cpu": 0.5}  # of the free memory; the rest is headroom


def pack_setting(value: str | int, where: str = "--pack") -> int | str:
    """`--pack` / resources.pack: a whole number >= 1 or 'auto'."""
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"{where} {value!r}: expected a whole number >= 1 (jobs run together) or 'auto'")
    return n


def signature(job: Job) -> str:
    """What jobs of one pack share (everything but scan and seed)."""
    return canonical_json([job.scan.task, job.scan.kind, job.scan.task_params, job.image_group, job.solver,
                           job.config, job.params, job.steps, job.ssim_every, job.checkpoint_every,
                           replace(job.resources, pack=1).__dict__])


def form_units(jobs: Sequence[Job], todo: Sequence[Job], override: int | str | None = None, device=None,
               lines: list[str] | None = None) -> list[Job | Pack]:
    """The units to hand a backend: packs of `todo`'s jobs (cut from all `jobs`), jobs alone
    where the size is 1 or the solver cannot be packed; in the order of their first job.
    `lines` receives one description per signature that is packed."""
    placed = {j.job_id: j for j in jobs} | {j.job_id: j for j in todo}  # late-placed jobs: todo's rows
    left = {j.job_id for j in todo}
    groups: dict[str, list[Job]] = {}
    for job in placed.values():
        groups.setdefault(signature(job), []).append(job)
    units: list[Job | Pack] = []
    for members in groups.values():
        members.sort(key=lambda j: j.index)
        running = [j for j in members if j.job_id in left]
        if not running:
            continue
        size, why = _size(running, override, device)
        if size > 1 and lines is not None:
            lines.append(f"{running[0].solver} [{running[0].config}] {running[0].image_group}: {len(running)} "
                         f"jobs to run in packs of up to {size}{why}")
        elif lines is not None and why:
            lines.append(f"{running[0].solver} [{running[0].config}] {running[0].image_group}: each job alone{why}")
        units += _cut(members, left, size)
    return sorted(units, key=lambda u: jobs_of(u)[0].index)


def _cut(members: list[Job], left: set[str], size: int) -> list[Job | Pack]:
    if size <= 1:
        return [j for j in members if j.job_id in left]
    units: list[Job | Pack] = []
    for k in range(0, len(members), size):
        chunk = tuple(members[k:k + size])
        run = tuple(j for j in chunk if j.job_id in left)
        if run:
            first = run[0].resources
            # one computation: one job's CPUs, GPUs and memory; the time of all its members at most
            res = replace(first, time_min=first.time_min * len(run), pack=1)
            units.append(Pack(jobs=run, members=chunk, resources=res, checkpoint_every=run[0].checkpoint_every))
    return units


def _size(running: list[Job], override, device) -> tuple[int, str]:
    setting = override if override is not None else running[0].resources.pack
    setting = pack_setting(setting, "resources.pack")
    if setting == 1:
        return 1, ""
    from recon.solvers import packable

    if not packable(running[0].solver):
        return 1, f" (solver {running[0].solver} cannot be packed)"
    if setting != AUTO:
        return setting, ""
    if len(running) < 2:
        return 1, " (auto: one job)"
    return choose_auto(running, device)


# ---------------------------------------------------------------------------------------------
# pack auto: free memory / measured footprint
# ---------------------------------------------------------------------------------------------
def auto_size(free: float, per_job: float, n_jobs: int, device_type: str, cores: int = 1) -> int:
    """The rule of `--pack auto` (module doc): how many jobs of footprint `per_job` (bytes) fit in
    AUTO_MEMORY_SHARE of `free`; on CPU also n_jobs / cores, so every core gets a pack. At least
    1, at most AUTO_MAX and n_jobs."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    n = min(math.floor(AUTO_MEMORY_SHARE[kind] * free / max(per_job, 1.0)), AUTO_MAX[kind], n_jobs)
    if kind == "cpu":
        n = min(n, math.ceil(n_jobs / max(1, cores)))
    return max(1, n)


def choose_auto(running: list[Job], device=None) -> tuple[int, str]:
    """N for a signature from the measured footprint of its first job; (N, the reason, for the run's output)."""
    from pipeline.worker import device_name, job_problem, job_threads
    from recon.solvers import pack_footprint

    dev = device_name(device)
    first = running[0]
    try:
        with job_threads(first):
            per_job = float(pack_footprint(first.solver, job_problem(first), params=first.params, device=dev))
    except Exception as err:  # noqa: BLE001 - a job that cannot run fails in the run, alone
        return 1, f" (auto: measuring a job failed, each job alone: {type(err).__name__}: {err})"
    free, cores = free_memory(dev), cpu_cores()
    n = auto_size(free, per_job, len(running), dev.type, cores)
    return n, (f" (auto on {dev.type}: measured {per_job / 2**20:.1f} MiB per job, {free / 2**30:.1f} GiB free"
               + (f", {cores} core(s)" if dev.type != "cuda" else "") + ")")


def free_memory(dev) -> float:
    """Bytes free on the device now: CUDA's free memory, or the host's available RAM."""
    import torch

    if dev.type == "cuda":
        return float(torch.cuda.mem_get_info(dev)[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:  # not installed: the kernel's free pages (less than 'available')
        import os

        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cpu_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def unit_sizes(units: Iterable[Job | Pack]) -> str:
    """'12 jobs in 3 packs and 2 alone' (the run's and dry run's summary)."""
    units = list(units)
    packs = [u for u in units if isinstance(u, Pack)]
    alone = len(units) - len(packs)
    jobs = sum(len(jobs_of(u)) for u in units)
    return f"{jobs} jobs in {len(packs)} pack(s)" + (f" and {alone} alone" if alone else "")
