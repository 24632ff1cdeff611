"""`dipcohort run` / `dipcohort status` end to end, resume, retry, dry run, bad manifests,
and every shipped manifest validating with --dry-run."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from pipeline import store as st
from dipcohort.cli import main
from pipeline.jobs import STATUS_CODES

REPO = Path(__file__).resolve().parent.parent
MANIFEST = """
cohort: tiny
steps: 20
size: 32
seeds: [0]
metrics: {ssim_every: 10}
scans:
  - {id: cam, source: "skimage:camera", task: denoise, params: {sigma: 25}}
  - {id: file, source: img.npy, task: inpaint, params: {hole_ratio: 0.1}}
solvers:
  - {name: dip, params: {network: tiny}}
  - {name: aseqdip, params: {network: tiny}}
"""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image(path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    np.save(path, (0.5 + 0.4 * np.sin(xx / 4) * np.cos(yy / 5)).astype(np.float32))


def setup(tmp_path: Path, text: str = MANIFEST) -> tuple[Path, Path]:
    image(tmp_path / "img.npy")
    m = tmp_path / "m.yaml"
    m.write_text(textwrap.dedent(text))
    return m, tmp_path / "out" / "res.zarr"


def run(*args: str) -> int:
    return main(["run", *map(str, args), "--device", "cpu", "--progress", "quiet"])


def test_run_status_resume_and_retry(tmp_path, capsys):
    m, out = setup(tmp_path)
    assert run(m, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 jobs to run" in printed and "4 jobs — done 4" in printed
    table = st.ledger_table(out)
    assert list(table["status"]) == ["done"] * 4 and list(table["attempts"]) == [1] * 4
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["cohort"] == "tiny" and root.attrs["manifest"] == m.read_text()
    assert np.isfinite(root["summary/values"][:, 0]).all()  # peak PSNR of every job

    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "done 4" in status and "failed 0" in status
    assert "aseqdip" in status and "dip" in status

    # rerun: nothing left to do, nothing rerun
    assert run(m, "--out", out, "--resume") == 0
    assert "0 of 4 jobs to run" in capsys.readouterr().out
    assert list(st.ledger_table(out)["attempts"]) == [1] * 4

    # a failing scan: its jobs fail, the others still run; --retry-failed reruns only them
    (tmp_path / "second").mkdir()
    m2, out2 = setup(tmp_path / "second")
    (tmp_path / "second" / "img.npy").unlink()
    assert run(m2, "--out", out2) == 2  # a missing source stops the run before anything is written
    assert "img.npy: no such file" in capsys.readouterr().err and not out2.exists()
    assert run(m2, "--out", out2, "--allow-missing") == 1  # exit 1: some jobs failed
    assert "warning: scan file" in capsys.readouterr().out  # listed at the start
    table = st.ledger_table(out2)
    assert sorted(table["status"]) == ["done", "done", "failed", "failed"]
    failed_ids = set(table["job_id"][table["status"] == "failed"])
    assert set(table["scan_id"][table["status"] == "failed"]) == {"file"}

    assert main(["status", str(out2)]) == 0
    status = capsys.readouterr().out
    assert "failed jobs (2)" in status and "no such file" in status
    assert all(f"{job_id}.log" in status for job_id in failed_ids)

    assert run(m2, "--out", out2) == 1  # without --retry-failed, failed jobs stay failed
    assert "0 of 4 jobs to run" in capsys.readouterr().out
    image(tmp_path / "second" / "img.npy")  # the user fixes the file
    assert run(m2, "--out", out2, "--retry-failed") == 0
    assert "2 of 4 jobs to run" in capsys.readouterr().out
    table = st.ledger_table(out2)
    assert list(table["status"]) == ["done"] * 4
    # the scan could not be loaded when the store was made: no attempt was counted then
    assert list(table["attempts"]) == [1] * 4
    for row in table.itertuples():  # jobs that were done did not run again
        assert Path(row.log_path).read_text().count("start job") == 1


def test_interrupted_jobs_rerun_on_resume(tmp_path, capsys):
    m, out = setup(tmp_path, MANIFEST.replace("  - {name: aseqdip, params: {network: tiny}}\n", ""))
    assert run(m, "--out", out) == 0
    root = zarr.open_group(str(out), mode="r+")
    root["jobs/status"][1] = STATUS_CODES["running"]  # as if the driver was killed mid-job
    capsys.readouterr()
    assert run(m, "--out", out) == 0
    assert "1 of 2 jobs to run" in capsys.readouterr().out
    assert list(st.ledger_table(out)["attempts"]) == [1, 2]


def test_dry_run_writes_nothing(tmp_path, capsys):
    m, out = setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["run", str(m), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "2 scans × 2 solver configurations × 1 seed(s) = 4 jobs" in printed and "storage estimate" in printed and "nothing written" in printed
    assert "gpus 0, cpus 1, mem 4 GB, time 60 min" in printed
    running = int(re.search(r"files: (\d+) while jobs run", printed)[1])
    files = int(re.search(r"(\d+) once the run ends", printed)[1])     # entries folded, data compacted
    assert files < running
    assert main(["run", str(m), "--out", str(out), "--device", "cpu", "--progress", "quiet"]) == 0
    real = sum(1 for p in out.rglob("*") if p.is_file())
    assert real <= files, "the file-count estimate is an upper bound"


def test_invalid_manifest_exit_2_and_nothing_written(tmp_path, capsys):
    m, out = setup(tmp_path, MANIFEST.replace("steps: 20", "steps: -1"))
    assert run(m, "--out", out) == 2
    err = capsys.readouterr().err
    assert str(m) in err and "steps" in err and "greater than 0" in err
    assert not out.exists() and not st.work_dir(out).exists()
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "no such manifest" in capsys.readouterr().err
    m.write_text(MANIFEST)
    assert main(["run", str(m), "--out", str(out), "--device", "gpu"]) == 2
    assert "expected cpu, cuda or cuda:K" in capsys.readouterr().err
    assert not out.exists()


def test_changed_manifest_needs_a_new_store(tmp_path, capsys):
    m, out = setup(tmp_path, MANIFEST.replace("  - {name: aseqdip, params: {network: tiny}}\n", ""))
    assert run(m, "--out", out) == 0
    m.write_text(m.read_text().replace("{network: tiny}", "{network: tiny, lr: 0.02}"))
    capsys.readouterr()
    assert run(m, "--out", out) == 2
    assert "new --out" in capsys.readouterr().err
    assert main(["run", str(m), "--out", str(tmp_path / "fresh.zarr"), "--resume"]) == 2
    assert "not an existing results store" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (("{sigma: 25}", "{sigma: -5}"), "parameter 'sigma' must lie in [0.0, inf], got -5"),
    (("task: denoise, params: {sigma: 25}", "task: ct, params: {views: 0}"), "parameter 'views' must lie in [1, inf]"),
    (("{name: aseqdip, params: {network: tiny}}", "{name: fbp}"), "fbp: filtered back-projection exists for CT only"),
    (("{name: aseqdip, params: {network: tiny}}", "{name: deep-decoder, params: {network: tiny}}"),
     "solver 'deep-decoder' option network: got 'tiny', expected one of 'deep-decoder', 'deep-decoder-small'"),
    (('"skimage:camera"', "gone.npy"), "gone.npy: no such file"),
    (('"skimage:camera"', "empty.npy"), "empty.npy"),
])
def test_invalid_scan_or_solver_exits_2_and_writes_nothing(tmp_path, capsys, change, expected):
    """The checks of `dipcohort recon`, on every scan and solver configuration, before anything is written."""
    m, out = setup(tmp_path, MANIFEST.replace(*change))
    (tmp_path / "empty.npy").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    assert main(["run", str(m), "--out", str(out), "--device", "cpu", "--progress", "quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(m) in err and len(err.strip().splitlines()) <= 3, err
    assert sorted(tmp_path.rglob("*")) == before  # no store, no work folder, no lease
    if "sigma" in change[1] or "views" in change[1] or "name:" in change[1]:  # a dry run refuses it too
        assert main(["run", str(m), "--out", str(out), "--dry-run"]) == 2


def test_preflight_reads_headers_and_probes_one_scan_per_signature(tmp_path, monkeypatch):
    """The login node loads one scan per signature, not every scan; the others' shapes come from
    the same header; a truncated .npz (header check) is refused like a missing file."""
    import pipeline.scans as scans
    from pipeline.manifest import load_manifest
    from pipeline.preflight import check_manifest

    rows = []
    for k in range(6):  # two shapes of 3 files each, all resized to 32 px: one signature per file shape
        np.save(tmp_path / f"s{k}.npy", np.random.default_rng(k).random((40 + 8 * (k % 2), 48)).astype(np.float32))
        rows.append(f'  - {{id: s{k}, source: s{k}.npy, task: denoise, params: {{sigma: 25}}}}')
    m = tmp_path / "m.yaml"
    m.write_text("cohort: hdr\nsteps: 20\nsize: 32\nseeds: [0]\nscans:\n" + "\n".join(rows)
                 + "\nsolvers:\n  - {name: dip, params: {network: tiny}}\n")
    loaded = []
    real_load = scans.load
    monkeypatch.setattr(scans, "load", lambda spec: loaded.append(spec.id) or real_load(spec))
    check = check_manifest(load_manifest(m))
    assert sorted(loaded) == sorted(check.probed) == ["s0", "s1"]
    assert set(check.shapes) == {f"s{k}" for k in range(6)} and not check.unloadable
    assert {s.group for s in check.shapes.values()} == {"c1_32x32"}
    # a cut .npz: its zip directory is gone, the header read refuses it with exit 2
    np.savez(tmp_path / "whole.npz", image=np.zeros((32, 32), np.float32))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "s5.npy").unlink()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    m.write_text(m.read_text().replace("s5.npy", "cut.npz"))
    assert main(["run", str(m), "--out", str(tmp_path / "o.zarr"), "--device", "cpu", "--progress", "quiet"]) == 2
    assert not (tmp_path / "o.zarr").exists()


def test_allow_missing_records_the_missing_scan_failed(tmp_path, capsys):
    m, out = setup(tmp_path, MANIFEST.replace('"skimage:camera"', "gone.npy"))
    assert run(m, "--out", out, "--allow-missing") == 1
    assert "warning: scan cam" in capsys.readouterr().out
    table = st.ledger_table(out)
    bad = table[table["scan_id"] == "cam"]
    assert list(bad["status"]) == ["failed", "failed"] and all("gone.npy" in e for e in bad["error"])
    assert list(table[table["scan_id"] == "file"]["status"]) == ["done", "done"]


# ------------------------------------------------------------------------ shipped manifests
def _fastmri(path: Path) -> None:
    """A small fastMRI-like multi-coil file: fully sampled k-space and its RSS reference."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
    img = (xx ** 2 + yy ** 2 < 0.6).astype(np.float64) * (1 + 0.2 * rng.random((32, 32)))
    coils = np.stack([img * np.exp(-((xx - c) ** 2 + yy ** 2)) for c in (-1, 0, 1, 0.5)])
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coils, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    with h5py.File(path, "w") as fh:
        fh["kspace"] = np.stack([kspace] * 3).astype(np.complex64)
        fh["reconstruction_rss"] = np.stack([np.sqrt((np.abs(coils) ** 2).sum(0))] * 3).astype(np.float32)


def _png(path: Path, rgb: bool) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:40, 0:48]
    gray = (127 + 120 * np.sin(xx / 5) * np.cos(yy / 7)).astype(np.uint8)
    Image.fromarray(np.stack([gray, gray[::-1], gray[:, ::-1]], -1) if rgb else gray).save(path)


def test_every_shipped_manifest_validates_with_dry_run(tmp_path, monkeypatch, capsys):
    """Studies read the users' data through environment variables; point them at tiny files."""
    for sub in ("mri", "ct", "rgb"):
        (tmp_path / sub).mkdir()
    _fastmri(tmp_path / "mri" / "file1000001.h5")
    _fastmri(tmp_path / "mri" / "file1000002.h5")
    _png(tmp_path / "ct" / "L067_001.png", rgb=False)
    _png(tmp_path / "rgb" / "0001.png", rgb=True)
    monkeypatch.setenv("FASTMRI_FILES", str(tmp_path / "mri" / "*.h5"))
    monkeypatch.setenv("CT_IMAGES", str(tmp_path / "ct" / "*.png"))
    monkeypatch.setenv("CBSD68_IMAGES", str(tmp_path / "rgb" / "*.png"))
    manifests = sorted((REPO / "manifests").rglob("*.yaml"))
    names = {p.relative_to(REPO / "manifests").as_posix() for p in manifests}
    assert {"demo.yaml", "studies/mri.yaml", "studies/ct.yaml", "studies/denoise.yaml", "studies/inpaint.yaml",
            "studies/deblur.yaml", "studies/robustness.yaml"} <= names
    for path in manifests:
        out = tmp_path / f"{path.stem}.zarr"
        assert main(["run", str(path), "--out", str(out), "--dry-run"]) == 0, path
        printed = capsys.readouterr().out
        assert "storage estimate" in printed and "warning" not in printed, printed
        assert not out.exists()
    if os.environ.get("DIPCOHORT_FULL_DEMO"):  # opt-in: the whole demo (minutes)
        assert run(REPO / "manifests" / "demo.yaml", "--out", tmp_path / "demo.zarr") == 0


# ------------------------------------------------------------------------ the command line's errors
@pytest.mark.parametrize("extra, expected", [
    (("--partition", "gpu"), "--partition applies to --backend slurm, not --backend local"),
    (("--ray-address", "auto"), "--ray-address applies to --backend ray, not --backend local"),
    (("--backend", "ray", "--jobs-per-task", "4"), "--jobs-per-task applies to --backend slurm, not --backend ray"),
    (("-o", "max_in_flight=3"), "the local backend has no option(s) max_in_flight"),
    (("-o", "novalue"), "-o/--option 'novalue': expected KEY=VALUE"),
])
def test_backend_flags_it_does_not_take_are_errors(tmp_path, capsys, extra, expected):
    m, out = setup(tmp_path)
    assert main(["run", str(m), "--out", str(out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and not st.work_dir(out).exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    m, _ = setup(tmp_path)
    file = tmp_path / "taken"
    file.write_text("x")
    assert main(["run", str(m), "--out", str(file)]) == 2
    assert f"--out {file}: exists and is a file" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(file)]) == 2
    assert f"--out {file}: exists and is a file" in capsys.readouterr().err
    assert main(["demo", "--out", str(file)]) == 2
    assert "exists and is a file" in capsys.readouterr().err


def test_os_errors_name_the_file_and_bugs_go_to_a_log(tmp_path, capsys, monkeypatch):
    import errno

    from dipcohort.commands import status

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.zarr" / "c" / "0"))

    monkeypatch.setattr(status, "main", full)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.zarr/c/0: no space left on the device" in err

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(status, "main", bug)
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected error: ZeroDivisionError: a bug" in err
    log = Path(err.rsplit("the traceback is in ", 1)[1].strip())
    assert "Traceback (most recent call last)" in log.read_text() and "ZeroDivisionError" in log.read_text()
    log.unlink()


def test_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    m, out = setup(tmp_path, MANIFEST.replace("  - {name: aseqdip, params: {network: tiny}}\n", ""))
    assert run(m, "--out", out) == 0
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(REPO)
    # `true` exits without reading, long before Python has started: every write meets a closed pipe
    piped = subprocess.run(["bash", "-c", f"{sys.executable} -m dipcohort status {out} | true; "
                            f"echo ${{PIPESTATUS[0]}}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert piped.stdout.strip() == "0" and piped.stderr == "", piped.stderr
