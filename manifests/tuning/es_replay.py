"""Sweep 4 of docs/tuning.md: ES-DIP's detectors replayed on recorded DIP runs of a tuning manifest's scans.

A detector (ES-WMV window W or ES-EMV weight alpha; Alg. 2's patience p and delta) does not change the
optimisation, so each tuning scan is trained once per network setting of the manifest (lr, input
jitter) and every detector of the grid is replayed on the recorded iterates with the loop's own
classes (recon.early_stopping), selecting what `es-dip` with those params would select:

    python manifests/tuning/es_replay.py manifests/tuning/es-dip-detectors.yaml [--top 15]

Prints, per network setting, the detectors with the smallest largest gap (oracle peak - ES PSNR)
over the tuning scans, and the variance / PSNR curve of each scan (why a detector fails).
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.scans import build_problem  # noqa: E402
from recon.early_stopping import EarlyStopper, make_variance  # noqa: E402
from recon.rng import solver_seed  # noqa: E402
from recon.solvers import get_solver  # noqa: E402
from recon.solvers.base import make_params  # noqa: E402

DETECTORS = ([("wmv", w, None) for w in (5, 10, 20)] + [("emv", None, a) for a in (0.05, 0.1, 0.2)])
DELTAS = (1.0, 0.99, 0.95, 0.8)     # 1: Wang et al.'s "VAR stops decreasing"; 0.99: the chapter's code
PATIENCES = (25, 50, 100)
CURVE_STEPS = (10, 25, 50, 75, 100, 150, 200, 250, 299)


def record(spec, config, seed: int) -> tuple[list[torch.Tensor], list[float]]:
    """The iterates x_k (as the loop's variance sees them) and their PSNR over the config's budget."""
    problem = build_problem(spec, seed)
    cls = get_solver(config.solver)
    solver = cls(problem, make_params(cls.Params, config.params), seed=solver_seed(spec.id, seed),
                 device=torch.device("cpu"))
    images, psnr = [], []
    for k in range(config.steps):
        out = solver.step(k)
        images.append(problem.display(out.image))
        psnr.append(float(problem.score(out.image, with_ssim=False)["psnr"]))
    return images, psnr


def replay(images, kind: str, window, alpha, patience: int, delta: float) -> int:
    """The step ES-DIP selects (Alg. 2 as the loop runs it, ending at the budget or the stop)."""
    variance = make_variance(kind, window or 2, alpha or 0.1)
    stopper = EarlyStopper(patience, delta)
    for k, image in enumerate(images):
        var = variance.update(image)
        if var is not None:
            stopper.update(k, float(var))
            if stopper.should_stop(k):
                break
    return stopper.best_step


def main(path: str, top: int) -> None:
    manifest = load_manifest(path)
    torch.set_num_threads(1)
    for config in manifest.configs:
        runs = {f"{spec.id} s{seed}": record(spec, config, seed)
                for spec in manifest.scans for seed in manifest.seeds}
        print(f"\n### {config.solver} {config.params} ({config.steps} steps)\n")
        rows = []
        for (kind, w, a), delta, p in itertools.product(DETECTORS, DELTAS, PATIENCES):
            picks = {sid: replay(images, kind, w, a, p, delta) for sid, (images, _) in runs.items()}
            gaps = {sid: max(ps) - ps[picks[sid]] for sid, (_, ps) in runs.items()}
            rows.append((max(gaps.values()), f"{kind} W={w} alpha={a} p={p} delta={delta}", picks, gaps))
        rows.sort(key=lambda r: r[0])
        print("| detector | " + " | ".join(f"{sid} ES (step), gap" for sid in runs) + " | max gap |")
        print("|---|" + "---|" * (len(runs) + 1))
        for worst, name, picks, gaps in rows[:top]:
            cells = [f"{runs[s][1][picks[s]]:.2f} ({picks[s]}), {gaps[s]:.2f}" for s in runs]
            print(f"| {name} | " + " | ".join(cells) + f" | {worst:.2f} |")
        print("\npeak PSNR (step): " + ", ".join(f"{s} {max(ps):.2f} ({ps.index(max(ps))})" for s, (_, ps) in runs.items()))
        for sid, (images, ps) in runs.items():
            emv = make_variance("emv", 2, 0.1)
            curve = [float(v) if (v := emv.update(x)) is not None else float("nan") for x in images]
            print(f"{sid}: step: PSNR / EMV(0.1) " + "  ".join(f"{k}: {ps[k]:.1f} / {curve[k]:.3g}"
                                                          for k in CURVE_STEPS if k < len(ps)))


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("manifest")
    args.add_argument("--top", type=int, default=15)
    ns = args.parse_args()
    main(ns.manifest, ns.top)
