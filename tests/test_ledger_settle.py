"""The ledger's two tiers: one live entry file per job while it runs, folded into the columns
(chunks of LEDGER_BLOCK jobs) by the driver when the run ends (`pipeline.store.settle`)."""
import json
import shutil

import numpy as np
import pytest
import zarr

import store_factory as sf
from pipeline import store as st
from pipeline.jobs import STATUS_CODES


def _entry_files(path) -> list[str]:
    return sorted(p.name for p in (path / st.JOBS / st.ENTRY).rglob("c/*"))


def _table(path):
    return st.ledger_table(path).drop(columns=["damaged"])


def test_settle_folds_the_entries_into_the_columns_and_removes_them(tmp_path):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={1: "failed", 2: "diverged", 3: "pending"}, settled=False)
    n = len(fab.jobs)
    assert len(_entry_files(fab.path)) == n - 1               # every job that wrote anything: one entry file
    before = _table(fab.path)
    assert st.settle(fab.path) == n - 1
    assert _entry_files(fab.path) == []
    assert _table(fab.path).equals(before)
    g = zarr.open_group(str(fab.path), mode="r")[st.JOBS]      # plain zarr (and xarray) read the columns
    assert list(g["status"][:]) == list(fab.status)
    assert list(g["checksum"][:]) == list(before["checksum"])
    ledger_files = [p for p in (fab.path / st.JOBS).rglob("c/*") if p.parent.parent.name in st.LEDGER]
    assert len(ledger_files) <= len(st.LEDGER)                # one chunk per column for these few jobs
    assert st.settle(fab.path) == 0                            # nothing left to fold


def test_settle_keeps_running_jobs_and_entries_rewritten_meanwhile(tmp_path, monkeypatch):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={0: "running"}, settled=False)
    fold = st._fold_block

    def a_worker_writes_meanwhile(g, a, b, entries):
        done = fold(g, a, b, entries)
        writer = st.JobWriter(fab.path, fab.jobs[1])          # a late writer rewrites job 1's entry
        writer.finish("failed", 2.0, "late")
        return done

    monkeypatch.setattr(st, "_fold_block", a_worker_writes_meanwhile)
    st.settle(fab.path)
    monkeypatch.undo()
    names = _entry_files(fab.path)
    assert names == ["0", "1"]                                 # the running job's entry and the rewritten one stay
    table = st.ledger_table(fab.path)
    assert table["status"][0] == "running" and table["status"][1] == "failed" and table["error"][1] == "late"
    assert st.settle(fab.path) == 1 and _entry_files(fab.path) == ["0"]
    assert st.ledger_table(fab.path)["error"][1] == "late"


def test_a_driver_killed_while_settling_loses_nothing(tmp_path, monkeypatch):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", statuses={2: "failed"}, settled=False)
    before = _table(fab.path)

    def killed(g, folded):
        raise KeyboardInterrupt("killed after the columns were written")

    monkeypatch.setattr(st, "_remove_entries", killed)
    with pytest.raises(KeyboardInterrupt):
        st.settle(fab.path)
    monkeypatch.undo()
    assert _entry_files(fab.path) and _table(fab.path).equals(before)
    st.settle(fab.path)
    assert _entry_files(fab.path) == [] and _table(fab.path).equals(before)


def test_a_damaged_entry_names_its_chunk_and_a_damaged_column_keeps_its_entries(tmp_path):
    fab = sf.fabricate_store(tmp_path / "fab.zarr", settled=False)
    (fab.path / st.JOBS / st.ENTRY / "c" / "4").write_bytes(b"\x00garbage\xff" * 8)
    status = fab.path / st.JOBS / "status" / "c" / "0"
    status.parent.mkdir(exist_ok=True)
    status.write_bytes(b"\x00garbage\xff" * 8)                 # the column: every job has an entry, so no harm
    ledger, damage = st.read_ledger(st.open_store(fab.path))
    assert list(damage) == [4] and "jobs/entry/c/4 cannot be decoded" in damage[4][0]
    assert ledger["status"][4] == st.DAMAGED and (np.delete(ledger["status"], 4) == STATUS_CODES["done"]).all()
    assert st.settle(fab.path) == 0                            # the column chunk cannot be read: nothing folded
    assert len(_entry_files(fab.path)) == len(fab.jobs)


def test_a_layout_2_store_opens_runs_and_settles_in_its_own_chunking(tmp_path, monkeypatch):
    """Stores of layout 2 (one ledger chunk per job and field, no entries) are read as they are
    and gain the entry array on first open; their columns keep one chunk per job."""
    monkeypatch.setattr(st, "LEDGER_BLOCK", 1)
    monkeypatch.setattr(st, "LAYOUT_VERSION", 2)
    jobs = sf.create(tmp_path / "old.zarr", sf.make_jobs(n_scans=1, seeds=(0,)))
    monkeypatch.undo()
    path = tmp_path / "old.zarr"
    shutil.rmtree(path / st.JOBS / st.ENTRY)                   # as layout 2 had it
    meta = json.loads((path / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"].pop(f"{st.JOBS}/{st.ENTRY}")
    (path / "zarr.json").write_text(json.dumps(meta))
    old = zarr.open_group(str(path), mode="r+")[st.JOBS]       # what the old worker wrote for job 0
    old["attempts"][0], old["device"][0], old["status"][0] = 1, "cpu", STATUS_CODES["failed"]

    root = st.open_store(path)
    assert root.attrs["layout_version"] == 2 and st.ENTRY in root[st.JOBS]
    assert st.ledger_table(path)["status"][0] == "failed"
    writer = st.JobWriter(path, jobs[0])
    assert writer.start("cpu") == 2                            # the attempt counted from the old ledger
    writer.finish("done", 1.0)
    assert st.settle(path) == 1 and _entry_files(path) == []
    g = zarr.open_group(str(path), mode="r")[st.JOBS]
    assert g["status"].chunks == (1,) and g["status"][0] == STATUS_CODES["done"] and g["attempts"][0] == 2
    assert (path / st.JOBS / "status" / "c" / "0").is_file() and not (path / st.JOBS / "status" / "c" / "1").exists()
