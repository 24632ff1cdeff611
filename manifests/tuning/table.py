"""Markdown table of a tuning store: per solver and params, peak PSNR (its step) / final PSNR per scan.

    python manifests/tuning/table.py /tmp/tuning.zarr      (the table in docs/tuning.md)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.query import open_results  # noqa: E402

ds = open_results(sys.argv[1], use_compact="never")
rows = {}
for j in range(ds.sizes["job"]):
    key = (str(ds.solver[j].values), str(ds.params[j].values))
    rows.setdefault(key, {})[str(ds.scan_id[j].values)] = (float(ds.peak_psnr[j]), int(ds.peak_step[j]), float(ds.final_psnr[j]))
scans = sorted({s for r in rows.values() for s in r})
print("| solver | params | " + " | ".join(f"{s} peak (step) / final" for s in scans) + " | mean final |")
print("|---|---|" + "---|" * (len(scans) + 1))
for (solver, params), r in rows.items():
    cells = [f"{r[s][0]:.2f} ({r[s][1]}) / {r[s][2]:.2f}" if s in r else "-" for s in scans]
    mean = sum(r[s][2] for s in r) / len(r)
    print(f"| {solver} | `{params}` | " + " | ".join(cells) + f" | {mean:.2f} |")
