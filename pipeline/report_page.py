"""The report as one self-contained web page: `index.html` beside the report's other files.

Everything the page shows is inside the file (styles, script, images as data URIs), so it opens
from disk with no network: the Table-2-style table (click a header to sort), the PSNR / SSIM
curves (the report's PNGs), a viewer that pages through every shown job's ground truth,
degraded image and reconstruction, the failed and diverged jobs with their error and log, the
jobs still to come (a partial store gives a page too) and the provenance (manifest, versions,
commit, devices, hosts).

Size: viewer images are thumbnails at most THUMB px on a side, ground truth and degraded image
stored once per (scan, seed); at most `max_jobs` jobs are shown (the page says how many were
left out), so a 10,000-job cohort still gives a page a browser opens.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

THUMB = 128
MAX_JOBS = 400
SHOWN = ("done", "diverged")
WAITING = ("pending", "running", "interrupted")


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W) or (H, W, 3) image in [0, 1] as a base64 PNG data URI (8-bit, for display)."""
    from PIL import Image

    arr = np.nan_to_num(np.clip(image, 0.0, 1.0))
    pil = Image.fromarray((arr * 255 + 0.5).astype(np.uint8))
    if max(pil.size) > THUMB:
        pil.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def table_section(rows: Sequence[dict], columns: Sequence[str], table_id: str = "summary") -> str:
    head = "".join(f'<th data-col="{i}" title="click to sort">{_e(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            key = _sort_key(row, c)
            cells.append(f'<td data-sort="{_e(key)}">{_e(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{_e(table_id)}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _sort_key(row: dict, column: str):
    """The number behind a 'mean ± std' cell (its mean), else the text."""
    text = str(row.get(column, ""))
    first = text.split("±")[0].split("/")[0].split("(")[0].strip()
    try:
        return float(first)
    except ValueError:
        return text


def curves_section(curve_paths: Sequence[Path]) -> str:
    if not curve_paths:
        return "<p>No curves (no finished job yet).</p>"
    return "".join(f'<figure><img class="curve" alt="{_e(p.stem)}" src="{file_data_uri(p)}">'
                   f"<figcaption>{_e(p.stem.removeprefix('curves_'))}</figcaption></figure>" for p in curve_paths)


def viewer_entries(store, ds, max_jobs: int) -> tuple[list[dict], dict[str, str], int]:
    """Per shown job its labels, PSNR and image keys; the images (key -> data URI); jobs left out."""
    from pipeline.export import as_hwc
    from pipeline.query import display_image, open_images

    rows = [i for i in range(ds.sizes["job"]) if str(ds.status.values[i]) in SHOWN]
    left_out = max(0, len(rows) - max_jobs)
    rows = rows[:max_jobs]
    groups = open_images(store) if rows else {}
    images: dict[str, str] = {}
    entries = []
    for i in rows:
        job = str(ds.job.values[i])
        grp = groups[str(ds.image_group.values[i])]
        scan, seed = str(ds.scan_id.values[i]), int(ds.seed.values[i])
        shared = f"{scan}/seed{seed}"
        if f"ref:{shared}" not in images:
            images[f"ref:{shared}"] = png_data_uri(as_hwc(grp.reference.sel(job=job).values))
            images[f"deg:{shared}"] = png_data_uri(as_hwc(grp.degraded.sel(job=job).values))
        images[f"rec:{job}"] = png_data_uri(as_hwc(display_image(grp.final.sel(job=job)).values))
        psnr = float(ds.final_psnr.values[i])
        entries.append({"job": job, "scan": scan, "solver": str(ds.solver.values[i]),
                        "params": str(ds.params.values[i]), "seed": seed, "status": str(ds.status.values[i]),
                        "psnr": None if not math.isfinite(psnr) else round(psnr, 2),
                        "ref": f"ref:{shared}", "deg": f"deg:{shared}", "rec": f"rec:{job}"})
    return entries, images, left_out


def viewer_section(entries: list[dict], left_out: int) -> str:
    if not entries:
        return "<p>No finished job to show yet.</p>"
    note = (f"<p class=note>{left_out} more finished job(s) are not shown (page limit); "
            f"`dipcohort report --page-jobs N` shows more.</p>" if left_out else "")
    options = "".join(f'<option value="{k}">{_e(e["scan"])} / {_e(e["solver"])} / seed {e["seed"]}</option>'
                      for k, e in enumerate(entries))
    return f"""{note}<div id="viewer">
<button id="prev" type="button">&larr; previous</button>
<select id="jobpick">{options}</select>
<button id="next" type="button">next &rarr;</button> <span id="position"></span>
<div class="panels">
<figure><img id="img-ref" alt="ground truth"><figcaption>ground truth</figcaption></figure>
<figure><img id="img-deg" alt="degraded"><figcaption>degraded</figcaption></figure>
<figure><img id="img-rec" alt="reconstruction"><figcaption id="rec-caption">reconstruction</figcaption></figure>
</div><p id="job-meta" class="note"></p></div>"""


def problems_section(ds, out_dir: Path) -> str:
    rows = [i for i in range(ds.sizes["job"]) if str(ds.status.values[i]) in ("failed", "diverged")]
    if not rows:
        return "<p>No failed or diverged job.</p>"
    items = []
    for i in rows:
        error = str(ds.error.values[i]) if "error" in ds else ""
        first = error.strip().splitlines()[0] if error.strip() else "(no message)"
        log = _log_link(str(ds.log_path.values[i]) if "log_path" in ds else "", out_dir)
        items.append(f'<li class="problem"><b>{_e(ds.status.values[i])}</b> {_e(ds.scan_id.values[i])} / '
                     f'{_e(ds.solver.values[i])} / seed {int(ds.seed.values[i])} '
                     f'<code>{_e(ds.job.values[i])}</code>: {_e(first)} {log}'
                     + (f"<details><summary>full error</summary><pre>{_e(error)}</pre></details>" if error else "")
                     + "</li>")
    return f'<ul id="problems">{"".join(items)}</ul>'


def _log_link(path: str, out_dir: Path) -> str:
    if not path:
        return ""
    target = Path(path)
    rel = os.path.relpath(target, out_dir.resolve()) if target.is_absolute() else path
    return f'(<a href="{_e(Path(rel).as_posix())}">log</a>)'


def waiting_section(ds, limit: int = 50) -> str:
    rows = [i for i in range(ds.sizes["job"]) if str(ds.status.values[i]) in WAITING]
    if not rows:
        return "<p>Every job has ended.</p>"
    shown = "".join(f"<li>{_e(ds.status.values[i])}: {_e(ds.scan_id.values[i])} / {_e(ds.solver.values[i])} / "
                    f"seed {int(ds.seed.values[i])}</li>" for i in rows[:limit])
    more = f"<li>... and {len(rows) - limit} more</li>" if len(rows) > limit else ""
    return f'<p>{len(rows)} job(s) still to come (this page was made from a partial store).</p><ul id="waiting">{shown}{more}</ul>'


def provenance_section(ds) -> str:
    attrs = ds.attrs
    packages = attrs.get("packages", {})
    if isinstance(packages, str):
        try:
            packages = json.loads(packages)
        except json.JSONDecodeError:
            packages = {"packages": packages}
    devices = sorted({str(d) for d in ds.device.values if str(d)}) if "device" in ds else []
    hosts = sorted({str(h) for h in ds.host.values if str(h)}) if "host" in ds else []
    pkg = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(packages.items()))
    return (f"<dl><dt>cohort</dt><dd>{_e(attrs.get('cohort', ''))}</dd>"
            f"<dt>created</dt><dd>{_e(attrs.get('created', ''))}</dd>"
            f"<dt>git commit</dt><dd><code>{_e(attrs.get('git_commit') or 'unknown')}</code></dd>"
            f"<dt>devices</dt><dd>{_e(', '.join(devices) or '–')}</dd>"
            f"<dt>hosts</dt><dd>{_e(', '.join(hosts) or '–')}</dd></dl>"
            f'<table class="packages"><thead><tr><th>package</th><th>version</th></tr></thead><tbody>{pkg}</tbody></table>'
            f"<details><summary>manifest</summary><pre>{_e(attrs.get('manifest', ''))}</pre></details>")


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
th{cursor:pointer;background:#f4f4f4}td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
img.curve{max-width:100%}figure{display:inline-block;margin:.3em}.panels img{width:256px;image-rendering:pixelated}
.note{color:#666}pre{background:#f7f7f7;padding:.5em;overflow:auto;max-height:30em}li.problem{margin:.3em 0}"""

SCRIPT = """(function(){
function sortTable(table,col,asc){var tb=table.tBodies[0];var rows=Array.prototype.slice.call(tb.rows);
rows.sort(function(a,b){var x=a.cells[col].getAttribute('data-sort'),y=b.cells[col].getAttribute('data-sort');
var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
return asc?c:-c;});rows.forEach(function(r){tb.appendChild(r);});}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
var table=th.closest('table');var asc=!th.classList.contains('asc');
table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
th.classList.add(asc?'asc':'desc');sortTable(table,parseInt(th.getAttribute('data-col')),asc);});});
var data=JSON.parse(document.getElementById('viewer-data').textContent);var jobs=data.jobs,images=data.images;
if(!jobs.length)return;var k=0,pick=document.getElementById('jobpick');
function show(i){k=(i+jobs.length)%jobs.length;var j=jobs[k];pick.value=String(k);
document.getElementById('img-ref').src=images[j.ref];document.getElementById('img-deg').src=images[j.deg];
document.getElementById('img-rec').src=images[j.rec];
document.getElementById('rec-caption').textContent=j.solver+(j.psnr===null?'':' — PSNR '+j.psnr.toFixed(2)+' dB');
document.getElementById('job-meta').textContent='job '+j.job+' ('+j.status+'), params '+j.params;
document.getElementById('position').textContent=(k+1)+' / '+jobs.length;}
document.getElementById('prev').addEventListener('click',function(){show(k-1);});
document.getElementById('next').addEventListener('click',function(){show(k+1);});
pick.addEventListener('change',function(){show(parseInt(pick.value));});show(0);})();"""


def write_page(store, out_dir: Path, ds, rows: Sequence[dict], columns: Sequence[str], curve_paths: Sequence[Path],
               extra_sections: Sequence[tuple[str, str]] = (), max_jobs: int = MAX_JOBS) -> Path:
    """Write out_dir/index.html; `extra_sections` are (title, html) inserted after the table."""
    out_dir = Path(out_dir)
    entries, images, left_out = viewer_entries(store, ds, max_jobs)
    counts = {name: int(np.sum(ds.status.values == name)) for name in (*SHOWN, "failed", *WAITING)}
    summary = ", ".join(f"{n} {c}" for n, c in counts.items() if c)
    data = json.dumps({"jobs": entries, "images": images}).replace("</", "<\\/")
    sections = [("Summary", f"<p>{ds.sizes['job']} jobs: {_e(summary)}.</p>" + table_section(rows, columns)),
                *extra_sections,
                ("Curves", curves_section(curve_paths)),
                ("Images", viewer_section(entries, left_out)),
                ("Failed and diverged jobs", problems_section(ds, out_dir)),
                ("Still to come", waiting_section(ds)),
                ("Provenance", provenance_section(ds))]
    body = "".join(f'<section id="{_e(t.lower().replace(" ", "-"))}"><h2>{_e(t)}</h2>{h}</section>' for t, h in sections)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>dipcohort report: {_e(ds.attrs.get('cohort', ''))}</title><style>{STYLE}</style></head>"
            f"<body><h1>cohort {_e(ds.attrs.get('cohort', ''))}</h1>{body}"
            f'<script type="application/json" id="viewer-data">{data}</script><script>{SCRIPT}</script></body></html>')
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
