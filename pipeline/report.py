"""Reports of an aggregated store: the Table-2-style table, PSNR/SSIM curves, a montage.

`report(STORE, DIR)` prints the table on the terminal (rich) and writes into DIR:
    table.csv, table.md         one row per task × solver configuration: peak / early-stopped /
                                final PSNR and SSIM (mean ± std over the counted jobs), peak and
                                ES steps, overfitting onset, runtimes (as in the papers' Table 2),
                                the std over seeds and over scans (pipeline.compare); table.md
                                also holds the paired differences
    paired.csv                  one row per pair of solver configurations × metric: mean difference
                                b − a over the same scans and seeds, 95 % t-interval, pairs, and
                                whether the interval excludes 0 (pipeline.compare)
    curves_<task>.png           PSNR and SSIM against step per solver configuration: mean line,
                                10-90 % quantile band, onset of overfitting marked
    montage.png                 per chosen scan: ground truth, degraded, each solver's final
                                reconstruction, PSNR under each
    index.html                  all of it as one self-contained page (pipeline.report_page)
The aggregate is (re)computed first when it is missing or older than the ledger.
"""
from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import compare
from pipeline.aggregate import aggregate, aggregate_state, live_fingerprint
from pipeline.store import open_store

COUNTED = ("done", "diverged")
# (header, variable prefix, digits): mean ± std columns of the table
MEAN_STD = (("Peak PSNR", "peak_psnr", 2), ("Peak step", "peak_step", 0), ("Peak SSIM", "peak_ssim", 3),
            ("ES PSNR", "es_psnr", 2), ("ES SSIM", "es_ssim", 3), ("ES step", "es_step", 0),
            ("Final PSNR", "final_psnr", 2), ("Final SSIM", "final_ssim", 3),
            ("Runtime (s)", "runtime_s", 2), ("Steps/s", "steps_per_s", 1))
# (header, field, digits): std over seeds / std over scans columns (pipeline.compare)
SPREAD = (("Final PSNR σ seeds/scans", "final_psnr", 2), ("Final SSIM σ seeds/scans", "final_ssim", 3))
TERMINAL = ("Task", "Solver", "Jobs", "Peak PSNR", "ES PSNR", "Final PSNR", "Final PSNR σ seeds/scans",
            "Peak SSIM", "ES SSIM", "Final SSIM", "Onset step", "Runtime (s)")
# (header, field, digits): metrics of the paired-difference table, where they have pairs
PAIRED_METRICS = (("Final PSNR", "final_psnr", 2), ("Final SSIM", "final_ssim", 3), ("Peak PSNR", "peak_psnr", 2),
                  ("ES PSNR", "es_psnr", 2), ("EMA PSNR", "ema_psnr", 2))
PAIRED_COLUMNS = ("Task", "Comparison", "Metric", "Pairs", "Mean difference", "95 % interval", "Note")
PAIRED_TITLE = ("paired differences b − a over the same scans and seeds (done jobs): mean and 95 % t-interval; "
                "not significant: the interval contains 0")


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def fmt(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def table_rows(agg) -> list[dict]:
    """One dict per group: display strings ('Peak PSNR': '28.58 ± 0.43') and raw numbers (csv)."""
    rows = []
    for g in range(agg.sizes["group"]):
        a = agg.isel(group=g)
        counted, total = int(a.n_done) + int(a.n_diverged), int(a.n_jobs)
        jobs = f"{counted}/{total}" + (f" ({int(a.n_failed)} failed)" if int(a.n_failed) else "")
        onset = float(a.onset_step)
        row = {"Task": str(a.task.values), "Solver": str(a.label.values), "Jobs": jobs,
               "Onset step": "never" if not math.isfinite(onset) else f"{onset:.0f}",
               "raw": {"task": str(a.task.values), "solver": str(a.solver.values), "label": str(a.label.values),
                       "config": str(a.config.values), "params": str(a.params.values), "n_jobs": total,
                       "n_counted": counted, "n_failed": int(a.n_failed), "n_diverged": int(a.n_diverged),
                       "onset_step": onset, "curve_peak_psnr": float(a.curve_peak_psnr),
                       "curve_peak_step": float(a.curve_peak_step)}}
        for header, name, digits in MEAN_STD:
            mean = float(a[f"{name}_mean"]) if f"{name}_mean" in a else math.nan
            std = float(a[f"{name}_std"]) if f"{name}_std" in a else math.nan
            row[header] = fmt(mean, std, digits)
            row["raw"][f"{name}_mean"], row["raw"][f"{name}_std"] = mean, std
        add_spread(row, a)
        rows.append(row)
    return rows


def add_spread(row: dict, a) -> None:
    """The seed / scan std columns of one group: display cells and every field's raw numbers."""
    value = lambda name: float(a[name]) if name in a else math.nan  # noqa: E731 - older aggregates lack them
    for name in ("n_scans", "n_seeds"):
        row["raw"][name] = int(a[name]) if name in a else 0
    for field in compare.FIELDS:
        for kind in ("seed", "scan"):
            if f"{field}_{kind}_std" in a:
                row["raw"][f"{field}_{kind}_std"] = value(f"{field}_{kind}_std")
    for header, field, digits in SPREAD:
        cells = [value(f"{field}_{kind}_std") for kind in ("seed", "scan")]
        row[header] = " / ".join(f"{c:.{digits}f}" if math.isfinite(c) else "–" for c in cells)


def paired_rows(paired, metrics=PAIRED_METRICS) -> list[dict]:
    """One dict per pair × metric with at least one pair: display strings and raw numbers (csv)."""
    rows = []
    for p in range(paired.sizes["pair"]):
        pair = paired.isel(pair=p)
        for header, name, digits in metrics:
            if name not in paired.metric.values or int(pair.n_pairs.sel(metric=name)) == 0:
                continue
            r = pair.sel(metric=name)
            n, low, high = int(r.n_pairs), float(r.ci_low), float(r.ci_high)
            raw = {"task": str(r.task.values), "a": str(r.a.values), "b": str(r.b.values),
                   "config_a": str(r.config_a.values), "config_b": str(r.config_b.values), "metric": name,
                   "n_pairs": n, **{k: float(r[k]) for k in ("mean_diff", "ci_low", "ci_high", "std_diff", "mean_a",
                                                             "mean_b")},
                   "significant": bool(r.significant)}
            interval = f"[{low:+.{digits}f}, {high:+.{digits}f}]" if math.isfinite(low) else "–"
            note = ("" if raw["significant"] else "not significant" if math.isfinite(low)
                    else f"no interval ({n} pair)")
            rows.append({"Task": raw["task"], "Comparison": f"{raw['b']} − {raw['a']}", "Metric": header,
                         "Pairs": str(n), "Mean difference": f"{raw['mean_diff']:+.{digits}f}",
                         "95 % interval": interval, "Note": note, "raw": raw})
    return rows


def wide_console():
    """A rich console; 200 columns when writing to a file or pipe (rich would assume 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_table(rows: Sequence[dict], console=None, title: str = "", columns: Sequence[str] = TERMINAL,
                text_columns: Sequence[str] = ("Task", "Solver", "Comparison", "Metric", "Note")) -> None:
    from rich import box
    from rich.table import Table

    console = console or wide_console()
    table = Table(title=title or None, header_style="bold", box=box.SIMPLE_HEAD)
    for name in columns:
        text = name in text_columns
        table.add_column(name, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)


def markdown_columns() -> list[str]:
    return ["Task", "Solver", "Jobs", *(h for h, _, _ in MEAN_STD), *(h for h, _, _ in SPREAD), "Onset step"]


def write_tables(rows: Sequence[dict], out_dir: Path, pairs: Sequence[dict] = ()) -> tuple[Path, Path]:
    """table.csv (numbers: mean and std in separate columns), paired.csv, and table.md (mean ± std,
    then the paired differences under their own heading)."""
    csv_path, md_path = out_dir / "table.csv", out_dir / "table.md"
    write_csv(csv_path, [r["raw"] for r in rows])
    write_csv(out_dir / "paired.csv", [r["raw"] for r in pairs])
    lines = markdown_table(rows, markdown_columns(), ("Task", "Solver"))
    lines += ["", "## Paired differences", ""]
    if pairs:
        lines += [PAIRED_TITLE[0].upper() + PAIRED_TITLE[1:] + ".", ""]
        lines += markdown_table(pairs, PAIRED_COLUMNS, ("Task", "Comparison", "Metric", "Note"))
    else:
        lines.append("None: no task has two solver configurations with done jobs on the same scans and seeds.")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_csv(path: Path, raw: Sequence[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(raw[0]) if raw else ["task"])
        writer.writeheader()
        writer.writerows(raw)


def markdown_table(rows: Sequence[dict], cols: Sequence[str], text_columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in text_columns else "---:"
                                                           for c in cols) + "|"]
    return lines + ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]


# ---------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed (CI, clusters)
    import matplotlib.pyplot as plt

    return plt


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def plot_curves(agg, out_dir: Path) -> list[Path]:
    """One PNG per task: PSNR and SSIM against step, mean ± 10-90 % band per solver config."""
    plt = _pyplot()
    paths = []
    tasks = list(dict.fromkeys(str(t) for t in agg.task.values))
    for task in tasks:
        sel = agg.isel(group=np.flatnonzero(agg.task.values == task))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.9, wspace=0.15)  # fixed: layout engines are slow
        for g in range(sel.sizes["group"]):
            a = sel.isel(group=g)
            label = f"{a.label.values} (n={int(a.n_done) + int(a.n_diverged)})"
            for ax, metric in zip(axes, ("psnr", "ssim")):
                steps = a.step.values
                mean = a[f"{metric}_mean"].values
                ok = np.isfinite(mean)          # SSIM exists every k steps only
                if not ok.any():
                    continue
                line, = ax.plot(steps[ok], mean[ok], label=label, lw=1.5)
                ax.fill_between(steps[ok], a[f"{metric}_q10"].values[ok], a[f"{metric}_q90"].values[ok],
                                color=line.get_color(), alpha=0.2, lw=0)
                onset = float(a.onset_step)
                if metric == "psnr" and math.isfinite(onset):
                    ax.axvline(onset, color=line.get_color(), ls=":", lw=1)
        for ax, name in zip(axes, ("PSNR (dB)", "SSIM")):
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: mean with 10–90 % band over jobs (dotted: overfitting onset, mean 1 dB below peak)")
        path = out_dir / f"curves_{safe_name(task)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# montage
# ---------------------------------------------------------------------------------------------
def default_scans(ds, per_task: int = 2) -> list[str]:
    """The first `per_task` scans of each task (in manifest order)."""
    out: list[str] = []
    for task in dict.fromkeys(ds.task.values):
        scans = list(dict.fromkeys(ds.scan_id.values[ds.task.values == task]))
        out += [str(s) for s in scans[:per_task]]
    return out


def montage_jobs(ds, scan: str) -> list[tuple[str, str, int]]:
    """(label, job id, row) of the first counted job (lowest seed) of each solver config for a scan."""
    from pipeline.aggregate import config_labels

    rows = np.flatnonzero(ds.scan_id.values == scan)
    counted = [r for r in rows if ds.status.values[r] in COUNTED]
    configs = list(dict.fromkeys(ds.config.values[rows]))
    solver = {c: str(ds.solver.values[rows][ds.config.values[rows] == c][0]) for c in configs}
    params = {c: str(ds.params.values[rows][ds.config.values[rows] == c][0]) if "params" in ds else "{}"
              for c in configs}
    labels = dict(zip(configs, config_labels([solver[c] for c in configs], [params[c] for c in configs], configs)))
    out = []
    for c in configs:
        mine = sorted((int(ds.seed.values[r]), r) for r in counted if ds.config.values[r] == c)
        if mine:
            r = mine[0][1]
            out.append((labels[c], str(ds.job.values[r]), int(r)))
    return out


def _show(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W) gray or (H, W, 3) RGB for imshow from a display-format (C, H, W) image."""
    if image.shape[0] == 3:
        return np.clip(np.moveaxis(image, 0, -1), 0, 1), None
    return image[0], "gray"


def _psnr(image: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((image.astype(np.float64) - ref) ** 2))
    return 10 * math.log10(data_range ** 2 / mse) if mse > 0 and data_range > 0 else math.nan


def plot_montage(store: str | Path, ds, out_dir: Path, scans: Sequence[str] | None = None) -> Path:
    """Ground truth | degraded | each solver's final reconstruction, one row per scan."""
    from pipeline.query import display_image, open_images

    plt = _pyplot()
    scans = list(scans) if scans else default_scans(ds)
    images = open_images(store)
    rows = [(scan, montage_jobs(ds, scan)) for scan in scans]
    n_cols = 2 + max((len(jobs) for _, jobs in rows), default=0)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.4 * len(rows)), squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.94, wspace=0.08, hspace=0.35)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, (scan, jobs) in enumerate(rows):
        axes[i, 0].set_ylabel(scan, fontsize=9)
        if not jobs:
            axes[i, 1].set_title("no finished job for this scan", fontsize=8)
            continue
        first = ds.isel(job=jobs[0][2])
        group = images[str(first.image_group.values)]
        ref = group.reference.sel(job=jobs[0][1]).values
        degraded = group.degraded.sel(job=jobs[0][1]).values
        finals = [(label, display_image(group.final.sel(job=job_id)).values, ds.final_psnr.values[r], r)
                  for label, job_id, r in jobs]
        data_range = _data_range(finals, ref)
        panels = [("ground truth", ref, None), ("degraded", degraded, _psnr(degraded, ref, data_range))]
        panels += [(label, image, psnr if math.isfinite(psnr) else ds.peak_psnr.values[r])
                   for label, image, psnr, r in finals]
        for j, (title, image, psnr) in enumerate(panels):
            shown, cmap = _show(image)
            axes[i, j].imshow(shown, cmap=cmap, vmin=0, vmax=_vmax(ref, image), interpolation="nearest")
            axes[i, j].set_title(title, fontsize=8)
            if psnr is not None:  # under the image
                axes[i, j].set_xlabel(f"PSNR {psnr:.2f} dB" if math.isfinite(psnr) else "PSNR –", fontsize=8)
    path = out_dir / "montage.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _vmax(ref: np.ndarray, image: np.ndarray) -> float:
    """Grey-level scale shared by a row: the reference's maximum (the image's when there is none)."""
    for a in (ref, image):
        finite = a[np.isfinite(a)]
        if finite.size and finite.max() > 0:
            return float(finite.max())
    return 1.0


def _data_range(finals: list, ref: np.ndarray) -> float:
    """The data range the solver's PSNR used (not stored): solved from a reconstruction's stored
    PSNR and its error, PSNR = 20 log10(range) - 10 log10(MSE); the reference's max otherwise."""
    for _, image, psnr, _ in finals:
        mse = float(np.mean((image.astype(np.float64) - ref) ** 2))
        if math.isfinite(psnr) and math.isfinite(mse) and mse > 0:
            return 10 ** (psnr / 20) * math.sqrt(mse)
    return _vmax(ref, ref)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def ensure_aggregate(store: str | Path, say=print):
    """The store's aggregate, recomputed when missing or older than the ledger."""
    from pipeline.query import open_aggregate

    root = open_store(store)
    state = aggregate_state(root)
    if state is None or state.get("ledger_fingerprint") != live_fingerprint(root):
        say(f"aggregating {store} ({'no aggregate yet' if state is None else 'jobs ran since the last one'})")
        aggregate(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # freshness was just checked
        return open_aggregate(store, check_fresh=False)


def report(store: str | Path, out_dir: str | Path, scans: Sequence[str] | None = None, console=None,
           page_jobs: int | None = None) -> dict:
    """Print the table and write table.csv, table.md, curves_<task>.png, montage.png and index.html
    into out_dir (`page_jobs`: most jobs the page's image viewer holds)."""
    from pipeline.query import open_results
    from pipeline.report_page import MAX_JOBS, table_section, write_page

    console = console or wide_console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = ensure_aggregate(store, say=console.print)
    ds = open_results(store)
    if scans:
        known = set(ds.scan_id.values)
        unknown = [s for s in scans if s not in known]
        if unknown:
            raise KeyError(f"--scans: no scan {', '.join(map(repr, unknown))} in {store}; "
                           f"known scans include {', '.join(sorted(known)[:8])}")
    rows = table_rows(agg)
    print_table(rows, console, title=f"cohort {agg.attrs.get('cohort', '')}: mean ± std over done and diverged jobs; "
                                     "σ seeds/scans: std over seeds within a scan / over scans")
    paired = compare.open_paired(store)
    pairs = paired_rows(paired if paired is not None else compare.paired_comparison(ds))
    if pairs:
        print_table(pairs, console, title=PAIRED_TITLE, columns=PAIRED_COLUMNS)
    csv_path, md_path = write_tables(rows, out_dir, pairs)
    curves = plot_curves(agg, out_dir)
    montage = plot_montage(store, ds, out_dir, scans)
    extra = [("Paired comparisons", table_section(pairs, PAIRED_COLUMNS, table_id="paired"))] if pairs else []
    page = write_page(store, out_dir, ds, rows, markdown_columns(), curves, extra_sections=extra,
                      max_jobs=MAX_JOBS if page_jobs is None else page_jobs)
    return {"table_csv": csv_path, "table_md": md_path, "paired_csv": out_dir / "paired.csv", "curves": curves,
            "montage": montage, "page": page}
