"""`dipcohort recon` end to end, in-process through pipeline.cli.main (tiny network, 32 px)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dipcohort.cli import main
from pipeline.io import fft2c, ifft2c, load_scan, rss

torch.set_num_threads(1)

TINY = ["--set", "network=tiny"]
SUMMARY_KEYS = {"peak_psnr", "peak_step", "final_psnr", "final_ssim", "es_step", "es_psnr", "steps",
                "runtime_s", "task", "solver", "params", "seed", "device"}


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _read_metrics(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _psnr(x, ref, data_range=1.0):
    return 10 * math.log10(data_range ** 2 / float(np.mean((x.astype(np.float64) - ref) ** 2)))


def test_denoise_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["recon", "--task", "denoise", "--image", "skimage:camera", "--size", "32", "--sigma", "25",
               "--solver", "dip", "--steps", "30", *TINY, "--set", "lr=0.01", "--seed", "3",
               "--device", "cpu", "--ssim-every", "10", "--out", str(out)])
    assert rc == 0
    for name in ("recon.npy", "recon.png", "degraded.png", "metrics.csv", "summary.json", "psnr.png"):
        assert (out / name).is_file(), name
    rows = _read_metrics(out / "metrics.csv")
    assert len(rows) == 30
    assert [int(r["step"]) for r in rows] == list(range(30))
    assert {"step", "loss", "psnr", "ssim", "data"} <= set(rows[0])
    assert all(float(r["loss"]) > 0 and math.isfinite(float(r["psnr"])) for r in rows)
    with_ssim = [int(r["step"]) for r in rows if r["ssim"] != ""]
    assert with_ssim == [0, 10, 20, 29]  # every 10th step and the last; empty elsewhere

    summary = _strict_json(out / "summary.json")
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 30 and summary["task"] == "denoise" and summary["solver"] == "dip"
    assert summary["seed"] == 3 and summary["device"] == "cpu"
    assert summary["params"]["network"] == "tiny" and summary["params"]["lr"] == 0.01
    assert summary["task_options"] == {"sigma": 25.0} and summary["task_params"]["sigma"] == 25.0
    best = max(float(r["psnr"]) for r in rows)
    assert summary["peak_psnr"] == pytest.approx(best, abs=1e-6)
    assert float(rows[summary["peak_step"]]["psnr"]) == pytest.approx(best, abs=1e-6)

    recon = np.load(out / "recon.npy")
    truth = load_scan("skimage:camera", size=32).image
    assert recon.shape == (32, 32) and recon.dtype == np.float32
    assert _psnr(recon, truth) == pytest.approx(summary["final_psnr"], abs=1e-3)

    assert np.asarray(Image.open(out / "recon.png")).shape == (32, 32)
    degraded = np.asarray(Image.open(out / "degraded.png")).astype(float) / 255
    noise_std = np.std(degraded - truth)  # the noisy image: sigma 25/255 around the truth (clipped)
    assert 0.06 < noise_std < 0.12
    assert Image.open(out / "psnr.png").size[0] > 100
    assert "peak PSNR" in capsys.readouterr().out


@pytest.mark.parametrize("task, options, degraded_shape", [
    ("inpaint", ["--hole-ratio", "0.25"], (32, 32)),
    ("deblur", ["--kernel", "gaussian"], (32, 32)),
    ("sr", ["--factor", "2"], (32, 32)),
    ("ct", ["--views", "18"], (32, 32)),
    ("mri", ["--acceleration", "4", "--coils", "4"], (32, 32)),
])
def test_each_task_runs(tmp_path, task, options, degraded_shape):
    out = tmp_path / task
    rc = main(["recon", "--task", task, "--image", "skimage:shepp_logan", "--size", "32", *options,
               "--solver", "dip", "--steps", "5", *TINY, "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert len(_read_metrics(out / "metrics.csv")) == 5
    assert np.asarray(Image.open(out / "degraded.png")).shape == degraded_shape
    assert np.load(out / "recon.npy").shape == (32, 32)
    assert (out / "recon_complex.npy").is_file() == (task == "mri")


def test_color_denoise_keeps_three_channels(tmp_path):
    out = tmp_path / "rgb"
    assert main(["recon", "--task", "denoise", "--image", "skimage:astronaut", "--size", "32", "--color",
                 "--solver", "dip", "--steps", "3", *TINY, "--device", "cpu", "--out", str(out)]) == 0
    assert np.load(out / "recon.npy").shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "recon.png")).shape == (32, 32, 3)


def _write_fastmri(path, coils=4, ref=32, grid=(48, 40)):
    """fastMRI-like multi-coil file: oversampled k-space (slices, coils, H, W) and its RSS reference."""
    import h5py
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    H, W = grid
    obj = np.zeros((H, W), complex)
    top, left = (H - ref) // 2, (W - ref) // 2
    obj[top:top + ref, left:left + ref] = resize(shepp_logan_phantom(), (ref, ref), anti_aliasing=True)
    y, x = np.mgrid[-1:1:H * 1j, -1:1:W * 1j]
    sens = np.array([np.exp(-((y - np.sin(a)) ** 2 + (x - np.cos(a)) ** 2)) * np.exp(1j * a)
                     for a in 2 * np.pi * np.arange(coils) / coils])
    k = fft2c(obj[None] * sens) * 1e-3
    recon = rss(ifft2c(k)[:, top:top + ref, left:left + ref])
    with h5py.File(path, "w") as fh:
        fh.create_dataset("kspace", data=np.stack([k, 2 * k]).astype(np.complex64))
        fh.create_dataset("reconstruction_rss", data=np.stack([recon, 2 * recon]).astype(np.float32))
        fh.attrs["acquisition"] = "CORPD_FBK"
        fh.attrs["max"] = float(2 * recon.max())


def test_fastmri_h5_uses_measured_kspace(tmp_path):
    path = tmp_path / "file1000.h5"
    _write_fastmri(path)
    out = tmp_path / "mri"
    rc = main(["recon", "--task", "mri", "--image", f"{path}#slice=1", "--acceleration", "4",
               "--solver", "dip", "--steps", "10", *TINY, "--device", "cpu", "--out", str(out)])
    assert rc == 0
    summary = _strict_json(out / "summary.json")
    assert summary["scan"]["format"] == "fastmri" and summary["scan"]["slice"] == 1
    assert summary["problem"]["source"] == "measured" and summary["task_params"]["acceleration"] == 4
    assert summary["steps"] == 10 and math.isfinite(summary["final_psnr"])
    z = np.load(out / "recon_complex.npy")
    assert z.shape == (32, 32) and np.iscomplexobj(z)
    np.testing.assert_allclose(np.abs(z), np.load(out / "recon.npy"), atol=1e-6)
    reference = load_scan(f"{path}#slice=1").reference
    assert _psnr(np.load(out / "recon.npy"), reference) == pytest.approx(summary["final_psnr"], abs=1e-3)
    assert len(_read_metrics(out / "metrics.csv")) == 10


@pytest.mark.parametrize("argv, message", [
    (["--solver", "no-such-solver"], "unknown solver 'no-such-solver'"),
    (["--solver", "dip", "--views", "18"], "--views does not apply to --task denoise"),
    (["--solver", "dip", "--set", "lr"], "--set 'lr': expected KEY=VALUE"),
    (["--solver", "dip", "--set", "bogus=1"], "unknown field(s) bogus"),
    (["--solver", "dip", "--set", "lr=fast"], "lr: expected a number"),
    (["--solver", "dip", "--set", "network=nonesuch"], "nonesuch"),
    (["--solver", "es-dip", "--set", "es_variance=bogus"],
     "--set: solver 'es-dip' option es_variance: got 'bogus', expected one of 'wmv', 'emv'"),
    (["--solver", "dip", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_exit_2_with_message(tmp_path, capsys, argv, message):
    steps = [] if "--steps" in argv else ["--steps", "2"]
    rc = main(["recon", "--task", "denoise", "--image", "skimage:camera", "--size", "32", *argv, *steps,
               "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unreadable_image_exit_2_names_file(tmp_path, capsys):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"garbage")
    rc = main(["recon", "--task", "denoise", "--image", str(bad), "--solver", "dip", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "scan.png" in err and "unreadable" in err
    rc = main(["recon", "--task", "mri", "--image", "skimage:nope", "--solver", "dip", "--out", str(tmp_path / "o")])
    assert rc == 2 and "skimage:nope" in capsys.readouterr().err


def test_argparse_rejects_unknown_task(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recon", "--task", "xray", "--image", "skimage:camera", "--solver", "dip"])
    assert exc.value.code == 2
    assert "invalid choice: 'xray'" in capsys.readouterr().err


@pytest.mark.parametrize("cut, message", [(0, "empty file"), (200, "truncated")])
def test_bad_scan_files_exit_2_naming_the_file(tmp_path, capsys, cut, message):
    full = tmp_path / "full.npy"
    np.save(full, np.ones((32, 32), np.float32))
    bad = tmp_path / "scan.npy"
    bad.write_bytes(full.read_bytes()[:cut])  # an empty file, a header without its data
    rc = main(["recon", "--task", "denoise", "--image", str(bad), "--solver", "dip", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "scan.npy" in err and message in err and "Traceback" not in err


def test_truncated_npz_exit_2_naming_the_file(tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, image=np.random.default_rng(0).random((32, 32)))
    bad = tmp_path / "scan.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rc = main(["recon", "--task", "denoise", "--image", str(bad), "--solver", "dip", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "scan.npz" in err and "truncated" in err and "Traceback" not in err


def test_huge_size_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    import pipeline.io as io

    def no_allocation(*args, **kwargs):
        raise AssertionError("the image was loaded")

    monkeypatch.setattr(io, "_load_skimage", no_allocation)
    monkeypatch.setattr(io, "available_memory", lambda: 16 * 2 ** 30)
    rc = main(["recon", "--task", "denoise", "--image", "skimage:camera", "--size", "100000", "--solver", "dip",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--size 100000" in err and "GiB" in err and "16.0 GiB" in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    rc = main(["recon", "--task", "denoise", "--image", "skimage:camera", "--size", "32", "--solver", "dip",
               "--steps", "2", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a folder" in err
    assert out.read_text() == "not a folder"
