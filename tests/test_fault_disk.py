"""A file system that fills up during the run (a small tmpfs the test mounts; needs root): the
driver stops handing out jobs and exits 2 saying what to do, no job is recorded 'failed' for it;
after space is freed one more run finishes every job, running nothing that was done again."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import sched_common as sc
from dipcohort.cli import main


def _mount(path, size_kb: int, remount: bool = False) -> str | None:
    """Mount (or resize) a tmpfs; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    opts = f"{'remount,' if remount else ''}size={size_kb}k"
    cmd = ["mount", "-o", opts, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def _used_kb(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    why = _mount(mnt, 64 * 1024)
    if why:
        pytest.skip(why)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_during_the_run_stops_cleanly_and_the_rerun_finishes(tmp_path, tmpfs, capsys):
    manifest = sc.write_manifest(tmp_path / "cohort.yaml", steps=40)   # 4 jobs
    args = lambda out: ["run", str(manifest), "--out", str(out), "--device", "cpu", "--progress", "quiet"]  # noqa: E731
    # sizes measured here, so the test follows the store's layout: a full run, and a creation alone
    base = _used_kb(tmpfs)
    assert main(args(tmpfs / "probe.zarr")) == 0
    full = _used_kb(tmpfs) - base
    shutil.rmtree(tmpfs / "probe.zarr")
    shutil.rmtree(tmpfs / "probe.zarr.work")
    sc.make_store(manifest, tmpfs / "run.zarr")
    created = _used_kb(tmpfs) - base
    shutil.rmtree(tmpfs / "run.zarr")
    capsys.readouterr()
    # room for the creation and about half of the jobs' writes
    assert _mount(tmpfs, base + created + (full - created) // 2 + 4, remount=True) is None
    out = tmpfs / "run.zarr"
    assert main(args(out)) == 2
    err = capsys.readouterr().err
    assert "could not write to the store" in err and "Free space" in err and "Traceback" not in err, err
    before = sc.statuses(out)
    assert "failed" not in before.values(), before   # a full disk is not the job's fault
    done_before = {j for j, s in before.items() if s == "done"}
    assert 0 < len(done_before) < 4
    tries = sc.attempts(out)

    assert _mount(tmpfs, 64 * 1024, remount=True) is None   # space freed
    assert main(args(out)) == 0
    assert set(sc.statuses(out).values()) == {"done"}
    after = sc.attempts(out)
    assert all(after[j] == tries[j] for j in done_before)   # nothing done ran again
