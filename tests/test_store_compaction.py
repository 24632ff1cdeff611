"""Compaction (`pipeline.compaction`): after a run the per-job data arrays are shards of
LEDGER_BLOCK jobs (under 6 files per job in the store), expanded again before a run writes
them; a kill at any step loses nothing and the next run repairs it; verify names a damaged shard."""
import io
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import sched_common as sc
from pipeline import compaction as cp
from pipeline import store as st
from pipeline.driver import run_cohort
from pipeline.manifest import load_manifest
from pipeline.verify import repair, verify_store
from schedulers.local import LocalBackend

SEEDS = tuple(range(12))          # 2 scans x 12 seeds = 24 jobs: the store's ~100 fixed files spread thin


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(manifest, reference store run without the driver: one chunk per job, compacted store)."""
    base = tmp_path_factory.mktemp("compaction")
    manifest = sc.write_manifest(base / "m.yaml", steps=20, seeds=SEEDS)
    reference = sc.reference_store(manifest, base)
    out = base / "run.zarr"
    assert set(_run(manifest, out)) == {"done"}
    return manifest, reference, out


def _run(manifest, out, **kwargs) -> dict:
    return run_cohort(manifest, out, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO(), **kwargs)


def _copy(src, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(src, dst)
    return dst


def _store_files(path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _sharded(path) -> dict[str, bool]:
    """Each data array: sharded? From its own zarr.json and from the consolidated copy (must agree)."""
    own = zarr.open_group(str(path), mode="r", use_consolidated=False)
    consolidated = zarr.open_consolidated(str(path), mode="r")
    out = {}
    for name in cp.data_arrays(own):
        assert (own[name].shards is None) == (consolidated[name].shards is None), name
        out[name] = own[name].shards is not None
    return out


def _assert_whole(path, reference) -> None:
    """Opens, reads like the reference, and plain xarray reads the data groups."""
    st.open_store(path)
    sc.assert_same_results(path, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # no consolidated metadata mid-swap: xarray says so
        ds = xr.open_zarr(str(path), group=st.METRICS)
        assert np.isfinite(ds[st.VALUES].values[:, 0, 0]).all()


def test_a_run_leaves_under_six_files_per_job_with_the_same_results(cohort):
    manifest, reference, out = cohort
    n = len(SEEDS) * len(sc.SCANS)
    before, after = _store_files(reference), _store_files(out)
    assert before / n > 7 and after / n < 6, (before, after)          # 7 data chunks a job before; ~1 shard per array after
    assert all(_sharded(out).values())
    assert not (out / cp.STAGING).exists()
    sc.assert_same_results(out, reference)
    ds = xr.open_zarr(str(out), group=f"{st.IMAGES}/c1_32x32")
    np.testing.assert_array_equal(ds["final"].values, zarr.open_group(str(reference))["images/c1_32x32/final"][:])
    tree = xr.open_datatree(str(out), engine="zarr")
    assert tree[st.SUMMARY].ds[st.VALUES].shape == (n, len(st.SUMMARY_FIELDS))
    assert verify_store(out).damaged == [] and verify_store(out).checked == n


def test_the_estimate_counts_the_files_before_and_after_compaction(cohort):
    manifest, reference, out = cohort
    placed, groups = st.assign_image_groups(load_manifest(manifest).jobs,
                                            {s: st.ImageShape(1, 1, 32, 32) for s in sc.SCANS})
    est = st.estimate(placed, groups, len(zarr.open_group(str(out)).attrs["metric_names"]))
    assert est["files_per_job"] == 7
    assert _store_files(out) <= est["files"] < est["files_uncompacted"]
    assert _store_files(reference) <= est["files_uncompacted"]


def test_retry_and_resume_after_compaction_expand_rerun_and_compact_again(cohort, tmp_path):
    manifest, reference, out = cohort
    out = _copy(out, tmp_path)
    st.mark(out, [0, 5], "failed", "made to fail")
    st.mark(out, [7], "pending")
    counts = _run(manifest, out)                             # resume: the pending job only
    assert counts["failed"] == 2 and sc.attempts(out)[str(st.job_coords(st.open_store(out))["job"][7])] == 2
    counts = _run(manifest, out, retry_failed=True)
    assert set(counts) == {"done"}
    assert all(_sharded(out).values())
    sc.assert_same_results(out, reference)
    assert verify_store(out).damaged == []


def test_expansion_happens_before_the_workers_and_only_where_they_write(cohort, tmp_path):
    manifest, reference, out = cohort
    out = _copy(out, tmp_path)
    jobs = st.match_jobs(st.open_store(out), load_manifest(manifest).jobs, out)
    with pytest.raises(st.StoreError, match="compacted"):          # a worker never writes a shard
        st.JobWriter(out, jobs[0]).summary({})
    assert cp.expand_for(out, []) == []
    expanded = cp.expand_for(out, jobs[:1])
    assert sorted(expanded) == sorted(cp.data_arrays(st.open_store(out)))    # one image group: every array
    assert not any(_sharded(out).values())
    sc.assert_same_results(out, reference)
    st.JobWriter(out, jobs[0]).summary({})                          # now it may


def _steps(out, name):
    """Stop points of one compaction, each as a function that leaves the store there."""
    return {
        "built, not swapped": lambda: cp.build(out, name, cp.COMPACT),
        "consolidated dropped": lambda: (cp.build(out, name, cp.COMPACT), cp.drop_consolidated(out)),
        "swapped, old not removed": lambda: (cp.build(out, name, cp.COMPACT), cp.drop_consolidated(out),
                                             _exchange_only(out, name)),
        "two renames, killed between": lambda: (cp.build(out, name, cp.COMPACT), cp.drop_consolidated(out),
                                                os.rename(out / name, cp.staged(out, name, cp.COMPACT).with_name(
                                                    cp.staged(out, name, cp.COMPACT).name + cp.OLD))),
    }


def _exchange_only(out, name):
    assert cp._exchange(cp.staged(out, name, cp.COMPACT), out / name)


@pytest.mark.parametrize("stop", ["built, not swapped", "consolidated dropped", "swapped, old not removed",
                                  "two renames, killed between"])
def test_a_compaction_stopped_at_any_step_loses_nothing_and_the_next_run_repairs_it(cohort, tmp_path, stop):
    manifest, reference, out = cohort
    out = _copy(reference, tmp_path)                 # per-job chunks, ledger unsettled: as a run leaves it
    name = f"{st.METRICS}/{st.VALUES}"
    (out / cp.STAGING).mkdir()
    _steps(out, name)[stop]()
    if stop == "two renames, killed between":        # the fallback's one instant without the array
        with pytest.raises(st.StoreError, match="interrupted compaction.*run `dipcohort run`"):
            st.open_store(out)
    else:
        _assert_whole(out, reference)
    assert set(_run(manifest, out)) == {"done"}          # repairs, runs nothing, compacts
    assert not (out / cp.STAGING).exists() and all(_sharded(out).values())
    _assert_whole(out, reference)


def test_a_driver_killed_by_sigkill_mid_compaction_loses_nothing(cohort, tmp_path):
    manifest, reference, out = cohort
    out = _copy(reference, tmp_path)
    code = ("import os, signal, sys; from pipeline import compaction as cp\n"
            "swap = cp.swap\n"
            "def swap_then_die(path, name, direction):\n"
            "    swap(path, name, direction)\n"
            "    if 'images' in name: os.kill(os.getpid(), signal.SIGKILL)\n"
            "cp.swap = swap_then_die\n"
            f"cp.compact_store({str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / cp.STAGING).exists()
    layouts = _own_layouts(out)
    assert any(layouts.values()) and not all(layouts.values())    # killed halfway through the swaps
    _assert_whole(out, reference)
    assert verify_store(out).damaged == []
    assert set(_run(manifest, out)) == {"done"}
    assert all(_sharded(out).values())
    _assert_whole(out, reference)


def _own_layouts(out) -> dict[str, bool]:
    own = zarr.open_group(str(out), mode="r", use_consolidated=False)
    return {name: own[name].shards is not None for name in cp.data_arrays(own)}


def _damage(store, name: str, row: int) -> zarr.Array:
    """Garbage in the file holding `row` of array `name` (its chunk, or its shard); the array."""
    root = st.open_store(store)
    arr = root[name]
    st.chunk_file(root, arr, row).write_bytes(b"\x00garbage\xff" * 8)
    return arr


def test_verify_names_a_damaged_shard_and_its_jobs_and_readers_say_so(cohort, tmp_path, capsys):
    from dipcohort.cli import main
    from pipeline.query import open_images, open_results

    manifest, reference, out = cohort
    out = _copy(out, tmp_path)
    arr = _damage(out, f"{st.IMAGES}/c1_32x32/final", 0)
    root = st.open_store(out)
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"shard {st.chunk_name(arr, 0)}" in printed and "the 24 jobs it holds" in printed
    damaged = verify_store(out).damaged
    assert len(damaged) == len(SEEDS) * len(sc.SCANS)                # the shard holds every job of this cohort
    why = damaged[0].problems[0]
    assert f"shard {st.chunk_name(arr, 0)}" in why and "rows 0-23" in why and "cannot be decoded" in why, why
    with pytest.raises(st.StoreError, match="cannot be decoded"):
        open_images(out)["c1_32x32"]["final"].values
    open_results(out)                                               # metrics and summary are intact
    with pytest.raises(st.StoreError, match="verify .* --repair"):  # expanding would drop the other jobs' rows
        cp.expand_for(out, st.match_jobs(root, load_manifest(manifest).jobs[:1], out))
    repair(out, damaged)                                            # every job of the shard: pending
    assert set(_run(manifest, out)) == {"done"}
    sc.assert_same_results(out, reference)
    assert verify_store(out).damaged == []


def test_a_damaged_chunk_keeps_its_array_uncompacted(cohort, tmp_path):
    manifest, reference, out = cohort
    out = _copy(reference, tmp_path)
    _damage(out, f"{st.SUMMARY}/{st.VALUES}", 3)
    stream = io.StringIO()
    done = cp.compact_store(out, stream)
    assert f"{st.SUMMARY}/{st.VALUES}" not in done and "not compacted" in stream.getvalue()
    assert _sharded(out)[f"{st.METRICS}/{st.VALUES}"] and not _sharded(out)[f"{st.SUMMARY}/{st.VALUES}"]
    assert [d.row for d in verify_store(out).damaged] == [3]


def test_no_space_to_expand_stops_the_run_before_any_job_and_loses_nothing(cohort, tmp_path, monkeypatch):
    import errno

    from pipeline.errors import UsageError

    manifest, reference, out = cohort
    out = _copy(out, tmp_path)
    st.mark(out, [1], "pending")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cp, "build", full)
    with pytest.raises(UsageError, match="could not expand.*no job ran"):
        _run(manifest, out)
    monkeypatch.undo()
    assert all(_sharded(out).values()) and not (out / cp.STAGING).exists()
    _assert_whole(out, reference)
    assert set(_run(manifest, out)) == {"done"}
    sc.assert_same_results(out, reference)


def test_the_expansion_writes_job_chunks_as_zarr_would(cohort, tmp_path):
    manifest, reference, out = cohort
    src = zarr.open_array(str(out / st.IMAGES / "c1_32x32" / "final"), mode="r")
    values = src[:]
    values[3] = np.nan                                        # a row of fill values: no file, as zarr writes it
    arrays = {}
    for how in ("fast", "zarr"):
        arr = zarr.create_array(str(tmp_path / how), shape=src.shape, chunks=(1, *src.shape[1:]), dtype=src.dtype,
                                fill_value=src.fill_value)
        write = cp._job_chunk_writer(arr) if how == "fast" else arr.__setitem__
        write(slice(0, src.shape[0]), values)
        arrays[how] = sorted(p.relative_to(tmp_path / how).as_posix() for p in (tmp_path / how).rglob("c/*/*/*/*"))
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / how), mode="r")[:], values)
    assert arrays["fast"] == arrays["zarr"] and len(arrays["fast"]) == src.shape[0] - 1
