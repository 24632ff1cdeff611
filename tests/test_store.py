"""The Zarr results store: layout, NaN fill, one chunk per job, concurrent writers."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import store as st
from pipeline.jobs import STATUS_CODES, Job, ScanSpec, job_id_for
from recon.solvers.loop import LOOP_METRICS

STEPS = 40


def make_jobs(n: int, solvers=("dip", "aseqdip")) -> list[Job]:
    jobs = []
    for i in range(n):
        scan = ScanSpec(id=f"scan{i // 2}", source="skimage:camera", task="mri" if i % 4 == 3 else "denoise",
                        task_params={"sigma": 25})
        solver = solvers[i % len(solvers)]
        jobs.append(Job(job_id=job_id_for(scan, solver, {}, i, STEPS, 10), index=i, scan=scan, solver=solver,
                        params={}, config=solver, seed=i, steps=STEPS - (i % 3)))
    return jobs


def shapes_for(jobs: list[Job]) -> dict[str, st.ImageShape]:
    # MRI scans: 2 network channels (real, imag) shown as 1 magnitude channel
    return {j.scan.id: st.ImageShape(2, 1, 16, 16) if j.scan.task == "mri" else st.ImageShape(1, 1, 12, 12)
            for j in jobs}


def build(tmp_path: Path, n: int = 8) -> tuple[Path, list[Job], dict]:
    jobs = make_jobs(n)
    placed, groups = st.assign_image_groups(jobs, shapes_for(jobs))
    path = tmp_path / "res.zarr"
    st.create_store(path, placed, groups, cohort="t", manifest_text="cohort: t\n", manifest_path=tmp_path / "m.yaml",
                    metric_names=st.metric_names_for(["dip", "aseqdip"]))
    return path, placed, groups


def test_layout_names_shapes_chunks_and_attrs(tmp_path):
    path, jobs, groups = build(tmp_path)
    root = zarr.open_group(str(path), mode="r")
    n = len(jobs)
    assert root.attrs["cohort"] == "t"
    assert root.attrs["manifest"] == "cohort: t\n"
    assert st.root_attr(root, "status_codes") == STATUS_CODES
    assert "numpy" in st.root_attr(root, "packages") and "zarr" in st.root_attr(root, "packages")
    assert root.attrs["layout_version"] == 3 and root.attrs["manifest_path"] == "../m.yaml"
    assert "git_commit" in root.attrs and root.attrs["created"].endswith("+00:00")
    names = root.attrs["metric_names"]
    assert names[:len(st.BASE_METRICS)] == list(LOOP_METRICS) and "data" in names and "autoencoding" in names
    assert root.attrs["summary_fields"] == list(st.SUMMARY_FIELDS)
    assert sorted(root.attrs["image_groups"]) == ["c1_12x12", "c2_16x16"]
    assert root.attrs["max_steps"] == STEPS

    g = root["jobs"]
    for name in (st.JOB, *st.COORDS, *st.INT_COORDS, *st.LEDGER):
        assert g[name].shape == (n,), name
    for name in st.LEDGER:
        assert g[name].chunks == (min(n, st.LEDGER_BLOCK),), f"ledger column {name}: chunks of LEDGER_BLOCK jobs"
    assert g[st.ENTRY].shape == (n,) and g[st.ENTRY].chunks == (1,), "the live entries: one chunk per job"
    assert list(g["job"][:]) == [j.job_id for j in jobs]
    assert list(g["seed"][:]) == [j.seed for j in jobs]
    assert (g["status"][:] == STATUS_CODES["pending"]).all()
    # relative to the store: a store moved with its work directory still finds its logs
    assert all(p == f"../res.zarr.work/logs/{j.job_id}.log" for p, j in zip(g["log_path"][:], jobs))

    m = root["metrics/values"]
    assert m.shape == (n, len(names), STEPS) and m.chunks == (1, len(names), STEPS)
    assert m.metadata.dimension_names == ("job", "metric", "step")
    assert np.isnan(m[:]).all(), "fill value must be NaN"
    s = root["summary/values"]
    assert s.shape == (n, len(st.SUMMARY_FIELDS)) and s.chunks == (1, len(st.SUMMARY_FIELDS))
    assert np.isnan(s[:]).all()

    mri = root["images/c2_16x16"]
    k = sum(j.image_group == "c2_16x16" for j in jobs)
    assert mri["final"].shape == (k, 2, 16, 16) and mri["final"].chunks == (1, 2, 16, 16)
    assert mri["early_stopped"].shape == (k, 2, 16, 16)
    assert mri["reference"].shape == (k, 1, 16, 16) and mri["degraded"].chunks == (1, 1, 16, 16)
    assert np.isnan(mri["final"][:]).all()
    # each image row points back at its job row, and the job row at its image row
    rows = mri["job_index"][:]
    assert [g["image_group"][r] for r in rows] == ["c2_16x16"] * k
    assert list(g["image_index"][rows]) == list(range(k))


def _expected(index: int, metric_shape, summary_len, image_shape, display_shape):
    rng = np.random.default_rng(index)
    hist = rng.standard_normal(metric_shape).astype(np.float32)
    return (hist, rng.standard_normal(summary_len), rng.random(image_shape).astype(np.float32),
            rng.random(display_shape).astype(np.float32))


def _write_jobs(path: str, jobs: list[Job]) -> None:
    """A worker process: writes its jobs' data, then the ledger (status last)."""
    root = st.open_store(path)
    names = list(root["metrics/values"].attrs["metric_names"])
    for job in jobs:
        grp = root["images"][job.image_group]
        hist, summ, img, disp = _expected(job.index, (len(names), job.steps), len(st.SUMMARY_FIELDS),
                                          grp["final"].shape[1:], grp["reference"].shape[1:])
        w = st.JobWriter(path, job)
        w.start("cpu")
        w.metrics({name: hist[k] for k, name in enumerate(names)})
        w.summary(dict(zip(st.SUMMARY_FIELDS, summ)))
        w.images(final=img, early_stopped=None, reference=disp, degraded=1 - disp)
        w.finish("done", 0.5)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_concurrent_writers_never_corrupt_each_other(tmp_path):
    path, jobs, groups = build(tmp_path, n=16)
    meta_before = {p: p.read_bytes() for p in path.rglob("zarr.json")}
    n_proc = 4
    # interleaved: neighbouring chunks are written by different processes at the same time
    parts = [jobs[k::n_proc] for k in range(n_proc)]
    with ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_write_jobs, [str(path)] * n_proc, parts))

    ledger, damage = st.read_ledger(st.open_store(path))      # the workers' entries
    assert (ledger["status"] == STATUS_CODES["done"]).all() and (ledger["attempts"] == 1).all() and not damage
    assert st.settle(path) == 16 and not list((path / "jobs" / st.ENTRY).rglob("c/*"))
    root = zarr.open_group(str(path), mode="r")                # folded into the columns, as plain zarr reads them
    names = list(root.attrs["metric_names"])
    assert (root["jobs/status"][:] == STATUS_CODES["done"]).all()
    assert (root["jobs/attempts"][:] == 1).all()
    for job in jobs:
        grp = root["images"][job.image_group]
        hist, summ, img, disp = _expected(job.index, (len(names), job.steps), len(st.SUMMARY_FIELDS),
                                          grp["final"].shape[1:], grp["reference"].shape[1:])
        metrics = root["metrics/values"][job.index]
        # the job's steps, then NaN up to the cohort's longest budget
        assert np.isnan(metrics[:, job.steps:]).all()
        got = (metrics[:, :job.steps], root["summary/values"][job.index], grp["final"][job.image_index],
               grp["reference"][job.image_index], grp["degraded"][job.image_index])
        assert _digest(*got) == _digest(hist, summ, img, disp, 1 - disp), f"job {job.index} corrupted"
        assert np.isnan(grp["early_stopped"][job.image_index]).all()
    # workers wrote chunks only: no group or array metadata was created or changed
    assert {p: p.read_bytes() for p in path.rglob("zarr.json")} == meta_before


def test_each_job_owns_its_chunk_files(tmp_path):
    path, jobs, _ = build(tmp_path, n=4)
    before = {p for p in path.rglob("*") if p.is_file()}
    _write_jobs(str(path), [jobs[2]])
    new = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - \
        {p.relative_to(path).as_posix() for p in before}
    group, row = jobs[2].image_group, jobs[2].image_index
    # the whole ledger entry is one file; early_stopped and ema stay NaN, the fill value: no chunk
    expected = {"jobs/entry/c/2", "metrics/values/c/2/0/0", "summary/values/c/2/0",
                f"images/{group}/final/c/{row}/0/0/0", f"images/{group}/reference/c/{row}/0/0/0",
                f"images/{group}/degraded/c/{row}/0/0/0"}
    assert new == expected


def test_resume_helpers_and_ledger(tmp_path):
    path, jobs, _ = build(tmp_path, n=6)
    st.JobWriter(path, jobs[0]).finish("done", 1.0)
    st.JobWriter(path, jobs[1]).finish("failed", 1.0, error="ValueError: boom\ntraceback")
    st.JobWriter(path, jobs[2]).finish("diverged", 1.0)
    w = st.JobWriter(path, jobs[3])
    w.start("cpu")  # interrupted: left 'running'
    root = st.open_store(path)
    assert st.done_job_ids(root) == [jobs[0].job_id]
    assert st.failed_job_ids(root) == [jobs[1].job_id]
    todo = st.jobs_to_run(root, jobs)
    assert [j.index for j in todo] == [3, 4, 5]
    assert [j.index for j in st.jobs_to_run(root, jobs, retry_failed=True)] == [1, 3, 4, 5]
    table = st.ledger_table(path)
    assert list(table["status"][:4]) == ["done", "failed", "diverged", "running"]
    assert table["error"][1].startswith("ValueError: boom")
    # the manifest's jobs map to the store's rows whatever their order
    shuffled = [jobs[k] for k in (5, 0, 3)]
    from dataclasses import replace
    matched = st.match_jobs(root, [replace(j, index=99) for j in shuffled], path)
    assert [j.index for j in matched] == [5, 0, 3]
    stranger = replace(jobs[0], job_id="0" * 16)
    with pytest.raises(st.StoreError, match="new --out"):
        st.match_jobs(root, [stranger], path)


def test_image_shape_mismatch_is_an_error(tmp_path):
    path, jobs, _ = build(tmp_path, n=2)
    w = st.JobWriter(path, jobs[0])
    with pytest.raises(ValueError, match="expects"):
        w.images(final=np.zeros((1, 13, 12), np.float32))


def test_open_store_rejects_other_directories(tmp_path):
    with pytest.raises(st.StoreError, match="not a dipcohort results store"):
        st.open_store(tmp_path)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(st.StoreError, match="no 'jobs' group"):
        st.open_store(tmp_path / "plain.zarr")
    with pytest.raises(st.StoreError, match="no results store there"):
        st.open_store(tmp_path / "absent.zarr")
    path, _, _ = build(tmp_path, n=2)
    (path / "zarr.json").write_bytes(b"{ not json")
    with pytest.raises(st.StoreError, match="zarr.json cannot be read.*metadata is damaged"):
        st.open_store(path)


def test_a_layout_1_store_is_refused_in_one_line(tmp_path):
    path, _, _ = build(tmp_path, n=2)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs["layout_version"] = 1
    st.consolidate(path)
    with pytest.raises(st.StoreError, match="store layout 1 .* new --out") as err:
        st.open_store(path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# atomic creation
# ---------------------------------------------------------------------------------------------
def _create(path: Path, n: int = 8, stream=None) -> None:
    jobs = make_jobs(n)
    placed, groups = st.assign_image_groups(jobs, shapes_for(jobs))
    st.create_store(path, placed, groups, cohort="t", manifest_text="cohort: t\n", manifest_path=path.parent / "m.yaml",
                    metric_names=st.metric_names_for(["dip", "aseqdip"]), stream=stream)


def _create_in_child(path: str, n: int, started) -> None:
    started.set()
    _create(Path(path), n)


def test_a_killed_creation_leaves_nothing_under_the_name_and_the_next_one_cleans_up(tmp_path):
    import io
    import random
    import time

    ctx = mp.get_context("spawn")
    outcomes = set()
    # kill moments inside a creation of 1,000 jobs as long as one measured here, and one past its end
    t0 = time.perf_counter()
    _create(tmp_path / "timed.zarr", 1000)
    took = time.perf_counter() - t0
    rng = random.Random(0)
    for k, delay in enumerate(sorted(rng.uniform(0.05, 0.8) * took for _ in range(3)) + [30.0]):
        path = tmp_path / f"kill{k}.zarr"
        started = ctx.Event()
        child = ctx.Process(target=_create_in_child, args=(str(path), 1000, started))
        child.start()
        assert started.wait(120)
        child.join(delay)
        child.kill()                                           # SIGKILL at some moment of creation
        child.join()
        if (path / "zarr.json").is_file():                     # it had finished: whole, opens
            outcomes.add("complete")
            assert st.open_store(path)["jobs/status"].shape == (1000,)
            continue
        outcomes.add("interrupted")
        assert not path.exists() and st.creating_siblings(path)
        with pytest.raises(st.StoreError, match="never completed.*run .* again") as err:
            st.open_store(path)
        assert "\n" not in str(err.value)
        notes = io.StringIO()
        _create(path, stream=notes)                            # the rerun removes the leftover
        assert "removed" in notes.getvalue() and not st.creating_siblings(path)
        assert st.open_store(path)["jobs/status"].shape == (8,)
    assert outcomes == {"interrupted", "complete"}


def test_a_live_creator_is_named_and_a_store_that_appeared_meanwhile_is_kept(tmp_path):
    import os
    import socket

    path = tmp_path / "res.zarr"
    busy = tmp_path / f"res.zarr{st.CREATING}{socket.gethostname()}-{os.getpid()}"
    busy.mkdir()
    with pytest.raises(st.StoreError, match=f"pid {os.getpid()}.* is creating this store"):
        _create(path)
    busy.rmdir()
    _create(path)
    before = (path / "zarr.json").read_bytes()
    with pytest.raises(st.StoreError, match="appeared while this run was creating it"):
        _create(path)                                          # e.g. a second driver started together
    assert (path / "zarr.json").read_bytes() == before and not st.creating_siblings(path)


@pytest.mark.parametrize("when", ["checked before writing", "found while writing"])
def test_a_full_disk_during_creation_leaves_no_store_and_says_so(tmp_path, monkeypatch, when):
    import subprocess

    if when == "found while writing":                           # the space check passes, the writes fail
        monkeypatch.setattr(st, "_check_space", lambda *args: None)
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'}): needs root")
    try:
        path = mnt / "res.zarr"
        with pytest.raises(st.StoreError, match="no space left on the device.*nothing was left under that name"):
            _create(path, n=3000)
        assert not path.exists() and not st.creating_siblings(path)
        assert list(mnt.iterdir()) == []
        with pytest.raises(st.StoreError, match="no results store there"):
            st.open_store(path)
    finally:  # lazily if zarr's writer threads still hold a file there
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_store_older_than_a_ledger_field_gains_it_and_still_reads(tmp_path):
    """Ledger fields added later (e.g. `node`) must not break stores made before them."""
    import json
    import shutil

    path, jobs, _ = build(tmp_path, n=4)
    writer = st.JobWriter(path, jobs[0])
    writer.start("cpu", threads=1)
    writer.finish("done", 1.0)
    st.settle(path)                         # as a run leaves it: the ledger in its columns
    shutil.rmtree(path / st.JOBS / "node")  # as a store made before the field existed
    meta = json.loads((path / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"].pop(f"{st.JOBS}/node")
    (path / "zarr.json").write_text(json.dumps(meta))
    # a read-only file system (root ignores chmod, so the write is made to fail): read, field empty
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    real, st._new_ledger_array = st._new_ledger_array, read_only
    try:
        ledger, damage = st.read_ledger(st.open_store(path))
        assert list(ledger["node"]) == [""] * 4 and not damage and not (path / st.JOBS / "node").exists()
    finally:
        st._new_ledger_array = real
    root = st.open_store(path)  # writable: the field is added, empty, and consolidated
    assert "node" in root[st.JOBS] and (path / st.JOBS / "node").is_dir()
    ledger, damage = st.read_ledger(root)
    assert list(ledger["node"]) == [""] * 4 and ledger["threads"][0] == 1 and not damage
    st.JobWriter(path, jobs[1]).start("cpu", threads=1, node="n7")
    assert st.read_ledger(st.open_store(path))[0]["node"][1] == "n7"


def test_read_rows_reads_job_chunks_as_zarr_does(tmp_path):
    """The direct chunk reader (one file per job, zstd) gives zarr's values, fill values where a
    job wrote nothing, and names an undecodable chunk instead of failing the block."""
    import store_factory as sf

    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={1: "failed", 2: "pending"})
    root = st.open_store(fab.path)
    arrays = [root[st.JOBS][st.ENTRY], root[st.METRICS][st.VALUES], root[st.SUMMARY][st.VALUES]]
    n = arrays[0].shape[0]
    for arr in arrays:
        assert st._job_chunk_codecs(arr) is not None, arr.path       # the fast path is the one tested
        got, bad = st.read_rows(arr, 0, n)
        want = arr[:]
        assert bad == {}
        if want.dtype.kind in "TUO":
            assert list(st.as_text(got)) == list(st.as_text(want)), arr.path
        else:
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), arr.path
    st.chunk_file(root, arrays[-2], 3).write_bytes(b"\x00garbage\xff" * 8)
    got, bad = st.read_rows(arrays[-2], 0, n)
    assert list(bad) == [3] and "metrics/values/c/3/0/0 cannot be decoded" in bad[3]
    assert np.isnan(got[3]).all() and np.array_equal(got[4], fab.metrics[4], equal_nan=True)
