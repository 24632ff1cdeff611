"""Scale of `dipcohort aggregate`: 10,000 jobs × 4,000 steps of synthetic metrics.

    python benchmarks/aggregate_scale.py [--jobs 10000] [--steps 4000] [--dir /tmp/aggscale] [--keep]
                                         [--dask local:2 | --dask slurm] [--aggregate-only-once]

1. builds a store with the driver's own `pipeline.store.create_store` (per-job chunks, as a real
   cohort has them: one file per job and array) and fills it with synthetic DIP-like curves,
   written in blocks of 1,024 jobs (a ledger column chunk each) by 2 processes (workers would write one job at a time; the
   files on disk are the same);
2. runs the aggregation in a fresh Python process and prints its wall time and peak resident
   memory: ru_maxrss of that process and of its largest child, and the peak of the summed RSS
   of the whole process tree sampled every 250 ms from /proc (the figure for the < 2 GiB goal);
3. times `open_results` (compact copy) and a mean PSNR curve per solver from it;
4. prints the worker's per-job write overhead (`JobWriter`: start, metrics, summary, four
   64 × 64 images, ledger) next to a typical job's solver time (DIP, 64 px denoising).
Goals: aggregation under 60 s and 2 GiB on 2 cores for 10,000 jobs (issue 3); under 5 min and
2 GiB for 100,000 jobs (`--jobs 100000`, issue 9: ~13 GiB of disk, per-job store and compact copy).
`--dask local:2` / `--dask slurm` run the same aggregation on a LocalCluster / a SLURMCluster
(pipeline.dask_cluster) and print the same figures, plus the workers' own CPU time and peak RSS.
Not a test: prints figures only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pipeline.store import LEDGER_BLOCK as BLOCK  # noqa: E402 - each writer owns whole ledger column chunks
GOALS_S = {10_000: 60, 100_000: 300}   # wall-time goals on 2 cores: issue 3 (10,000 jobs), issue 9 (100,000)


def build(path: Path, n_jobs: int, n_steps: int, workers: int) -> float:
    """Create the store (driver) and write every job's synthetic results; returns seconds."""
    import store_factory as sf
    from pipeline import store as st

    t0 = time.perf_counter()
    configs = (("dip", {}, n_steps), ("aseqdip", {"lambda": 0.5}, n_steps), ("aseqdip", {"lambda": 1.0}, n_steps),
               ("es_dip", {}, n_steps))
    n_scans = n_jobs // (2 * len(configs))      # two tasks, one seed
    jobs = sf.make_jobs(tasks=("denoise", "mri"), configs=configs, n_scans=n_scans, seeds=(0,))
    sf.create(path, jobs, size=64, metric_names=sf.METRIC_NAMES + ["autoencoding"])
    print(f"  created {len(jobs)} jobs in {time.perf_counter() - t0:.1f} s; writing results...", flush=True)
    blocks = [(a, min(a + BLOCK, len(jobs))) for a in range(0, len(jobs), BLOCK)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:  # no fork under zarr's loop thread
        list(pool.map(_write_block, [str(path)] * len(blocks), blocks))
    return time.perf_counter() - t0


def _write_block(path: str, rows: tuple[int, int]) -> None:
    import json

    import store_factory as sf
    from pipeline import store as st

    a, b = rows
    rng = np.random.default_rng(a)
    root = st.open_store(path, mode="r+")
    n_steps = root["metrics/values"].shape[2]
    curves = sf.synthetic_curves(b - a, n_steps, rng)
    metrics = np.concatenate([curves, curves[:, :1] * 0.5], axis=1)          # + an 'autoencoding' term
    summary = np.stack([sf.summary_row(m, False, rng) for m in curves])
    root["metrics/values"][a:b] = metrics
    root["summary/values"][a:b] = summary
    g = root["jobs"]
    g["attempts"][a:b] = np.ones(b - a, np.int32)
    g["runtime_s"][a:b] = rng.uniform(20, 40, b - a)
    g["device"][a:b] = np.array(["cuda:0 (NVIDIA H100)"] * (b - a))
    # what the worker's JobWriter records before the status: a digest per chunk written
    g["checksum"][a:b] = np.array([json.dumps({"metrics": st.data_digest(m), "summary": st.data_digest(s)})
                                   for m, s in zip(metrics, summary)])
    g["status"][a:b] = np.full(b - a, 2, np.int8)                             # done, written last


# ---------------------------------------------------------------------------------------------
# memory of a process tree
# ---------------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    """Summed VmRSS (bytes) of pid and its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        parents[int(entry)] = int(fields.get("PPid", "0").strip())
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def run_aggregation(path: Path, workers: int, full: bool = True, dask: str | None = None) -> dict:
    """Aggregate in a fresh process; sample the tree's RSS while it runs (a LocalCluster's
    workers are in the tree; Slurm's are not: their own peak RSS is reported besides)."""
    cmd = [sys.executable, __file__, "--aggregate-only", str(path), "--workers", str(workers)]
    cmd += ["--full"] if full else []
    cmd += ["--dask", dask] if dask else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(proc.pid))
            except Exception:  # noqa: BLE001 - a process ended between listing and reading
                pass
            stop.wait(0.25)  # one /proc listing costs ~9 ms of CPU: 4 a second use ~4 % of a core

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"aggregation failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_peak_rss"] = peak
    return result


def _worker_usage() -> tuple[int, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_maxrss * 1024, me.ru_utime + me.ru_stime


def aggregate_only(path: str, workers: int, full: bool, dask: str | None) -> None:
    from pipeline.aggregate import aggregate

    t0 = time.perf_counter()
    cluster = {}
    if dask:
        from pipeline import dask_cluster

        with dask_cluster.connect(dask, path) as client:
            t_up = time.perf_counter() - t0          # cluster start (Slurm: jobs queued and started)
            t0 = time.perf_counter()
            ds = aggregate(path, client=client, full=full)
            usage = list(client.run(_worker_usage).values())
        cluster = {"workers": len(usage), "start_s": t_up, "workers_maxrss": sum(u[0] for u in usage),
                   "workers_cpu_s": sum(u[1] for u in usage)}
    else:
        ds = aggregate(path, workers=workers, full=full)
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime   # the pool is joined: children count
    print(json.dumps({"wall_s": wall, "self_maxrss": me.ru_maxrss * 1024, "child_maxrss": kids.ru_maxrss * 1024,
                      "cpu_s": cpu, "cluster": cluster,
                      "groups": ds.sizes["group"], "steps": ds.sizes["step"], "seconds": json.loads(ds.attrs["seconds"]),
                      "compaction": json.loads(ds.attrs["compaction"])}))


def rerun_some(path: Path, n: int = 10) -> None:
    """n jobs run again (attempts + 1, same data): what a --retry-failed leaves behind."""
    from pipeline import store as st
    from pipeline.jobs import Job, ScanSpec

    root = st.open_store(path)
    ids = st.job_coords(root)[st.JOB]
    rows = np.random.default_rng(1).choice(len(ids), n, replace=False)
    for i in rows:
        job = Job(job_id=str(ids[i]), index=int(i), scan=ScanSpec(id="x", source="x", task="denoise"),
                  solver="dip", params={})
        checksum = str(root["jobs/checksum"][i])            # same data: the digests still hold
        w = st.JobWriter(path, job)
        w.start("cpu")
        w.digests = json.loads(checksum)
        w.finish("done", 1.0)


# ---------------------------------------------------------------------------------------------
# queries after aggregation, and the worker's write overhead
# ---------------------------------------------------------------------------------------------
def time_queries(path: Path) -> dict:
    import pipeline

    t0 = time.perf_counter()
    ds = pipeline.open_results(path)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds.psnr.groupby("solver").mean("job").compute()
    return {"open_s": t_open, "curve_s": time.perf_counter() - t0, "read_from": ds.attrs["read_from"]}


def write_overhead(tmp: Path, n_steps: int, n_jobs: int = 20) -> float:
    """Mean seconds for one worker to write one job's results (64 px, n_steps of metrics)."""
    import store_factory as sf
    from pipeline import store as st

    jobs = sf.create(tmp, sf.make_jobs(tasks=("denoise",), configs=(("dip", {}, n_steps),), n_scans=n_jobs,
                                       seeds=(0,)), size=64)
    rng = np.random.default_rng(0)
    curves = sf.synthetic_curves(n_jobs, n_steps, rng)
    image = rng.random((1, 64, 64)).astype(np.float32)
    t0 = time.perf_counter()
    for job, c in zip(jobs, curves):
        w = st.JobWriter(tmp, job)
        w.start("cpu")
        w.metrics(dict(zip(sf.METRIC_NAMES, c)))
        w.summary(dict(zip(sf.SUMMARY_FIELDS, sf.summary_row(c, False, rng))))
        w.images(final=image, early_stopped=image, reference=image, degraded=image)
        w.finish("done", 1.0)
    return (time.perf_counter() - t0) / n_jobs


def solver_speed(steps: dict[str, int] | None = None) -> dict:
    """Steps per second of default DIP (Ulyanov et al. skip net) on 64 px denoising, this machine."""
    import torch

    from pipeline.jobs import ScanSpec
    from pipeline.scans import build_problem
    from recon.solvers import run_solver

    torch.set_num_threads(1)  # OpenMP threads spin under contention on a shared machine: 1 is steadier
    problem = build_problem(ScanSpec(id="cam", source="skimage:camera", task="denoise", task_params={"sigma": 25},
                                     size=64), seed=0)
    out = {}
    for preset, n in (steps or {"skip": 10, "skip-small": 30}).items():
        res = run_solver("dip", problem, steps=n, params={"network": preset}, seed=0, device="cpu")
        out[preset] = n / res.runtime_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=4_000)
    ap.add_argument("--dir", default="/tmp/dipcohort-aggscale")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="reuse a store built by an earlier run")
    ap.add_argument("--aggregate-only", metavar="STORE", help=argparse.SUPPRESS)
    ap.add_argument("--dask", metavar="SPEC", help="aggregate on a Dask cluster: local:2, slurm[:N] or tcp://HOST:PORT "
                    "(as `dipcohort aggregate --dask`); default: the threads/processes schedulers")
    ap.add_argument("--aggregate-only-once", action="store_true",
                    help="only the full aggregation (no incremental rerun, queries, write overhead)")
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.aggregate_only:
        return aggregate_only(args.aggregate_only, args.workers, args.full, args.dask)
    goal = GOALS_S[max(k for k in GOALS_S if k <= max(args.jobs, min(GOALS_S)))]
    root = Path(args.dir)
    path = root / f"scale-{args.jobs}x{args.steps}.zarr"
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared)")
    if args.keep and (path / "zarr.json").is_file():
        print(f"reusing {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(f"{path}.work", ignore_errors=True)
        print(f"building {path}: {args.jobs} jobs × {args.steps} steps (per-job chunks)", flush=True)
        took = build(path, args.jobs, args.steps, args.workers)
        print(f"  built in {took:.1f} s")
    per_job = [p for p in path.rglob("*") if p.is_file() and not p.relative_to(path).as_posix().startswith("aggregate")]
    print(f"  per-job store (before compaction): {len(per_job)} files, {sum(p.stat().st_size for p in per_job) / 2**20:.0f} MiB")
    where = f"on Dask cluster {args.dask}" if args.dask else f"with {args.workers} workers"
    print(f"aggregating {where} ...", flush=True)
    r = run_aggregation(path, args.workers, full=True, dask=args.dask)
    _print_run("aggregate (full)", r, goal)
    if args.aggregate_only_once:
        return
    rerun_some(path)
    r = run_aggregation(path, args.workers, full=False, dask=args.dask)
    _print_run("aggregate again after 10 jobs reran (incremental)", r, goal)
    print(f"  compact copy: {_du(path / 'aggregate') / 2**20:.0f} MiB in "
          f"{sum(1 for _ in (path / 'aggregate').rglob('*') if _.is_file())} files")
    q = time_queries(path)
    print(f"open_results ({q['read_from']}, incl. the ledger freshness check): {q['open_s']:.1f} s; "
          f"mean PSNR curve per solver over all jobs: {q['curve_s']:.1f} s")
    tmp = root / "overhead.zarr"
    shutil.rmtree(tmp, ignore_errors=True)
    per_job = write_overhead(tmp, args.steps)
    shutil.rmtree(tmp, ignore_errors=True)
    speed = solver_speed()
    print(f"worker write overhead: {per_job * 1000:.0f} ms per job ({args.steps} steps of metrics, four 64 px images)")
    for preset, sps in speed.items():
        print(f"  vs. DIP ({preset} net) 64 px denoising on this CPU: {sps:.1f} steps/s → 300 steps "
              f"{300 / sps:.0f} s, {args.steps} steps {args.steps / sps:.0f} s "
              f"(write overhead {100 * per_job / (300 / sps):.2f} % of a 300-step job)")


def _print_run(what: str, r: dict, goal_s: int) -> None:
    sec = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
    print(f"{what}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s incl. imports ({sec}; "
          f"{r['compaction']['job_blocks_copied']} of "
          f"{r['compaction']['job_blocks']} job blocks copied; {r['groups']} groups × {r['steps']} steps); peak RSS: "
          f"process {r['self_maxrss'] / 2**20:.0f} MiB, largest worker {r['child_maxrss'] / 2**20:.0f} MiB, whole tree "
          f"{r['tree_peak_rss'] / 2**20:.0f} MiB (goal < {goal_s} s, < 2048 MiB); load average now {os.getloadavg()[0]:.1f}",
          flush=True)
    c = r.get("cluster") or {}
    if c:
        print(f"  Dask cluster: {c['workers']} workers, started in {c['start_s']:.1f} s (not in the wall time); "
              f"workers' CPU {c['workers_cpu_s']:.1f} s, summed peak RSS {c['workers_maxrss'] / 2**20:.0f} MiB "
              f"(Slurm workers are outside the process tree above)", flush=True)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
