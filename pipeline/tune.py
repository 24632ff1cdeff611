"""`dipcohort tune`: hyper-parameters chosen on tuning scans with Optuna, run as ordinary jobs.

    tune(manifest, out, backend, solver="aseqdip", space={"lambda": (0.1, 10, "log")}, trials=20, ...)

The search: Optuna's TPE sampler (seeded) maximises the objective (a summary field, e.g.
final_psnr, averaged over the tuning scans and seeds) of one solver entry of the manifest, the
other parameters of that entry fixed. Trials run in rounds of `batch` through the backend the
caller gives (local, Ray, Slurm): every trial of a round is a solver configuration of a generated
manifest `OUT/round-KKK-rung-R.yaml`, run into its own store `OUT/round-KKK-rung-R.zarr`, so
`dipcohort status` works on each and an interrupted round resumes where it stopped.

Pruning on the per-step PSNR: the step budget is climbed in rungs (`rungs`, fractions of the
solver's steps, default 1/4 then 1): at each rung the trial's jobs run to that budget, their mean
PSNR curve is reported to Optuna step by step, and the median pruner stops trials whose PSNR at
that step is below the median of earlier trials; the survivors run at the next rung. (A rung is a
new job with a longer budget: it reruns the shorter run's steps, which costs the survivors
`rungs[-2]` more of a budget; nothing of a finished job is lost.)

Honesty: the scans tuned on are the manifest's `tuning_scans`; a scan of the study's evaluation
`scans` (same source, task, parameters and size) is refused unless `allow_overlap`. The result,
`OUT/best.yaml`, is a manifest snippet whose every tuned value carries, in a comment, the search
that chose it (space, trials, tuning scans, objective, best value). The Optuna study itself is in
`OUT/optuna.journal` (Optuna's JournalStorage): rerunning the same command continues it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from pipeline.errors import UsageError

OBJECTIVES = ("final_psnr", "final_ssim", "peak_psnr", "es_psnr", "ema_psnr")
DEFAULT_RUNGS = (0.25, 1.0)


# ---------------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched parameter: float range (linear or log), integer range, or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        kind = "int " if self.integer else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}] {kind}{'log' if self.log else 'linear'}"


def parse_param(text: str) -> Param:
    """`name=LOW:HIGH[:log|:int|:int-log]` or `name=A,B,C` (choices, YAML scalars)."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or not spec:
        raise UsageError(f"--param {text!r}: expected NAME=LOW:HIGH[:log] or NAME=A,B,C")
    if ":" not in spec:
        choices = tuple(yaml.safe_load(v) for v in spec.split(",") if v.strip())
        if len(choices) < 2:
            raise UsageError(f"--param {text!r}: give a range LOW:HIGH or at least two choices A,B")
        return Param(name, choices=choices)
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear", "int", "int-log")):
        raise UsageError(f"--param {text!r}: expected NAME=LOW:HIGH with an optional :log, :int or :int-log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"--param {text!r}: LOW and HIGH must be numbers") from None
    mode = parts[2] if len(parts) == 3 else "linear"
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"--param {text!r}: expected finite LOW < HIGH")
    if "log" in mode and low <= 0:
        raise UsageError(f"--param {text!r}: a log range needs LOW > 0")
    return Param(name, low, high, log="log" in mode, integer=mode.startswith("int"))


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _scan_key(scan) -> tuple:
    return (scan.source, scan.task, json.dumps(scan.task_params, sort_keys=True), scan.kind, scan.size)


def tuning_scans(manifest, ids: Sequence[str] | None, allow_overlap: bool) -> list:
    """The scans to tune on: the manifest's tuning_scans (all, or those named); a named evaluation
    scan, or a tuning scan that is an evaluation scan under another id, only with allow_overlap."""
    evaluation = {s.id: s for s in manifest.scans}
    pool = {s.id: s for s in manifest.tuning_scans}
    if ids:
        unknown = [i for i in ids if i not in pool and i not in evaluation]
        if unknown:
            raise UsageError(f"--tune-scans: {', '.join(unknown)} not in {manifest.path} (tuning_scans: "
                             f"{', '.join(pool) or 'none'})")
        chosen = [pool.get(i) or evaluation[i] for i in ids]
    else:
        if not pool:
            raise UsageError(f"{manifest.path}: no tuning_scans; add a `tuning_scans:` list to the manifest "
                             f"(scans not evaluated by the study) or name scans with --tune-scans")
        chosen = list(pool.values())
    eval_keys = {_scan_key(s): s.id for s in manifest.scans}
    overlap = [(s.id, eval_keys[_scan_key(s)]) for s in chosen if _scan_key(s) in eval_keys]
    if overlap and not allow_overlap:
        pairs = ", ".join(a if a == b else f"{a} (= evaluation scan {b})" for a, b in overlap)
        raise UsageError(f"--tune-scans: {pairs} {'is' if len(overlap) == 1 else 'are'} evaluation scan(s) of the "
                         f"study; tuning on them biases its results. Use tuning_scans, or --allow-overlap")
    return chosen


def solver_entry(manifest_path: Path, solver: str | None) -> tuple[int, dict]:
    """(index, raw entry) of the manifest's solver to tune (the only network solver when not named)."""
    data = yaml.safe_load(Path(manifest_path).read_text())
    entries = data.get("solvers") or []
    names = [e.get("name") for e in entries]
    if solver is None:
        if len(entries) != 1:
            raise UsageError(f"--solver: {manifest_path} has solvers {', '.join(map(str, names))}; name the one to tune")
        return 0, dict(entries[0])
    if names.count(solver) != 1:
        raise UsageError(f"--solver {solver}: expected exactly one solvers entry named {solver!r} in "
                         f"{manifest_path}, found {names.count(solver)}")
    return names.index(solver), dict(entries[names.index(solver)])


# ---------------------------------------------------------------------------------------------
# rounds
# ---------------------------------------------------------------------------------------------
def _scan_entry(scan) -> dict:
    entry = {"id": scan.id, "source": scan.source, "task": scan.task, "params": dict(scan.task_params),
             "kind": scan.kind}
    if scan.reference:
        entry["reference"] = scan.reference
    if scan.size:
        entry["size"] = scan.size
    if scan.color:
        entry["color"] = True
    return entry


def write_round_manifest(path: Path, base: dict, entry: dict, trials: list[tuple[int, dict]], scans: list,
                         steps: int) -> Path:
    """A manifest with one solver configuration per trial (its suggested params over the entry's)."""
    solvers = []
    for number, params in trials:
        fixed = {k: v for k, v in (entry.get("params") or {}).items() if k not in params}
        solvers.append({"name": entry["name"], "params": {**fixed, **params}, "steps": steps})
    doc = {k: base[k] for k in ("seeds", "size", "metrics", "resources", "checkpoint_every") if k in base}
    doc.update(cohort=f"{base.get('cohort', 'cohort')}-tune", scans=[_scan_entry(s) for s in scans], solvers=solvers)
    path.write_text("# generated by dipcohort tune: trials " + ", ".join(str(n) for n, _ in trials) + "\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return path


def trial_configs(round_manifest: Path, numbers: Sequence[int]) -> dict[int, str]:
    """Trial number -> the config id of its solver entry (entries are in trial order)."""
    from pipeline.manifest import load_manifest

    configs = load_manifest(round_manifest).configs
    return {number: cfg.config for number, cfg in zip(numbers, configs)}


def trial_results(store: Path, config_of: dict[int, str], objective: str) -> dict[int, tuple[float, np.ndarray]]:
    """Per trial: the objective (mean over its done jobs) and its mean per-step PSNR curve."""
    from pipeline.query import open_results

    ds = open_results(store)
    done = ds.status.values == "done"
    out = {}
    for number, config in config_of.items():
        rows = np.flatnonzero((ds.config.values == config) & done)
        if rows.size == 0:
            out[number] = (math.nan, np.full(ds.sizes["step"], np.nan))
            continue
        out[number] = (float(np.nanmean(ds[objective].values[rows])), np.nanmean(ds.psnr.values[rows], axis=0))
    return out


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
def tune(manifest_path: str | Path, out: str | Path, backend, *, space: Sequence[Param], trials: int,
         objective: str = "final_psnr", solver: str | None = None, scan_ids: Sequence[str] | None = None,
         allow_overlap: bool = False, batch: int = 1, rungs: Sequence[float] = DEFAULT_RUNGS, seed: int = 0,
         stream=None) -> dict:
    """Run the search (or continue it) and write OUT/best.yaml; returns the best trial's values."""
    import sys

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from pipeline.driver import run_cohort
    from pipeline.manifest import load_manifest

    stream = stream or sys.stdout
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if trials < 1 or batch < 1:
        raise UsageError(f"--trials and --batch must be >= 1, got {trials} and {batch}")
    rungs = sorted(set(float(r) for r in rungs))
    if not rungs or rungs[-1] != 1.0 or rungs[0] <= 0:
        raise UsageError(f"--rungs {rungs}: expected fractions in (0, 1] ending with 1")
    if not space:
        raise UsageError("give at least one --param NAME=LOW:HIGH to search")
    manifest = load_manifest(manifest_path)
    scans = tuning_scans(manifest, scan_ids, allow_overlap)
    index, entry = solver_entry(manifest.path, solver)
    config = next(c for c in manifest.configs if c.where.endswith(f"solvers[{index}]"))
    base = yaml.safe_load(Path(manifest.path).read_text())
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    budgets = [max(1, round(config.steps * r)) for r in rungs]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="dipcohort-tune", direction="maximize", load_if_exists=True,
        storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=max(1, batch), n_warmup_steps=0))
    _requeue_interrupted(study, out, TrialState)
    k = len(list(out.glob("round-*-rung-1.yaml")))
    while _finished(study, TrialState) < trials:
        n = min(batch, trials - _finished(study, TrialState))
        asked = [study.ask() for _ in range(n)]
        live = {t.number: (t, {p.name: p.suggest(t) for p in space}) for t in asked}
        k += 1
        _write_pending(out, k, {num: params for num, (_, params) in live.items()})
        for r, steps in enumerate(budgets, start=1):
            stem = out / f"round-{k:03d}-rung-{r}"
            round_manifest = write_round_manifest(stem.with_suffix(".yaml"), base, entry,
                                                  [(num, params) for num, (_, params) in live.items()], scans, steps)
            print(f"tune: round {k}, rung {r} ({steps} steps): trials {', '.join(map(str, live))}", file=stream)
            run_cohort(round_manifest, stem.with_suffix(".zarr"), backend, progress="quiet", stream=stream)
            results = trial_results(stem.with_suffix(".zarr"), trial_configs(round_manifest, list(live)), objective)
            for num in list(live):
                trial, _ = live[num]
                value, curve = results[num]
                for step in range(0 if r == 1 else budgets[r - 2], steps):
                    if math.isfinite(curve[step]):
                        trial.report(float(curve[step]), step)
                if not math.isfinite(value):
                    study.tell(trial, state=TrialState.FAIL)
                    del live[num]
                elif r < len(budgets) and trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
                    del live[num]
                elif r == len(budgets):
                    study.tell(trial, value)
                    del live[num]
            if not live:
                break
        _write_pending(out, k, {})
    return write_best(study, out, manifest, entry, space, scans, objective, trials, rungs, budgets, seed)


def _finished(study, TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _write_pending(out: Path, k: int, pending: dict[int, dict]) -> None:
    path = out / "pending.json"
    if pending:
        path.write_text(json.dumps({"round": k, "trials": {str(n): p for n, p in pending.items()}}))
    else:
        path.unlink(missing_ok=True)


def _requeue_interrupted(study, out: Path, TrialState) -> None:
    """Trials of a round that was interrupted: marked failed in the study and asked again with the
    same values, so the rerun's jobs are the round's (its store resumes; done jobs are not rerun)."""
    path = out / "pending.json"
    if not path.is_file():
        return
    pending = json.loads(path.read_text())
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for number, params in pending["trials"].items():
        if int(number) in running:
            study.tell(int(number), state=TrialState.FAIL)
        study.enqueue_trial(params, skip_if_exists=False)
    path.unlink()
    # the rerun writes the same round's manifests again (same params: same job ids)
    for leftover in out.glob(f"round-{pending['round']:03d}-rung-*.yaml"):
        leftover.unlink()


def write_best(study, out: Path, manifest, entry: dict, space, scans, objective, trials, rungs, budgets, seed) -> dict:
    """OUT/best.yaml: the solver entry with the tuned values, each with the search that chose it."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UsageError(f"tune: no trial completed (see the round stores in {out})")
    best = study.best_trial
    n_pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# tuned by `dipcohort tune` on {stamp} from {manifest.path}",
             f"# objective: {objective} (mean over tuning scans and seeds), maximised by Optuna TPE (seed {seed});",
             f"#   {len(complete)} trials completed, {n_pruned} pruned (median pruner on the per-step PSNR at rungs "
             f"{', '.join(map(str, budgets))} steps)",
             f"# tuning scans (not the study's evaluation scans): {', '.join(s.id for s in scans)}",
             f"# best: trial {best.number}, {objective} = {best.value:.4f}",
             "solvers:", f"  - name: {entry['name']}", "    params:"]
    fixed = {k: v for k, v in (entry.get("params") or {}).items() if k not in best.params}
    for key, value in fixed.items():
        lines.append(f"      {key}: {json.dumps(value)}")
    for p in space:
        value = best.params[p.name]
        shown = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
        lines.append(f"      {p.name}: {shown}   # tuned: {p.describe()}, best of {len(complete)} trials "
                     f"({objective} {best.value:.2f}) on {len(scans)} tuning scan(s)")
    if "steps" in entry:
        lines.append(f"    steps: {entry['steps']}")
    (out / "best.yaml").write_text("\n".join(lines) + "\n")
    return {"params": dict(best.params), "value": best.value, "trial": best.number, "completed": len(complete),
            "pruned": n_pruned, "path": out / "best.yaml"}
