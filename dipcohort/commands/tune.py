"""`dipcohort tune MANIFEST --param NAME=LOW:HIGH[:log] --trials N --out DIR`: Optuna search on tuning scans."""
from __future__ import annotations

import argparse

from pipeline.tune import DEFAULT_RUNGS, OBJECTIVES


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="choose a solver's hyper-parameters on tuning scans (Optuna TPE)",
                              description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="the study's manifest; tuning scans come from its `tuning_scans`")
    p.add_argument("--out", required=True, help="directory for the round manifests and stores, the Optuna "
                                                "journal and best.yaml (rerun to continue)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=LOW:HIGH[:log]",
                   help="a searched parameter (repeatable): NAME=LOW:HIGH, NAME=LOW:HIGH:log, NAME=LOW:HIGH:int "
                        "or NAME=A,B,C")
    p.add_argument("--trials", type=int, default=20, help="trials to complete or prune (default 20)")
    p.add_argument("--objective", default="final_psnr", choices=OBJECTIVES,
                   help="summary field maximised, averaged over the tuning scans and seeds")
    p.add_argument("--solver", default=None, help="the manifest's solver entry to tune (needed when it has several)")
    p.add_argument("--tune-scans", nargs="+", default=None, metavar="ID",
                   help="tune on these scans (default: all of the manifest's tuning_scans)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="allow tuning on scans the study also evaluates (biases its results)")
    p.add_argument("--batch", type=int, default=1, help="trials run at once, one round each (default 1)")
    p.add_argument("--rungs", default=",".join(map(str, DEFAULT_RUNGS)), metavar="F1,F2,...",
                   help="pruning rungs as fractions of the step budget, ending with 1 (default 0.25,1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    p.add_argument("--backend", default="local", help="where trials run: local, ray or slurm (default local)")
    p.add_argument("--workers", type=int, default=1, help="jobs at once on the backend (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: CUDA when available)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dipcohort.commands.run import make_backend
    from pipeline.errors import UsageError
    from pipeline.tune import parse_param, tune

    try:
        rungs = [float(r) for r in args.rungs.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--rungs {args.rungs!r}: expected fractions such as 0.25,1") from None
    space = [parse_param(text) for text in args.param]
    backend = make_backend(args.backend, {"workers": args.workers, "device": args.device})
    best = tune(args.manifest, args.out, backend, space=space, trials=args.trials, objective=args.objective,
                solver=args.solver, scan_ids=args.tune_scans, allow_overlap=args.allow_overlap, batch=args.batch,
                rungs=rungs, seed=args.seed)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    print(f"best of {best['completed']} trials ({best['pruned']} pruned): {shown} "
          f"({args.objective} {best['value']:.2f}); manifest snippet {best['path']}")
    return 0
