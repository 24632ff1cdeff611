"""Markdown table of a tuning store: per solver and params, peak PSNR (its step) / final PSNR per scan.

    python manifests/tuning/table.py /tmp/tuning.zarr      (the table in docs/tuning.md)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.query import open_results  # noqa: E402


def main(store: str) -> None:
    ds = open_results(store, use_compact="never")
    rows: dict[tuple[str, str], dict[str, tuple[float, int, float]]] = {}
    for j in range(ds.sizes["job"]):
        key = (str(ds.solver[j].values), str(ds.params[j].values))
        scores = (float(ds.peak_psnr[j]), int(ds.peak_step[j]), float(ds.final_psnr[j]))
        rows.setdefault(key, {})[str(ds.scan_id[j].values)] = scores
    scans = sorted({s for r in rows.values() for s in r})
    print("| solver | params | " + " | ".join(f"{s} peak (step) / final" for s in scans) + " | mean final |")
    print("|---|---|" + "---|" * (len(scans) + 1))
    for (solver, params), r in rows.items():
        cells = [f"{r[s][0]:.2f} ({r[s][1]}) / {r[s][2]:.2f}" if s in r else "-" for s in scans]
        mean = sum(v[2] for v in r.values()) / len(r)
        print(f"| {solver} | `{params}` | " + " | ".join(cells) + f" | {mean:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
