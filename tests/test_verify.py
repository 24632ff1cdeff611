"""Damaged stores: `verify` names each job whose data are missing or damaged (with the chunk),
`--repair` marks exactly those for rerun, the next run redoes exactly them with the same
numbers; `aggregate` and `status` name the job and chunk instead of a decoder traceback."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
import torch

import sched_common as sc
import store_factory as sf
from dipcohort.cli import main
from pipeline import compaction
from pipeline import store as st
from pipeline.aggregate import aggregate
from pipeline.driver import run_cohort
from pipeline.manifest import load_manifest
from schedulers.local import LocalBackend

GARBAGE = b"\x00not a zstd frame\xff" * 4


def _run(manifest, out) -> dict[str, int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cohort(manifest, out, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO())
    finally:
        torch.set_num_threads(threads)


def _chunk(store, arr_path: str, row: int):
    root = st.open_store(store)
    arr = root[arr_path]
    return st.chunk_file(root, arr, row), st.chunk_name(arr, row)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    manifest = sc.write_manifest(base / "cohort.yaml", steps=20, seeds=(0, 1, 2))
    out = base / "run.zarr"
    assert _run(manifest, out) == {"done": 6}
    return manifest, out


def test_verify_repair_and_rerun_redo_exactly_the_damaged_jobs(cohort, tmp_path, capsys):
    manifest, first = cohort
    reference = tmp_path / "reference.zarr"
    shutil.copytree(first, reference)
    out = tmp_path / "run.zarr"
    shutil.copytree(first, out)
    shutil.copytree(st.work_dir(first), st.work_dir(out))
    assert main(["verify", str(out)]) == 0
    assert "6 finished jobs read back, 0 job(s)" in capsys.readouterr().out
    # the run compacted its data into shards (test_store_compaction damages those): back to one
    # chunk per job, as a run's workers write them and a stopped run leaves them
    compaction.expand_for(out, st.match_jobs(st.open_store(out), load_manifest(manifest).jobs, out))

    root = st.open_store(out)
    ids = list(st.job_coords(root)["job"])
    group, rows = root["jobs/image_group"][0], st.stored_jobs(root)
    damage = {}                                             # job row -> chunk named
    path, name = _chunk(out, "metrics/values", 0)
    path.write_bytes(GARBAGE)                               # garbage bytes
    damage[0] = name
    path, name = _chunk(out, "summary/values", 2)
    path.unlink()                                           # a deleted chunk
    damage[2] = name
    image_row = rows[ids[3]][2]
    path, name = _chunk(out, f"images/{rows[ids[3]][1]}/final", image_row)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])   # a truncated file
    damage[3] = name
    path, name = _chunk(out, "jobs/entry", 5)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(GARBAGE)                               # a damaged ledger entry (the live tier)
    damage[5] = name
    assert group

    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    for row, chunk in damage.items():
        assert f"damaged: job {ids[row]}" in printed and chunk in printed, (row, chunk)
    for row in (1, 4):
        assert ids[row] not in printed
    assert "4 job(s) with missing or damaged" in printed

    # status and aggregate name the job and chunk, no traceback
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "damaged 1" in status and ids[5] in status and damage[5] in status
    assert main(["aggregate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ids[0] in err and damage[0] in err and ids[5] in err
    assert "verify" in err and "--repair" in err

    assert main(["verify", str(out), "--repair"]) == 0
    capsys.readouterr()
    table = st.ledger_table(out)
    assert [table["status"][r] for r in damage] == ["pending"] * 4
    assert list(table["attempts"]) == [1] * 6               # attempts kept
    assert all(table["error"][r].startswith("verify: ") for r in damage)

    assert _run(manifest, out) == {"done": 6}
    tries = dict(zip(st.ledger_table(out)["job_id"], st.ledger_table(out)["attempts"]))
    assert [tries[ids[r]] for r in range(6)] == [2, 1, 2, 2, 1, 2]   # exactly the damaged ones again
    assert main(["verify", str(out)]) == 0
    assert "0 job(s)" in capsys.readouterr().out
    sc.assert_same_results(out, reference)                  # redone with the same numbers


def test_aggregate_names_a_deleted_or_garbage_metrics_chunk(tmp_path):
    fab = sf.fabricate_store(tmp_path / "fab.zarr")
    path, name = _chunk(fab.path, "metrics/values", 4)
    path.unlink()                                           # once silently left out of the curves
    with pytest.raises(st.StoreError, match=f"job {fab.jobs[4].job_id} .*{name} is missing"):
        aggregate(fab.path, scheduler="synchronous")
    path.write_bytes(GARBAGE)
    with pytest.raises(st.StoreError, match=f"job {fab.jobs[4].job_id} .*{name} cannot be decoded"):
        aggregate(fab.path, scheduler="synchronous")


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={k: "failed" for k in range(30)})

    def status_into(reader: str) -> subprocess.CompletedProcess:
        return subprocess.run(f"set -o pipefail; {sys.executable} -m dipcohort status {fab.path} --all-failed | {reader}",
                              shell=True, executable="/bin/bash", cwd=sc.REPO, env=sc.cli_env(), capture_output=True,
                              text=True, timeout=120)

    done = status_into("head -3")
    assert len(done.stdout.splitlines()) == 3
    assert done.stderr == "" and done.returncode == 0
    done = status_into("head -c 0")                         # closed before the first line is written
    assert done.stderr == "" and done.returncode == 0


def test_status_shows_stale_running_jobs(tmp_path, capsys):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={0: "running", 1: "running"})
    root = st.open_store(fab.path, mode="r+")
    entry = st.current_entry(root, 0)                                  # a running job's ledger: its entry
    st.write_entry(root, 0, {**entry, "heartbeat": entry["heartbeat"] - 3600})   # its worker went quiet an hour ago
    assert main(["status", str(fab.path)]) == 0
    out = capsys.readouterr().out
    assert "running 2 (stale 1)" in out and "no heartbeat for over 10 min" in out
    assert main(["status", str(fab.path), "--stale-after", "120"]) == 0
    assert "(stale" not in capsys.readouterr().out


def test_open_results_names_a_garbage_live_metrics_chunk(tmp_path):
    import pipeline

    fab = sf.fabricate_store(tmp_path / "fab.zarr")
    path, name = _chunk(fab.path, "metrics/values", 4)
    path.write_bytes(GARBAGE)
    ds = pipeline.open_results(fab.path)                    # lazy: opening reads no metrics chunk
    assert ds.attrs["read_from"] == "live"
    with pytest.raises(st.StoreError, match=f"job {fab.jobs[4].job_id}: chunk {name} cannot be decoded.*--repair"):
        ds.psnr.mean("job").compute()
