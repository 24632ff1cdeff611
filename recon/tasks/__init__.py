"""The task registry: one module per task (denoise, inpaint, deblur, sr, mri, ct).

    simulate(task, image, params, seed) -> Problem      (a ground-truth image in [0, 1])
    from_measurements(task, data, params, reference, seed) -> Problem   (mri, ct)
    check_params(task, params, kind) -> the parameters in force; ValueError names the bad one
    degraded_image(problem), metric_definition(task), get_task(name), task_names()

Randomness: `seed` fixes every draw (noise, masks, MRI phase maps); derive it from
(scan id, seed) with `recon.rng.measurement_seed` so that scans never share a draw.
"""
from __future__ import annotations

from recon.problem import Problem
from recon.tasks import ct, deblur, denoise, inpaint, mri, sr
from recon.tasks.base import CliOption, Task

TASKS: dict[str, Task] = {t.name: t for t in (denoise.TASK, inpaint.TASK, deblur.TASK, sr.TASK, mri.TASK, ct.TASK)}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def simulate(task: str, image, params: dict | None = None, seed: int = 0) -> Problem:
    return get_task(task).simulate(image, params, seed)


def from_measurements(task: str, measurements, params: dict | None = None, reference=None, seed: int = 0) -> Problem:
    return _measured_task(task).from_measurements(measurements, params, reference, seed)


def check_params(task: str, params: dict | None = None, kind: str = "simulate") -> dict:
    """The parameters in force for `task` and `kind` ('simulate' or 'measured'), values checked,
    nothing built (the manifest pre-flight); ValueError names the parameter and what was expected."""
    return (_measured_task(task) if kind == "measured" else get_task(task)).check_params(params, kind)


def parameter_names(task: str, kind: str = "simulate") -> tuple[str, ...]:
    """The parameters `task` accepts for `kind` (the manifest's name check)."""
    return (_measured_task(task) if kind == "measured" else get_task(task)).parameter_names(kind)


def _measured_task(task: str) -> Task:
    t = get_task(task)
    if t.measured_defaults is None:
        takes = ", ".join(name for name, other in TASKS.items() if other.measured_defaults is not None)
        raise ValueError(f"task {task!r} cannot use measured data; expected one of {takes}")
    return t


def degraded_image(problem: Problem):
    return get_task(problem.task).degraded_image(problem)


def metric_definition(task: str) -> str:
    return get_task(task).metric_definition


def cli_options() -> dict[str, tuple[CliOption, tuple[str, ...]]]:
    """Every task's CLI option once: name -> (option, the tasks it applies to)."""
    out: dict[str, tuple[CliOption, tuple[str, ...]]] = {}
    for task in TASKS.values():
        for opt in task.cli_options:
            first, tasks = out.get(opt.name, (opt, ()))
            out[opt.name] = (first, tasks + (task.name,))
    return out


__all__ = ["TASKS", "Task", "CliOption", "task_names", "get_task", "simulate", "from_measurements", "check_params",
           "parameter_names", "degraded_image", "metric_definition", "cli_options"]
