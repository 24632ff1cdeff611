"""The one optimisation loop every solver runs in.

It owns stepping, per-step metrics (loss terms, PSNR every step, SSIM every k steps, moving
variance), the oracle peak, ES-WMV / ES-EMV early stopping, output EMA, divergence detection and
checkpoints that make a run resumable with identical numbers.

Per-step values stay on the device and reach the host in blocks (`recon.solvers.step_records`):
the iterates that must be picked at their step (peak, ES-WMV's selection, the image at a
divergence) are picked on the device, and the host decides at block boundaries. Divergence ends
the run at the step it happened (later steps of the block are dropped, the EMA and last image are
frozen at it); an early stop can only fire `patience` steps after the best step the host knows,
so the loop copies at that step and stops exactly where a per-step copy would.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recon.early_stopping import EarlyStopper, make_variance
from recon.solvers.base import Solver
from recon.solvers.step_records import METRICS_BLOCK, Selection, StepBuffer, host_floats

ProgressFn = Callable[[int, int, dict], None]

# What the loop records, the contract with the results store (pipeline.store builds its columns
# from these and the solvers' loss terms). Per step: the loss, the task's scores of the iterate
# (`Problem.score`: psnr/ssim as the papers define them, *_full over the whole frame where the
# task scores inside a mask, e.g. the CT disc), the scores of the output EMA (ema_*, when
# ema_decay > 0) and the moving variance (ES-WMV, or ES-EMV with es_variance: emv). NaN where a value does not apply.
LOOP_METRICS = ("loss", "psnr", "ssim", "psnr_full", "ssim_full", "ema_psnr", "ema_ssim", "movvar")
# One value per run (SolverResult.summary()); final_* score the image the method returns.
SUMMARY_FIELDS = ("peak_psnr", "peak_step", "final_psnr", "final_ssim", "final_psnr_full", "final_ssim_full",
                  "es_step", "es_psnr", "es_ssim", "ema_psnr", "ema_ssim", "steps", "runtime_s", "steps_per_s",
                  "diverged", "stopped_early")


class StopRequested(Exception):
    """Raised by the loop when `LoopSettings.should_stop()` said so at a step boundary.

    `next_step` is where a rerun continues; `checkpoint` is the checkpoint written for it (None
    without a checkpoint path)."""

    def __init__(self, next_step: int, checkpoint: Path | None):
        super().__init__(f"stopped before step {next_step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.next_step, self.checkpoint = next_step, checkpoint


@dataclass
class LoopSettings:
    steps: int
    ssim_every: int = 10          # SSIM is ~10x the cost of PSNR; every 10th step by default
    checkpoint_path: Path | None = None
    checkpoint_every: int = 0     # 0: never
    progress: ProgressFn | None = None
    progress_every: int = 10
    should_stop: Callable[[], bool] | None = None  # polled before each step (Ctrl-C, SIGTERM): StopRequested
    metrics_block: int = METRICS_BLOCK  # steps between host copies of the per-step values


@dataclass
class SolverResult:
    """Everything a run produced. Images are network-format (1, C, H, W) on the CPU."""

    image: torch.Tensor
    history: dict[str, np.ndarray]
    steps_run: int
    runtime_s: float
    diverged: bool = False
    stopped_early: bool = False
    final_psnr: float = math.nan
    final_ssim: float = math.nan
    peak_psnr: float = math.nan      # oracle: needs the ground truth
    peak_step: int = -1
    peak_image: torch.Tensor | None = None
    es_step: int = -1                # ES-WMV selected step (minimum moving variance)
    es_psnr: float = math.nan
    es_ssim: float = math.nan
    es_image: torch.Tensor | None = None
    ema_image: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    final_psnr_full: float = math.nan
    final_ssim_full: float = math.nan
    ema_psnr: float = math.nan       # the output EMA at the end (ema_decay > 0)
    ema_ssim: float = math.nan

    def summary(self) -> dict:
        """One value per SUMMARY_FIELDS name (NaN where it does not apply)."""
        out = {
            "peak_psnr": self.peak_psnr, "peak_step": self.peak_step,
            "final_psnr": self.final_psnr, "final_ssim": self.final_ssim,
            "final_psnr_full": self.final_psnr_full, "final_ssim_full": self.final_ssim_full,
            "es_step": self.es_step, "es_psnr": self.es_psnr, "es_ssim": self.es_ssim,
            "ema_psnr": self.ema_psnr, "ema_ssim": self.ema_ssim,
            "steps": self.steps_run, "runtime_s": self.runtime_s,
            "steps_per_s": self.steps_run / self.runtime_s if self.runtime_s > 0 else math.nan,
            "diverged": self.diverged, "stopped_early": self.stopped_early,
        }
        assert tuple(out) == SUMMARY_FIELDS
        return out


class _History:
    """Per-step scalars in preallocated float64 columns (NaN where not computed)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.columns: dict[str, np.ndarray] = {}

    def record(self, k: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            col = self.columns.get(name)
            if col is None:
                col = self.columns[name] = np.full(self.steps, np.nan)
            col[k] = value

    def trimmed(self, n: int) -> dict[str, np.ndarray]:
        return {name: col[:n].copy() for name, col in self.columns.items()}

    def state_dict(self, n: int) -> dict:
        return {name: torch.from_numpy(col[:n].copy()) for name, col in self.columns.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state.items():
            col = self.columns[name] = np.full(self.steps, np.nan)
            col[: len(values)] = values.cpu().numpy()  # map_location may have put it on the GPU


class Loop:
    def __init__(self, solver: Solver, settings: LoopSettings):
        self.solver = solver
        self.s = settings
        self.problem = solver.problem
        p = solver.params
        self.reference = self.problem.ground_truth  # None for measured data without a reference
        self.history = _History(settings.steps)
        solver.total_steps = settings.steps  # the budget, for solvers with schedules over it (HQS)
        self.variance = (make_variance(p.es_variance, p.variance_window, p.emv_alpha)
                         if solver.uses_network else None)
        self.stopper = EarlyStopper(p.patience, p.es_delta)
        self.ema: torch.Tensor | None = None
        self.peak_psnr, self.peak_step, self.peak_image = -math.inf, -1, None
        self.es_image: torch.Tensor | None = None
        self.start = 0
        self.elapsed = 0.0
        self.records = StepBuffer(settings.metrics_block, solver.device)
        self.alive = torch.tensor(True, device=solver.device)  # no non-finite loss yet (device-side)

    # ---- metrics ---------------------------------------------------------------------------
    def _metrics(self, k: int, image: torch.Tensor) -> dict[str, torch.Tensor]:
        every = self.s.ssim_every
        with_ssim = every > 0 and (k % every == 0 or k == self.s.steps - 1)
        out: dict[str, torch.Tensor] = dict(self.problem.score(image, with_ssim=with_ssim))
        if self.ema is not None:  # the output EMA is scored like the iterate: ema_psnr, ema_ssim
            scores = self.problem.score(self.ema, with_ssim=with_ssim)
            out.update({f"ema_{name}": scores[name] for name in ("psnr", "ssim") if name in scores})
        if self.variance is not None:
            var = self.variance.update(self.problem.display(image))
            if var is not None:
                out["movvar"] = var
        return out

    def _ema(self, image: torch.Tensor) -> None:
        """r_k = decay r_{k-1} + (1 - decay) x_k with r_0 = x_0 (DIP-ADMM thesis Sec. 4.2; the CT
        chapter's exponential averaging of the output, Sec. 6.3)."""
        decay = self.solver.params.ema_decay
        if decay > 0:
            self.ema = image.clone() if self.ema is None else self._while_alive(decay * self.ema + (1 - decay) * image,
                                                                                 self.ema)

    def _while_alive(self, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        """`new` until a step's loss was non-finite, then `old`: the state at the divergence step
        survives the rest of the block, which the host only sees at the next copy."""
        return new if old is None else torch.where(self.alive, new, old)

    # ---- run -------------------------------------------------------------------------------
    def run(self) -> SolverResult:
        self._maybe_resume()
        self.begin()
        ended = None
        k = self.start - 1
        t0 = time.perf_counter()
        for k in range(self.start, self.s.steps):
            if self.s.should_stop is not None and self.s.should_stop():
                ended = self.flush()
                if ended is not None:
                    break
                self._stop_at(k, self.elapsed + time.perf_counter() - t0)
            self.push(k, self.solver.step(k))
            if self.flush_due(k):
                ended = self.flush()
                if ended is not None:
                    break
            if self.checkpoint_due(k):
                self._save_checkpoint(k + 1, self.elapsed + time.perf_counter() - t0)
        if self.solver.device.type == "cuda":
            torch.cuda.synchronize(self.solver.device)
        runtime = self.elapsed + time.perf_counter() - t0
        status, steps_run = ended if ended is not None else (None, k + 1)
        return self._result(steps_run, runtime, status == "diverged", status == "stopped")

    # ---- one step's bookkeeping, shared with the packed loop (recon.solvers.packed) ---------
    def begin(self) -> None:
        """Before the first step (after a resume): the device-side selections from the host state."""
        dev = self.solver.device
        self.peak = Selection(self.peak_psnr, self.peak_step, self.peak_image, dev)
        best = self.stopper.best_step
        self.selected = Selection(self.stopper.best, -1 if best is None else best, self.es_image, dev)
        self._set_stop_horizon(self.start)

    def observe(self, k: int, out) -> dict[str, torch.Tensor]:
        """After `solver.step(k)` gave `out`: the step's loss terms and metrics as 0-d tensors."""
        self.solver.last_image = self._while_alive(out.image, self.solver.last_image)
        self._ema(out.image)
        return {**out.terms, **self._metrics(k, out.image)}

    def push(self, k: int, out) -> None:
        """Step k's values into the device buffer; peak and ES-WMV selection on the device."""
        tensors = self.observe(k, out)
        ok = self.alive & torch.isfinite(tensors["loss"])  # a diverging step selects nothing
        if "psnr" in tensors:
            psnr = tensors["psnr"].detach().double()
            self.peak.offer(ok & (psnr > self.peak.value), psnr, k, out.image)
        if "movvar" in tensors:  # ES-WMV, Alg. 2: a new best when g < delta * g_min
            var = tensors["movvar"].detach().double()
            self.selected.offer(ok & self.stopper.improves(var, self.selected.value), var, k, out.image)
        self.alive = ok
        self.records.write(k, tensors)

    def _set_stop_horizon(self, next_step: int) -> None:
        """The first step at which an early stop could fire: patience steps after the best step
        the host knows (or after `next_step` while there is none)."""
        best = self.stopper.best_step
        self.stop_horizon = (next_step if best is None else best) + self.solver.params.patience

    def flush_due(self, k: int) -> bool:
        """Whether the host needs step k's values now: a full block, the last step, a checkpoint,
        or a step where an early stop could fire (none before best step + patience)."""
        return (self.records.full or k == self.s.steps - 1 or self.checkpoint_due(k)
                or (self.solver.params.early_stop and k >= self.stop_horizon))

    def payload(self) -> torch.Tensor:
        """The pending rows and the selections' values and steps, for one host copy."""
        return torch.cat([self.records.payload(), torch.stack(self.peak.scalars() + self.selected.scalars())])

    def flush(self) -> tuple[str, int] | None:
        return self.absorb(host_floats([self.payload()]))

    def absorb(self, values: list[float]) -> tuple[str, int] | None:
        """Take the copied payload: ('diverged' | 'stopped', steps run) when the run ended in it."""
        peak_psnr, peak_step, best, best_step = values[-4:]
        rows = self.records.unpack(values[:-4])
        self.peak_psnr, self.peak_step = peak_psnr, int(peak_step)
        self.peak_image = self.peak.image if self.peak_step >= 0 else None
        self.stopper.best, self.stopper.best_step = best, (int(best_step) if best_step >= 0 else None)
        self.es_image = self.selected.image if best_step >= 0 else None
        for i, (k, row) in enumerate(rows):
            self.history.record(k, row)
            if not math.isfinite(row["loss"]):
                return "diverged", k + 1
            # the selections are those of the last row, so only there can the stop rule be read
            if i == len(rows) - 1 and self.solver.params.early_stop and self.stopper.should_stop(k):
                return "stopped", k + 1
            if self.s.progress and (k % self.s.progress_every == 0 or k == self.s.steps - 1):
                self.s.progress(k + 1, self.s.steps, row)
        if rows:
            self._set_stop_horizon(rows[-1][0] + 1)
        return None

    def checkpoint_due(self, k: int) -> bool:
        """Whether a periodic checkpoint follows step k (none after the last step)."""
        return bool(self.s.checkpoint_path and self.s.checkpoint_every and (k + 1) % self.s.checkpoint_every == 0
                    and k + 1 < self.s.steps)

    def _result(self, steps_run: int, runtime: float, diverged: bool, stopped: bool) -> SolverResult:
        solver = self.solver
        if (stopped or solver.params.early_stop) and self.es_image is not None:
            image = self.es_image  # ES-DIP returns the selected iterate (Alg. 2), also at the budget
        elif diverged or steps_run == 0:
            image = solver.last_image if solver.last_image is not None else solver.problem.adjoint_image()
        elif self.ema is not None:
            image = self.ema  # a method with an output EMA returns the average (ema_decay > 0)
        else:
            image = solver.final_image()
        cpu = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
        res = SolverResult(image=cpu(image), history=self.history.trimmed(steps_run), steps_run=steps_run,
                           runtime_s=runtime, diverged=diverged, stopped_early=stopped,
                           peak_image=cpu(self.peak_image), es_image=cpu(self.es_image), ema_image=cpu(self.ema))
        if self.peak_step >= 0:
            res.peak_psnr, res.peak_step = float(self.peak_psnr), self.peak_step
        if self.reference is not None and not diverged:
            final = self._quality(image)
            res.final_psnr, res.final_ssim = final["psnr"], final["ssim"]
            res.final_psnr_full = final.get("psnr_full", math.nan)
            res.final_ssim_full = final.get("ssim_full", math.nan)
            if self.ema is not None:
                ema = self._quality(self.ema)
                res.ema_psnr, res.ema_ssim = ema["psnr"], ema["ssim"]
        if self.stopper.best_step is not None:
            res.es_step = int(self.stopper.best_step)
            if self.reference is not None and self.es_image is not None:
                es = self._quality(self.es_image)
                res.es_psnr, res.es_ssim = es["psnr"], es["ssim"]
        return res

    def _quality(self, image: torch.Tensor) -> dict[str, float]:
        return {name: float(v) for name, v in self.problem.score(image.to(self.solver.device)).items()}

    def _stop_at(self, k: int, elapsed: float) -> None:
        """Stop before step k, leaving a checkpoint (where there is a path for one) to continue from."""
        path = self.s.checkpoint_path
        if path:
            self._save_checkpoint(k, elapsed)
        raise StopRequested(k, Path(path) if path else None)

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, next_step: int, elapsed: float) -> None:
        state = {
            "next_step": next_step,
            "elapsed": elapsed,
            "solver": self.solver.state_dict(),
            "history": self.history.state_dict(next_step),
            "variance": self.variance.state_dict() if self.variance is not None else None,
            "stopper": self.stopper.state_dict(),
            "ema": self.ema, "es_image": self.es_image,
            "peak": {"psnr": self.peak_psnr, "step": self.peak_step, "image": self.peak_image},
            "torch_rng": torch.get_rng_state(),
        }
        path = Path(self.s.checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill mid-save never leaves a torn checkpoint

    def _maybe_resume(self) -> None:
        path = self.s.checkpoint_path
        if not path or not Path(path).is_file():
            return
        state = torch.load(path, map_location=self.solver.device, weights_only=True)
        self.solver.load_state_dict(state["solver"])
        self.history.load_state_dict(state["history"])
        if self.variance is not None and state["variance"] is not None:
            self.variance.load_state_dict(state["variance"])
        self.stopper.load_state_dict(state["stopper"])
        self.ema, self.es_image = state["ema"], state["es_image"]
        peak = state["peak"]
        self.peak_psnr, self.peak_step, self.peak_image = float(peak["psnr"]), int(peak["step"]), peak["image"]
        torch.set_rng_state(state["torch_rng"].cpu())
        self.start = int(state["next_step"])
        self.elapsed = float(state["elapsed"])
