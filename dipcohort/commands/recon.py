"""`dipcohort recon`: reconstruct one scan with one solver and write its images and metrics.

Outputs in --out DIR: recon.npy (display image; MRI also recon_complex.npy), recon.png,
degraded.png, reference.png (when there is one), metrics.csv (one row per step), summary.json,
psnr.png (PSNR against step with the oracle peak and the ES step marked).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError
from recon.tasks import cli_options, task_names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recon", help="reconstruct one scan with one solver",
                              description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--image", required=True, metavar="SRC",
                   help="skimage:NAME, an image / .npy / .npz / DICOM path, or FILE.h5#slice=K (fastMRI)")
    p.add_argument("--size", type=int, default=None, metavar="PX", help="resize to PX x PX (square crop first)")
    p.add_argument("--color", action="store_true",
                   help="keep RGB (denoise, inpaint, deblur, sr); gray by default")
    _add_task_options(p.add_argument_group("task options (defaults and their sources: recon/tasks/)"))
    s = p.add_argument_group("solver")
    s.add_argument("--solver", required=True, metavar="NAME")
    s.add_argument("--steps", type=int, default=None, help="optimiser updates (default: the solver's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="solver parameter (YAML value), repeatable, e.g. --set lr=1e-3 --set network=tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    s.add_argument("--ssim-every", type=int, default=10, metavar="K", help="SSIM every K steps (0: final only)")
    p.add_argument("--out", default="recon-out", metavar="DIR", help="output folder (default: recon-out)")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def parse_sets(items: list[str]) -> dict[str, Any]:
    """['lr=1e-3', 'network=tiny'] -> {'lr': 0.001, 'network': 'tiny'} (values through yaml.safe_load)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise UsageError(f"--set {key}: value {text!r} is not valid YAML ({err})") from None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads '1e-3' as a string; people mean the number
        out[key] = value
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _add_task_options(group) -> None:
    """Each task's options (recon.tasks: one home per task), once per name."""
    for name, (opt, tasks) in cli_options().items():
        flag = "--" + name.replace("_", "-")
        if opt.type is None:
            group.add_argument(flag, dest=name, action="store_true", default=None, help=opt.help)
        else:
            group.add_argument(flag, dest=name, type=opt.type, choices=opt.choices or None, help=opt.help)


def task_params(args: argparse.Namespace) -> dict[str, Any]:
    """The task options the user gave, checked against the task."""
    out: dict[str, Any] = {}
    for dest, (_, tasks) in cli_options().items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.task not in tasks:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} does not apply to --task {args.task} (it is for {', '.join(tasks)})")
        out[dest] = value
    return out


def _check_args(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.size is not None and args.size < 8:
        raise UsageError(f"--size must be >= 8 pixels, got {args.size}")
    if args.size is not None:
        from pipeline.io import ScanError, check_memory

        try:  # before anything allocates the image
            check_memory(args.size, 3 if args.color else 1)
        except ScanError as err:
            raise UsageError(f"--size {args.size}: {err}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; expected a folder for the outputs "
                         "(created when missing)")
    if args.ssim_every < 0:
        raise UsageError(f"--ssim-every must be >= 0, got {args.ssim_every}")
    if args.color and args.task in ("mri", "ct"):
        raise UsageError(f"--color does not apply to --task {args.task} (gray images only)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")


def _solver_params(name: str, sets: dict[str, Any]) -> tuple[type, Any]:
    from recon.solvers import get_solver, solver_names
    from recon.solvers.base import make_params

    if name not in solver_names():
        raise UsageError(f"unknown solver {name!r}; expected one of {', '.join(solver_names())}")
    cls = get_solver(name)
    try:
        params = make_params(cls.Params, sets, where=f"--set for solver {name!r}")
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:  # the values, as the solver checks them, before the scan is loaded
        params.validate(name)
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    return cls, params


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from pipeline.io import ScanError
    from recon.rng import solver_seed
    from recon.solvers import default_device, run_solver
    from recon.tasks import degraded_image

    _check_args(args)
    tparams = task_params(args)
    sets = parse_sets(args.sets)
    cls, params = _solver_params(args.solver, sets)
    try:
        spec, scan, problem = scan_and_problem(args, tparams)
    except ScanError as err:
        raise UsageError(str(err)) from None
    except (ValueError, TypeError) as err:  # task options the task rejects
        raise UsageError(f"--task {args.task}: {err}") from None
    device = args.device or str(default_device())
    steps = cls.default_steps if args.steps is None else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _ProgressBar(f"{args.solver} {args.task}") as bar:
        try:
            result = run_solver(args.solver, problem, steps=steps, params=sets, seed=solver_seed(spec.id, args.seed),
                                device=device, ssim_every=args.ssim_every, progress=bar.update)
        except (ValueError, FileNotFoundError) as err:
            if bar.task is not None:  # failed mid-run: not a usage problem, keep the traceback
                raise
            # rejected while setting up: network preset, input kind, warm-start weights file
            raise UsageError(f"solver {args.solver!r}: {err}") from None
    # the task parameters in force (the task fills in its defaults) and what the user gave
    resolved = problem.meta.get("params", tparams)
    info = {"task": args.task, "task_params": resolved, "task_options": tparams, "solver": args.solver,
            "params": dataclasses.asdict(params), "seed": args.seed, "device": device,
            "source": args.image, "size": args.size, "data_range": problem.data_range,
            "measurement_scale": problem.measurement_scale, "scan": scan.meta,
            "problem": {k: v for k, v in problem.meta.items() if k != "params"}}
    write_outputs(out, problem, result, _to_display(degraded_image(problem)), info)
    s = result.summary()
    print(f"{args.solver} on {args.image} ({args.task}): peak PSNR {_fmt(s['peak_psnr'])} dB at step "
          f"{s['peak_step']}, final PSNR {_fmt(s['final_psnr'])} dB, SSIM {_fmt(s['final_ssim'], 3)}, "
          f"{s['steps']} steps in {s['runtime_s']:.1f} s -> {out}")
    return 0


def scan_and_problem(args: argparse.Namespace, tparams: dict[str, Any]):
    """The scan as a cohort row would give it (id = the source), and its problem through the one
    path the worker uses (pipeline.scans.build_problem): same scan and seed, same measurements.
    A fastMRI file for --task mri is measured k-space; everything else is simulated."""
    from dataclasses import replace

    from pipeline.jobs import ScanSpec
    from pipeline.scans import build_problem, load

    spec = ScanSpec(id=args.image, source=args.image, task=args.task, task_params=tparams, size=args.size,
                    color=args.color)
    scan = load(spec)
    if args.task == "mri" and scan.kspace is not None:
        spec = replace(spec, kind="measured")
    return spec, scan, build_problem(spec, args.seed, scan)


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


class _ProgressBar:
    """A rich progress bar on stderr fed by the loop's progress callback (step, total, values)."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True))
        self.label = label
        self.task = None

    def __enter__(self) -> "_ProgressBar":
        self.progress.start()
        return self

    def update(self, step: int, total: int, values: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=total, info="")
        info = f"loss {values.get('loss', math.nan):.4g}"
        if "psnr" in values:
            info += f"  PSNR {values['psnr']:.2f} dB"
        self.progress.update(self.task, completed=step, info=info)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def display_array(problem, x) -> np.ndarray:
    """Network-format (1, C, H, W) tensor -> display numpy (H, W) or (H, W, 3), float32."""
    return _to_display(problem.display(x.detach().float().cpu()))


def _to_display(shown) -> np.ndarray:
    """Display-format (1, Cd, H, W) tensor -> (H, W) or (H, W, Cd) numpy float32."""
    a = shown.detach().float().cpu()[0].numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


def save_png(path: Path, image: np.ndarray, data_range: float) -> None:
    from PIL import Image

    scaled = np.clip(np.nan_to_num(image / data_range), 0.0, 1.0)
    Image.fromarray(np.round(scaled * 255).astype(np.uint8)).save(path)


def write_outputs(out: Path, problem, result, degraded: np.ndarray, info: dict) -> None:
    dr = float(problem.data_range)
    recon = display_array(problem, result.image)
    np.save(out / "recon.npy", recon.astype(np.float32))
    if problem.is_complex:
        x = result.image[0].float().cpu().numpy()
        np.save(out / "recon_complex.npy", (x[0] + 1j * x[1]).astype(np.complex64))
    save_png(out / "recon.png", recon, dr)
    save_png(out / "degraded.png", degraded, dr)
    if problem.ground_truth is not None:
        save_png(out / "reference.png", display_array(problem, problem.ground_truth), dr)
    write_metrics(out / "metrics.csv", result.history)
    summary = {**result.summary(), **info}
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, sort_keys=False) + "\n")
    plot_psnr(out / "psnr.png", result)


def metric_columns(history: dict[str, np.ndarray]) -> list[str]:
    """loss, psnr, ssim first (psnr/ssim even when empty), then the loss terms, movvar last."""
    first = ["loss", "psnr", "ssim"]
    terms = [k for k in history if k not in first and k != "movvar"]
    return first + terms + (["movvar"] if "movvar" in history else [])


def write_metrics(path: Path, history: dict[str, np.ndarray]) -> None:
    columns = metric_columns(history)
    n = len(history["loss"])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *columns])
        for k in range(n):
            row = [k]
            for name in columns:
                col = history.get(name)
                v = math.nan if col is None else float(col[k])
                row.append("" if not math.isfinite(v) else repr(v))
            w.writerow(row)


def plot_psnr(path: Path, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    have_psnr = "psnr" in h and np.isfinite(h["psnr"]).any()
    y = h["psnr"] if have_psnr else h["loss"]
    steps = np.arange(len(y))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, y, lw=1.2, label="PSNR" if have_psnr else "loss")
    if have_psnr and result.peak_step >= 0:
        ax.plot([result.peak_step], [result.peak_psnr], "o", color="tab:red",
                label=f"oracle peak {result.peak_psnr:.2f} dB @ {result.peak_step}")
    if result.es_step >= 0:
        ax.axvline(result.es_step, color="tab:green", ls="--", lw=1, label=f"ES step {result.es_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("PSNR (dB)" if have_psnr else "loss")
    if not have_psnr:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
