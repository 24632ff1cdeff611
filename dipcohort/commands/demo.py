"""`dipcohort demo [--out DIR]`: run the embedded demo cohort end to end (run, aggregate, report).

The cohort is manifests/demo.yaml of this repository. Results go to DIR/demo.zarr, the report
(table, curves, montage) to DIR/report. Running it again resumes: finished jobs are skipped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError

DEMO = Path("manifests") / "demo.yaml"


def register(subparsers) -> None:
    from dipcohort.commands.run import add_pack_argument

    p = subparsers.add_parser("demo", help="run the demo cohort end to end and print its summary table",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-results", help="output directory (default: demo-results)")
    p.add_argument("--workers", type=int, default=1, help="jobs at once (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: CUDA when available)")
    add_pack_argument(p)
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)  # another cohort, same steps (tests)
    p.set_defaults(func=main)


def demo_manifest() -> Path:
    """manifests/demo.yaml of the checkout this package runs from (editable install), else of the cwd."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo / DEMO, Path.cwd() / DEMO]
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(f"the demo manifest {DEMO} was not found (looked in {', '.join(str(c) for c in candidates)}); "
                     f"run from a clone of the dipcohort repository (installed with `pip install -e .`)")


def main(args: argparse.Namespace) -> int:
    from dipcohort.commands.run import check_out, make_backend, pack_option
    from pipeline.driver import run_cohort
    from pipeline.report import report

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    manifest = Path(args.manifest) if args.manifest else demo_manifest()
    if not manifest.is_file():
        raise UsageError(f"--manifest {manifest}: no such file")
    out = check_out(args.out)
    store = check_out(out / "demo.zarr", "--out")
    out.mkdir(parents=True, exist_ok=True)
    backend = make_backend("local", {"workers": args.workers, "device": args.device})
    counts = run_cohort(manifest, store, backend, pack=pack_option(args))
    paths = report(store, out / "report")
    print(f"results: {store}   report: {paths['table_md'].parent} (table.md, table.csv, "
          f"{', '.join(p.name for p in paths['curves'])}, {paths['montage'].name}, {paths['page'].name})")
    print(f"open them in Python:  import pipeline; ds = pipeline.open_results({str(store)!r})")
    return 1 if counts.get("failed") else 0
