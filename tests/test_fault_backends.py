"""Backends fail before anything is written: --backend slurm with no Slurm on PATH, Ray asked
for GPUs on a machine without one, an unreachable --ray-address (in seconds, not minutes)."""
from __future__ import annotations

import time

import pytest

import sched_common as sc
from dipcohort.cli import main
from pipeline.store import work_dir


@pytest.fixture
def manifest(tmp_path):
    return sc.write_manifest(tmp_path / "cohort.yaml", steps=5, seeds=(0,))


def _fails_before_writing(manifest, out, capsys, *extra) -> str:
    assert main(["run", str(manifest), "--out", str(out), "--progress", "quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists() and not work_dir(out).exists()
    return err


def test_slurm_without_slurm_commands(manifest, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))   # no sbatch, squeue, scontrol, sinfo
    err = _fails_before_writing(manifest, tmp_path / "s.zarr", capsys, "--backend", "slurm")
    assert "sbatch, squeue, scontrol, sinfo not found on PATH" in err


def test_ray_gpus_on_a_machine_without_gpus(manifest, tmp_path, capsys):
    pytest.importorskip("ray", reason="ray is not installed")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = _fails_before_writing(manifest, tmp_path / "r.zarr", capsys, "--backend", "ray", "--gpus-per-job", "0.25")
    assert "ask for 0.25 GPU each" in err and "no GPU" in err


def test_unreachable_ray_address_fails_within_seconds(manifest, tmp_path, capsys):
    pytest.importorskip("ray", reason="ray is not installed")
    t0 = time.monotonic()
    err = _fails_before_writing(manifest, tmp_path / "r.zarr", capsys, "--backend", "ray", "--ray-address",
                                "127.0.0.1:1")
    assert "--ray-address 127.0.0.1:1: nothing answers there within 5 s" in err
    assert time.monotonic() - t0 < 60   # a hang guard (it used to wait for minutes), not a speed goal
