"""Markdown table of a tuning store: per solver and params, peak PSNR (its step) / final PSNR per scan.

    python manifests/tuning/table.py /tmp/tuning.zarr          (the weight tables in docs/tuning.md)
    python manifests/tuning/table.py /tmp/tuning-es.zarr --es  (early stopping: the PSNR of the
        iterate ES-WMV selected (its step) and its gap to the oracle peak, instead of the final)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.query import open_results  # noqa: E402


def main(store: str, es: bool = False) -> None:
    ds = open_results(store, use_compact="never")
    rows: dict[tuple[str, str], dict[str, tuple[float, int, float, int]]] = {}
    for j in range(ds.sizes["job"]):
        key = (str(ds.solver[j].values), str(ds.params[j].values))
        chosen = ("es_psnr", "es_step") if es else ("final_psnr", "steps")
        scores = (float(ds.peak_psnr[j]), int(ds.peak_step[j]), float(ds[chosen[0]][j]), int(ds[chosen[1]][j]))
        rows.setdefault(key, {})[str(ds.scan_id[j].values)] = scores
    scans = sorted({s for r in rows.values() for s in r})
    what = "ES (step), gap" if es else "final"
    print("| solver | params | " + " | ".join(f"{s} peak (step) / {what}" for s in scans)
          + (" | mean gap | max gap |" if es else " | mean final |"))
    print("|---|---|" + "---|" * (len(scans) + (2 if es else 1)))
    for (solver, params), r in rows.items():
        cells = [_cell(r[s], es) if s in r else "-" for s in scans]
        if es:
            gaps = [v[0] - v[2] for v in r.values()]
            tail = f" | {sum(gaps) / len(gaps):.2f} | {max(gaps):.2f} |"
        else:
            tail = f" | {sum(v[2] for v in r.values()) / len(r):.2f} |"
        print(f"| {solver} | `{params}` | " + " | ".join(cells) + tail)


def _cell(v: tuple[float, int, float, int], es: bool) -> str:
    if es:
        return f"{v[0]:.2f} ({v[1]}) / {v[2]:.2f} ({v[3]}), {v[0] - v[2]:.2f}"
    return f"{v[0]:.2f} ({v[1]}) / {v[2]:.2f}"


if __name__ == "__main__":
    main(sys.argv[1], es="--es" in sys.argv[2:])
