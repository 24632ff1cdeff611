"""A pack of B jobs as one computation: B networks stepped together, per-job everything else.

Jobs of one solver, configuration, task and image shape (different scans, seeds, masks, noise)
share one packed network: their parameters and buffers are stacked (`torch.func.stack_module_state`)
and the B forward passes run as one through `vmap(functional_call)`; the loss is the sum of the
per-job losses, so each job's gradient is its own, and one Adam over the stacked tensors is exactly
B per-job Adams (Adam is elementwise). Batch norm stays per job: vmap gives every job its own
statistics and running buffers (a batch of B through one module would mix them).

Per job, and with the single loop's own code (`Loop.push` / `absorb` / `_result`): the
loss and data terms (each job's `objective` on its own Problem and operator), metrics, moving
variance, EMA, early stopping, divergence, checkpoints in the single loop's format (one file per
job; a job resumes alone or in any pack). A job that stops early or diverges leaves with its
result; its slot keeps being computed but takes no part in the loss, so the others' numbers never
depend on when (or whether) a pack-mate left. The slot is not dropped from the computation,
because the pack's width changes a job's bits: vmapped kernels give a job the same bits whatever
its pack-mates' data, but not whatever the pack size (vmap runs convolutions as grouped ones, and
the CPU kernels depend on the group count). Measured (1 thread, 32 px, 5 dip steps, job 0's loss
in packs of 2, 3, 4, 5, 8): `tiny` differs at B = 8 (2e-7 relative) from B = 2-5; in single
grouped convolutions, a 1-channel 3x3 stride-2 layer (the skip net's first) differs between 2 and
8 or 16 groups (output or gradients). Re-stacking the remaining jobs would make a job's numbers depend
on when its pack-mates finished, so exactness wins over the saved work.

Host syncs: none per step. Each job's per-step values stay on the device and the pack copies
every job's pending values in one transfer every METRICS_BLOCK steps (and at checkpoints, the
last step and a possible early stop); a job that diverged inside a block leaves at its divergence
step with that step's image (recon.solvers.loop). Until that copy its slot is still in the loss
(its NaN loss reaches only its own gradients and Adam moments: the kernels are per job). Jobs
stepped: dip, es-dip, tv-dip, aseqdip (its z_k = f(z_{k-1}) is one batched forward), self-guided
(N_eta draws per job through vmap; its learnt input z is a row of a stacked tensor while the pack
steps). deep-decoder (DIP's step on its own network). Solvers with inner solves or proximal steps
between updates (HQS/ADMM/RED, DIP-ADMM) and the classical ones are not packable
(`packable(name)` is False) and run alone.

Exactness (tests/test_packing.py): a pack of one uses the plain module (vmap at B = 1 is not
bit-identical: the batched reflection pad hands the next convolution a differently strided input,
~1e-6 apart) and gives run_solver's numbers bit for bit; in a pack of B > 1 a job's numbers are
bit-identical whatever its pack-mates' scans, and agree with its solo run to float rounding.

Mechanism, measured (benchmarks/packing.py --mechanisms; 1 thread, skip-small without skip
branches at 32 px so both forms apply; forward + backward + Adam per job-step, load average 3.5 on
2 cores): one by one 8.6-10.0 ms; grouped convolutions in one module 3.45 ms (B = 8) / 2.74 ms
(B = 16); vmap over stacked modules 4.41 / 3.36 ms. Grouped convolutions are ~25% faster, but they
need every network's channel concatenations rewritten for the packed layout; vmap runs the
networks as they are (skip, U-Net, every preset) with per-job batch norm for free, so we use it.
torch.compile of the vmapped forward: 6.79 vs 7.95 ms per job-step (32 px, B = 8) after 450 s of
compilation (150 s CPU) on this machine: it does not pay for a pack of 4000-step jobs, so it is off.
"""
from __future__ import annotations

import copy
import time
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap

from recon.problem import Problem
from recon.solvers.base import NetworkSolver, StepOutput
from recon.solvers.loop import Loop, LoopSettings, ProgressFn, SolverResult, StopRequested
from recon.solvers.step_records import METRICS_BLOCK, host_floats

__all__ = ["packable", "run_solver_pack", "pack_footprint"]


def packable(name: str) -> bool:
    """Whether jobs of solver `name` can run as one pack (else the caller runs them one by one)."""
    from recon.solvers import get_solver

    return bool(get_solver(name).packable)


class NetPack:
    """The networks (and Adam) of B solvers as one: stacked tensors stepped through vmap.

    B = 1 keeps the solver's own module and optimizer, so a pack of one is the single job's
    computation exactly. `sync(j)` writes slot j's parameters, buffers and Adam moments back into
    solver j, whose `state_dict` (checkpoints) and `final_image` then are the job's own."""

    def __init__(self, solvers: Sequence[NetworkSolver]):
        self.solvers = list(solvers)
        first = self.solvers[0]
        if len(self.solvers) == 1:
            self.net, self.optimizer = first.net, first.optimizer
            return
        self.base = copy.deepcopy(first.net).to("meta")  # the structure; tensors come per call
        self.params, self.buffers = stack_module_state([s.net for s in self.solvers])
        self._slots = self._optimizer_slots()
        # an optimised input (self-guided's z): while the pack steps, solver j's z is row j of the
        # stacked tensor (so its gradient lands there); sync puts its own Parameter back
        self.inputs = {(gi, i): slot for (gi, i), slot in self._slots.items()
                       if slot[1][0] is self.solvers[0].z}
        # foreach: one kernel per Adam operation over all stacked tensors instead of one per tensor
        # (torch picks it only on CUDA); the same arithmetic, elementwise, as the per-job optimizers
        groups = [{**{k: v for k, v in g.items() if k != "params"}, **_foreach(g), "params": [self._slots[(gi, i)][0]
                   for i in range(len(g["params"]))]} for gi, g in enumerate(first.optimizer.param_groups)]
        self.optimizer = type(first.optimizer)(groups)
        for stacked, per_job in self._slots.values():
            states = [s.optimizer.state.get(p) for s, p in zip(self.solvers, per_job)]
            if states[0]:  # resumed: stack the per-job moments (every job is at the same step)
                self.optimizer.state[stacked] = {
                    key: value.clone() if key == "step" else torch.stack([st[key] for st in states])
                    for key, value in states[0].items()}

    def _optimizer_slots(self) -> dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]]:
        """(group, index) -> (stacked tensor, the per-job tensors it stacks) for every optimised
        tensor; network parameters are the stacked ones functional_call uses."""
        names = {id(p): n for n, p in self.solvers[0].net.named_parameters()}
        slots = {}
        for gi, group in enumerate(self.solvers[0].optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                per_job = [s.optimizer.param_groups[gi]["params"][i] for s in self.solvers]
                if id(p) in names:
                    stacked = self.params[names[id(p)]]
                else:  # an optimised input (not in the network): stacked here
                    stacked = torch.stack([t.detach() for t in per_job]).requires_grad_(True)
                slots[(gi, i)] = (stacked, per_job)
        return slots

    def bind_inputs(self) -> None:
        """Point every solver's optimised input at its row of the stacked tensor."""
        for stacked, per_job in self.inputs.values():
            for j, solver in enumerate(self.solvers):
                solver.z = stacked[j]

    def _call(self, params: dict, buffers: dict, z: torch.Tensor) -> torch.Tensor:
        # the networks tie no weights: skip functional_call's search for tied ones (per call)
        return functional_call(self.base, (params, buffers), (z,), tie_weights=False)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One network output per slot, each slot's input through its own network."""
        if len(self.solvers) == 1:
            return [self.net(inputs[0])]
        out = vmap(self._call, randomness="error")(self.params, self.buffers, torch.stack(list(inputs)))
        return list(out.unbind(0))

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def sync(self, j: int) -> None:
        """Write slot j's tensors and Adam state back into solver j."""
        if len(self.solvers) == 1:
            return
        solver = self.solvers[j]
        for name, p in solver.net.named_parameters():
            p.copy_(self.params[name][j])
        for name, b in solver.net.named_buffers():
            b.copy_(self.buffers[name][j])
        for stacked, per_job in self.inputs.values():
            solver.z = per_job[j]  # its own Parameter again (checkpoints, results)
        for stacked, per_job in self._slots.values():
            per_job[j].copy_(stacked[j])
            state = self.optimizer.state.get(stacked)
            if state:
                solver.optimizer.state[per_job[j]] = {
                    key: value.clone() if key == "step" else value[j].clone() for key, value in state.items()}


def _foreach(group: dict) -> dict:
    """foreach=True where the optimizer has that option and the user did not choose fused."""
    return {"foreach": True} if "foreach" in group and not group.get("fused") else {}


def pack_step(pack: NetPack, active: Sequence[bool], k: int, last: list) -> list[StepOutput | None]:
    """Step k of every active slot as one computation: NetworkSolver.step, batched. `last` holds
    each slot's previous input: a finished slot is fed it again (its output is not used)."""
    solvers = pack.solvers
    if len(solvers) > 1:
        pack.bind_inputs()
    for j, (s, on) in enumerate(zip(solvers, active)):
        if on:
            last[j] = s.network_input()
    xs = pack.forward([t.detach() if not on else t for t, on in zip(last, active)])
    terms = {j: solvers[j].objective(xs[j]) for j, on in enumerate(active) if on}
    pack.update(reduce(add, [t["loss"] for t in terms.values()]))
    refresh = {j: solvers[j].refresh_input(k) for j in terms}
    if any(refresh.values()):
        with torch.no_grad():
            zs = pack.forward([s.z for s in solvers])
        for j, again in refresh.items():
            if again:
                solvers[j].z = zs[j].detach()
    return [StepOutput(solvers[j].iterate(xs[j].detach()), {n: t.detach() for n, t in terms[j].items()})
            if j in terms else None for j in range(len(solvers))]


def _run_pack(loops: list[Loop], should_stop: Callable[[], bool] | None) -> list[SolverResult | BaseException]:
    """Run loops that all start at the same step as one pack; one result or exception per loop."""
    pack = NetPack([loop.solver for loop in loops])
    n, settings = len(loops), loops[0].s
    results: list[Any] = [None] * n
    active = [True] * n
    last: list[Any] = [None] * n  # each slot's latest network input
    t0 = time.perf_counter()
    elapsed = lambda j: loops[j].elapsed + time.perf_counter() - t0  # noqa: E731

    def checkpoint(next_step: int) -> None:
        for j in range(n):
            if active[j] and loops[j].s.checkpoint_path:
                pack.sync(j)
                loops[j]._save_checkpoint(next_step, elapsed(j))

    def finish(j: int, steps_run: int, status: str | None) -> None:
        pack.sync(j)
        results[j] = loops[j]._result(steps_run, elapsed(j), status == "diverged", status == "stopped")
        results[j].extra["pack_size"] = n
        active[j] = False

    def flush() -> None:
        running = [j for j in range(n) if active[j]]
        for j, ended in zip(running, _flush([loops[j] for j in running])):
            if ended is not None:
                finish(j, ended[1], ended[0])

    for loop in loops:
        loop.begin()
    try:
        for k in range(loops[0].start, settings.steps):
            if should_stop is not None and should_stop():
                flush()  # a job that ended in the last block ends there, as it would have
                checkpoint(k)
                for j in range(n):
                    if active[j]:
                        path = loops[j].s.checkpoint_path
                        results[j], active[j] = StopRequested(k, Path(path) if path else None), False
                return results
            for j, out in enumerate(pack_step(pack, active, k, last)):
                if out is not None:
                    loops[j].push(k, out)
            if any(active[j] and loops[j].flush_due(k) for j in range(n)):
                flush()
            if not any(active):
                return results
            if loops[0].checkpoint_due(k):
                checkpoint(k + 1)
        if pack.solvers[0].device.type == "cuda":
            torch.cuda.synchronize(pack.solvers[0].device)
        for j in range(n):
            if active[j]:
                finish(j, settings.steps, None)
    except Exception as err:  # noqa: BLE001 - a failing step fails the slots still running, each
        for j in range(n):
            if active[j]:
                results[j], active[j] = err, False
    return results


def _flush(loops: list[Loop]) -> list[tuple[str, int] | None]:
    """Every loop's pending values in one host copy; what each loop's `absorb` says."""
    payloads = [loop.payload() for loop in loops]
    values = host_floats(payloads)
    ends, at = [], 0
    for loop, payload in zip(loops, payloads):
        ends.append(loop.absorb(values[at:at + payload.numel()]))
        at += payload.numel()
    return ends


def run_solver_pack(name: str, problems: Sequence[Problem], *, steps: int | None = None,
                    params: dict[str, Any] | None = None, seeds: Sequence[int],
                    device: str | torch.device | None = None, ssim_every: int = 10,
                    checkpoint_paths: Sequence[str | Path | None] | None = None, checkpoint_every: int = 0,
                    progress: Sequence[ProgressFn | None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    metrics_block: int = METRICS_BLOCK) -> list[SolverResult | BaseException]:
    """Run solver `name` on every problem as one pack; one entry per problem, in order.

    All problems share the task and image shape (and the solver, `params`, `steps`); each has its
    own seed (`seeds[j]`), checkpoint file (`checkpoint_paths[j]`, the single loop's format: a job
    resumes from it here or in run_solver) and progress callback (`progress[j]`, as run_solver's).
    An entry is the job's SolverResult (numbers as run_solver computes them; runtime_s is the
    pack's wall time while the job was in it; extra['pack_size'] = B), or the exception that ended
    the job: its set-up failed (the others still run), a step failed, or `should_stop()` returned
    True before a step (a StopRequested after every running job wrote its checkpoint; jobs that
    had already finished keep their results). Jobs resuming from checkpoints at different steps
    run as one pack per step. A solver that is not `packable` runs a single job only."""
    from recon.solvers import default_device, get_solver, prepare_device
    from recon.solvers.base import make_params

    n = len(problems)
    cls = get_solver(name)
    for what, given in (("seeds", seeds), ("checkpoint_paths", checkpoint_paths), ("progress", progress)):
        if given is not None and len(given) != n:
            raise ValueError(f"run_solver_pack: {len(given)} {what} for {n} problems")
    if n > 1 and not cls.packable:
        raise ValueError(f"solver {name!r} cannot run in a pack (packable({name!r}) is False); run its jobs alone")
    if len({(p.task, p.image_shape) for p in problems}) > 1:
        raise ValueError("run_solver_pack: the problems of a pack must share task and image shape, got "
                         + ", ".join(sorted({f"{p.task} {p.image_shape}" for p in problems})))
    steps = cls.default_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = prepare_device(torch.device(device) if device is not None else default_device())
    results: list[Any] = [None] * n
    loops: dict[int, Loop] = {}
    for j, problem in enumerate(problems):
        try:  # a job whose set-up fails gets its exception; its pack-mates run
            p = make_params(cls.Params, params, where=f"solver {name!r} params")
            solver = cls(problem.to(dev), p, seed=int(seeds[j]), device=dev)
            path = checkpoint_paths[j] if checkpoint_paths is not None else None
            settings = LoopSettings(steps=steps, ssim_every=ssim_every, checkpoint_path=Path(path) if path else None,
                                    checkpoint_every=checkpoint_every, metrics_block=metrics_block,
                                    progress=progress[j] if progress is not None else None)
            loop = Loop(solver, settings)
            if cls.packable:
                loop._maybe_resume()
            loops[j] = loop  # only a job whose set-up succeeded runs
        except Exception as err:  # noqa: BLE001 - reported in the job's slot
            results[j] = err
    if not cls.packable:
        for j, loop in loops.items():
            loop.s.should_stop = should_stop
            try:
                results[j] = loop.run()
            except Exception as err:  # noqa: BLE001
                results[j] = err
        return results
    for start in sorted({loop.start for loop in loops.values()}):
        members = [j for j, loop in loops.items() if loop.start == start]
        for j, res in zip(members, _run_pack([loops[j] for j in members], should_stop)):
            results[j] = res
    return results


def pack_footprint(name: str, problem: Problem, *, params: dict[str, Any] | None = None,
                   device: str | torch.device | None = None) -> int:
    """Bytes one more job adds to a pack of solver `name` on `problem`'s shape, measured by building
    one job and stepping it once: on CUDA the peak allocated memory of that step (everything it
    holds); elsewhere its network, gradient and two Adam moments (4x the parameters), the tensors
    autograd saves for the backward pass (the activations) and the problem's tensors. What
    `--pack auto` divides the free memory by."""
    from recon.solvers import default_device, get_solver, prepare_device
    from recon.solvers.base import make_params

    cls = get_solver(name)
    dev = prepare_device(torch.device(device) if device is not None else default_device())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    solver = cls(problem.to(dev), make_params(cls.Params, params, where=f"solver {name!r} params"), seed=0, device=dev)
    saved = [0]

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        solver.step(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    weights = sum(p.numel() * p.element_size() for p in solver.trainable_parameters())
    data = sum(t.numel() * t.element_size() for t in (problem.measurements, problem.ground_truth) if t is not None)
    return int(4 * weights + saved[0] + data)
