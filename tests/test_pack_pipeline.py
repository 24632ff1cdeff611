"""Cohorts pack themselves (issue 10): `--pack 4` on every backend (local sequential, pool, real
Ray, real Slurm) writes each job of a pack into the store with its own ledger entry, numbers
equal to the packed local run bit for bit and to the unpacked run within float rounding; a job
whose set-up fails leaves its pack-mates done; an interrupted pack resumes per job; a manifest's
resources.pack, `--pack N` and `--pack auto` (its chosen N shown) as the dry run says.

The cohort: 3 scans x 2 seeds = 6 jobs at 32 px, so `--pack 4` gives two packs (4 and 2 jobs).
The scan `img` is a .npy file beside the manifest (deleting it breaks that scan's set-up).
"""
from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
import zarr

import sched_common as sc
from pipeline.driver import run_cohort
from pipeline.jobs import STATUS_CODES
from pipeline.store import checkpoint_path, pack_entry

STEPS = 40
SCANS = {"cam": "skimage:camera", "img": "img.npy", "moon": "skimage:moon"}  # img: pack 1 with cam


def _cohort(base, steps: int = STEPS, extra: str = ""):
    """The manifest (and its img.npy) in `base`."""
    from skimage import data

    base.mkdir(parents=True, exist_ok=True)
    np.save(base / "img.npy", data.coins()[:128, :128].astype(np.float32) / 255)
    path = sc.write_manifest(base / "cohort.yaml", steps=steps, scans=SCANS)
    if extra:
        path.write_text(path.read_text() + extra)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(manifest, unpacked reference store, packed reference store: sequential local, --pack 4)."""
    from schedulers.local import LocalBackend

    base = tmp_path_factory.mktemp("pack")
    manifest = _cohort(base)
    unpacked = sc.reference_store(manifest, base)
    packed = base / "packed.zarr"
    stream = io.StringIO()
    counts = run_cohort(manifest, packed, LocalBackend(device="cpu"), progress="quiet", stream=stream, pack=4)
    assert counts == {"done": 6}, stream.getvalue()
    assert "packing: 6 jobs in 2 pack(s)" in stream.getvalue()
    return manifest, unpacked, packed


def _close_to_unpacked(store, unpacked) -> None:
    """Packed numbers agree with the unpacked run's to float rounding (vmapped kernels round differently)."""
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(unpacked), mode="r")
    assert list(a["jobs/job"][:]) == list(b["jobs/job"][:])
    names = [str(n) for n in a["metrics/metric"][:]]
    for k, name in enumerate(names):
        if name in ("psnr", "ssim", "loss"):
            np.testing.assert_allclose(a["metrics/values"][:, k], b["metrics/values"][:, k], rtol=1e-4, atol=1e-6,
                                       err_msg=name)
    for group in a.attrs["image_groups"]:
        np.testing.assert_allclose(a["images"][group]["final"][:], b["images"][group]["final"][:], atol=1e-4)
        np.testing.assert_array_equal(a["images"][group]["degraded"][:], b["images"][group]["degraded"][:])


def _each_job_recorded(store) -> None:
    """Every job done once, with its own threads, checksum and log naming its pack; verify agrees."""
    from pipeline.verify import verify_store

    assert set(sc.statuses(store).values()) == {"done"}
    assert set(sc.attempts(store).values()) == {1}
    assert set(sc.threads(store).values()) == {1}
    assert all(str(c).startswith("{") for c in sc.ledger_field(store, "checksum").values())
    for job_id in sc.statuses(store):
        assert "(a pack of " in sc.log_text(store, job_id)
    checked = verify_store(store)
    assert checked.checked == 6 and not checked.damaged, checked


def test_pack_4_sequential_records_each_job_close_to_unpacked(cohort):
    manifest, unpacked, packed = cohort
    _each_job_recorded(packed)
    _close_to_unpacked(packed, unpacked)
    logs = {j: sc.log_text(packed, j) for j in sc.statuses(packed)}
    assert sum("(a pack of 4:" in t for t in logs.values()) == 4
    assert sum("(a pack of 2:" in t for t in logs.values()) == 2


def test_pack_4_pool_matches_sequential(cohort, tmp_path):
    from schedulers.local import LocalBackend

    manifest, unpacked, packed = cohort
    out = tmp_path / "pool.zarr"
    counts = run_cohort(manifest, out, LocalBackend(device="cpu", workers=2), progress="quiet",
                        stream=io.StringIO(), pack=4)
    assert counts == {"done": 6}
    _each_job_recorded(out)
    sc.assert_same_results(out, packed)


def test_pool_retries_a_pack_whose_worker_died(tmp_path):
    """Two workers, a pack of 2 each (long enough that both compute when one is killed): the pool
    follows a pack by its members' ledger entries, sees it unfinished, and runs its unfinished
    members again in a new process, with the numbers of an undisturbed run."""
    import threading

    from schedulers.local import LocalBackend

    manifest = sc.write_manifest(tmp_path / "kill.yaml", steps=250)  # cam, moon x 2 seeds
    reference = tmp_path / "ref.zarr"
    assert run_cohort(manifest, reference, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO(),
                      pack=2) == {"done": 4}
    out = tmp_path / "pool.zarr"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("counts", run_cohort(
        manifest, out, LocalBackend(device="cpu", workers=2), progress="quiet", stream=io.StringIO(), pack=2)))
    runner.start()
    try:
        ids = sc.wait_for(lambda: _ids_by_scan(out) if sc.ledger_if_created(out) else None, 120, "the store")
        sc.wait_for(lambda: all("start job" in sc.log_text(out, ids[s][0]) for s in ids), 300, "both packs to start")
        sc.kill_a_pool_worker(2)
    finally:
        runner.join(timeout=400)
    assert not runner.is_alive()
    assert result["counts"] == {"done": 4}
    tries = sc.attempts(out)
    again = {j for j, n in tries.items() if n == 2}
    # one pack ran again: all of it, or only the member it had not written yet when the kill came
    # while it wrote its results (a written job is never rerun)
    assert again and any(again <= set(ids[s]) for s in ids), tries
    assert all(n == 1 for j, n in tries.items() if j not in again), tries
    assert set(sc.threads(out).values()) == {1}
    sc.assert_same_results(out, reference)


@pytest.mark.ray
def test_pack_4_ray_matches_sequential(cohort, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dipcohort[ray]')")
    from schedulers.ray import RayBackend

    manifest, unpacked, packed = cohort
    out = tmp_path / "ray.zarr"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        counts = run_cohort(manifest, out, RayBackend(device="cpu"), progress="quiet", stream=io.StringIO(), pack=4)
    finally:
        ray.shutdown()
    assert counts == {"done": 6}
    _each_job_recorded(out)
    sc.assert_same_results(out, packed)


@pytest.mark.slurm
def test_pack_4_slurm_matches_sequential(cohort, tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'dipcohort[slurm]')")
    from test_sched_slurm import _slurm_up

    why = _slurm_up()
    if why:
        pytest.skip(why)
    manifest, unpacked, packed = cohort
    out = tmp_path / "slurm.zarr"
    run = sc.cli("run", str(manifest), "--out", str(out), "--backend", "slurm", "--device", "cpu", "--pack", "4",
                 "--progress", "plain", "-o", "poll_s=1")
    assert "packing: 6 jobs in 2 pack(s)" in run.stdout and "done 6" in run.stdout, run.stdout
    _each_job_recorded(out)
    sc.assert_same_results(out, packed)  # slurm checkpoints every steps/10: same numbers


def test_set_up_failure_of_one_job_leaves_its_pack_mates_done_and_retry_is_per_job(cohort, tmp_path):
    from schedulers.local import LocalBackend

    manifest_ref, unpacked, packed = cohort
    manifest = _cohort(tmp_path / "c")
    out = tmp_path / "setup.zarr"
    sc.make_store(manifest, out)
    saved = (tmp_path / "c" / "img.npy").read_bytes()
    (tmp_path / "c" / "img.npy").unlink()  # the store has its rows; building its problem now fails
    stream = io.StringIO()
    counts = run_cohort(manifest, out, LocalBackend(device="cpu"), progress="quiet", stream=stream, pack=4)
    assert counts == {"done": 4, "failed": 2}, stream.getvalue()
    ids = _ids_by_scan(out)
    status = sc.statuses(out)
    assert {status[j] for j in ids["img"]} == {"failed"}
    assert {status[j] for j in ids["cam"] + ids["moon"]} == {"done"}
    errors = sc.ledger_field(out, "error")
    assert all("img.npy" in errors[j] for j in ids["img"])
    # the cam jobs ran in a pack of 2 (its img mates failed): numbers close to their unpacked ones
    assert all("(a pack of 4:" in sc.log_text(out, j) for j in ids["cam"])
    _close_rows(out, unpacked, ids["cam"] + ids["moon"])
    # --retry-failed with the file back: only the failed jobs run again, and end done
    (tmp_path / "c" / "img.npy").write_bytes(saved)
    counts = run_cohort(manifest, out, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO(),
                        retry_failed=True, pack=4)
    assert counts == {"done": 6}
    tries = sc.attempts(out)
    assert {tries[j] for j in ids["img"]} == {2} and {tries[j] for j in ids["cam"] + ids["moon"]} == {1}


def _ids_by_scan(store) -> dict[str, list[str]]:
    g = zarr.open_group(str(store), mode="r")["jobs"]
    out: dict[str, list[str]] = {}
    for job, scan in zip(g["job"][:], g["scan_id"][:]):
        out.setdefault(str(scan), []).append(str(job))
    return out


def _close_rows(store, reference, job_ids) -> None:
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    ids = [str(j) for j in a["jobs/job"][:]]
    rows = [ids.index(j) for j in job_ids]
    np.testing.assert_allclose(a["metrics/values"][rows], b["metrics/values"][rows], rtol=1e-4, atol=1e-6)


def test_interrupted_pack_resumes_each_job_with_uninterrupted_numbers(tmp_path):
    """Ctrl-C while the second pack (the 2 moon jobs) runs: the first pack's jobs are done and stay
    so; the second's stop at a step with a checkpoint each; the rerun ends them with the numbers
    of an uninterrupted run of that pack (a moon-only cohort: job ids do not depend on the other
    scans, and its --pack 4 is the same pack of 2), running no done job again."""
    from schedulers.local import LocalBackend

    steps = 300  # long enough on a loaded 2-core machine that the signal lands mid-pack
    manifest = _cohort(tmp_path / "c", steps=steps)
    alone = sc.write_manifest(tmp_path / "moon.yaml", steps=steps, scans={"moon": "skimage:moon"})
    reference = tmp_path / "ref.zarr"
    assert run_cohort(alone, reference, LocalBackend(device="cpu"), progress="quiet", stream=io.StringIO(),
                      pack=4) == {"done": 2}
    out = tmp_path / "sig.zarr"
    with sc.running_driver("run", str(manifest), "--out", str(out), "--device", "cpu", "--pack", "4",
                           "--progress", "plain") as driver:
        ids = sc.wait_for(lambda: _ids_by_scan(out) if sc.ledger_if_created(out) else None, 120, "the store")
        sc.wait_for(lambda: "start job" in sc.log_text(out, ids["moon"][0]), 300, "the second pack to start")
        time.sleep(1.0)
        stdout, stderr = sc.signal_driver(driver, signal.SIGINT)
    assert driver.returncode == 130, (stdout, stderr)
    before = sc.statuses(out)
    assert {before[j] for j in ids["moon"]} == {"interrupted"}, before
    assert {before[j] for j in ids["cam"] + ids["img"]} == {"done"}, before
    assert all(checkpoint_path(out, j).is_file() for j in ids["moon"])
    rerun = sc.cli("run", str(manifest), "--out", str(out), "--device", "cpu", "--pack", "4", "--progress", "plain")
    assert "2 of 6 jobs to run" in rerun.stdout and "packing: 2 jobs in 1 pack(s)" in rerun.stdout, rerun.stdout
    assert set(sc.statuses(out).values()) == {"done"}
    tries = sc.attempts(out)
    assert {tries[j] for j in ids["moon"]} == {2} and {tries[j] for j in ids["cam"] + ids["img"]} == {1}
    assert all("resuming from checkpoint" in sc.log_text(out, j) for j in ids["moon"])
    _same_rows(out, reference, ids["moon"])


def _same_rows(store, reference, job_ids) -> None:
    """These jobs' metrics, summaries (less timings) and final images are identical in both stores."""
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    rows = [[list(map(str, g["jobs/job"][:])).index(j) for j in job_ids] for g in (a, b)]
    np.testing.assert_array_equal(a["metrics/values"][rows[0]], b["metrics/values"][rows[1]])
    fields = list(a["summary"]["values"].attrs["summary_fields"])
    keep = [i for i, f in enumerate(fields) if f not in ("runtime_s", "steps_per_s")]
    np.testing.assert_array_equal(a["summary/values"][rows[0]][:, keep], b["summary/values"][rows[1]][:, keep])
    (group,) = a.attrs["image_groups"]
    image_rows = [[list(g["images"][group]["job_index"][:]).index(r) for r in rs] for g, rs in zip((a, b), rows)]
    np.testing.assert_array_equal(a["images"][group]["final"][image_rows[0]], b["images"][group]["final"][image_rows[1]])


def test_dry_run_says_how_jobs_are_packed(tmp_path, capsys):
    from dipcohort.cli import main

    manifest = _cohort(tmp_path, extra="  - {name: tv, params: {}}\n")  # tv: a solver that cannot be packed
    manifest.write_text(manifest.read_text().replace("time_min: 10}", "time_min: 10, pack: 3}"))
    out = str(tmp_path / "dry.zarr")

    def dry(*extra: str) -> str:
        assert main(["run", str(manifest), "--out", out, "--dry-run", *extra]) == 0
        return capsys.readouterr().out

    said = dry()
    assert "packing: 12 jobs in 2 pack(s) and 6 alone" in said, said
    assert "6 jobs to run in packs of up to 3" in said and "pack 3" in said
    assert "each job alone (solver tv cannot be packed)" in said
    said = dry("--pack", "2")  # the command line wins over resources.pack
    assert "6 jobs to run in packs of up to 2" in said and "12 jobs in 3 pack(s) and 6 alone" in said
    # auto on CPU: 6 jobs on this machine's cores, every core a pack (memory is plenty at 32 px)
    n = min(16, -(-6 // len(os.sched_getaffinity(0))))
    said = dry("--pack", "auto", "--device", "cpu")
    assert (f"6 jobs to run in packs of up to {n} (auto on cpu: measured" if n > 1 else "each job alone") in said, said
    assert not (tmp_path / "dry.zarr").exists()
    assert main(["run", str(manifest), "--out", out, "--pack", "0"]) == 2
    assert "--pack '0': expected a whole number >= 1" in capsys.readouterr().err
    manifest.write_text(manifest.read_text().replace("pack: 3}", "pack: many}"))
    assert main(["run", str(manifest), "--out", out, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "resources" in err and "pack" in err and "Traceback" not in err, err


def test_auto_rule():
    from pipeline.packing import auto_size

    mib, gib = 2.0 ** 20, 2.0 ** 30
    # CUDA: 0.8 x 10 GiB / 100 MiB = 81, capped at 64, and at the jobs there are
    assert auto_size(10 * gib, 100 * mib, 1000, "cuda") == 64
    assert auto_size(10 * gib, 300 * mib, 1000, "cuda") == 27
    assert auto_size(10 * gib, 100 * mib, 10, "cuda") == 10
    assert auto_size(1 * gib, 2 * gib, 10, "cuda") == 1  # not even one fits: each job alone
    # CPU: half the available RAM, and a pack for every core
    assert auto_size(8 * gib, 10 * mib, 6, "cpu", cores=2) == 3
    assert auto_size(8 * gib, 10 * mib, 1000, "cpu", cores=2) == 16
    assert auto_size(100 * mib, 10 * mib, 1000, "cpu", cores=1) == 5


def test_pack_ledger_entry_ends_when_every_member_ended():
    """What backends follow a pack by (pipeline.store.snapshot): attempts add up; an outcome only
    once every member has one, the worst of them."""
    c = STATUS_CODES
    assert pack_entry([(c["done"], 1), (c["done"], 1)]) == (c["done"], 2)
    assert pack_entry([(c["done"], 1), (c["failed"], 1)]) == (c["failed"], 2)
    assert pack_entry([(c["done"], 1), (c["running"], 1), (c["pending"], 0)]) == (c["running"], 2)
    assert pack_entry([(c["failed"], 1), (c["interrupted"], 1)]) == (c["interrupted"], 2)
