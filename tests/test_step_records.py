"""Per-step values copied to the host in blocks give the numbers a copy every step gives, bit for
bit: histories, selected iterates (peak, ES-WMV), the step and image of a divergence, the EMA,
progress reports; alone and in a pack. Tiny networks at 32 px: about a second each on one core."""
from __future__ import annotations

import pytest
import torch
from skimage import data, transform

from recon.solvers import run_solver, run_solver_pack
from recon.solvers.dip import DIP
from recon.tasks import simulate
from test_packing import assert_same  # bit-for-bit equal results

torch.set_num_threads(1)

ES = {"network": "tiny", "variance_window": 5, "patience": 6}


@pytest.fixture(scope="module")
def scans():
    cam = transform.resize(data.camera() / 255.0, (32, 32), anti_aliasing=True)
    return [simulate("denoise", cam, {"sigma": 25}, seed=j) for j in range(3)]


def nan_loss_at(monkeypatch, call: int) -> None:
    """DIP's loss turns NaN at its `call`-th evaluation (0-based), as a diverging run's would."""
    calls = iter(range(10**6))
    original = DIP.objective

    def objective(self, x):
        terms = original(self, x)
        if next(calls) == call:
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return terms
    monkeypatch.setattr(DIP, "objective", objective)


@pytest.mark.parametrize("name,params", [("dip", {"network": "tiny", "ema_decay": 0.9}), ("es-dip", ES),
                                         ("aseqdip", {"network": "tiny", "inner_steps": 4})])
def test_block_copies_give_the_numbers_of_copies_every_step(scans, name, params):
    runs = [run_solver(name, scans[0], steps=80, params=params, seed=1, device="cpu", ssim_every=4,
                       metrics_block=block) for block in (1, 7, 50)]
    if name == "es-dip":  # the stop falls inside the first block of 50
        assert runs[0].stopped_early and runs[0].steps_run < 50
    for other in runs[1:]:
        assert_same(other, runs[0])


def test_a_divergence_inside_a_block_ends_the_run_at_its_step(scans, monkeypatch):
    runs = []
    for block in (1, 50):
        nan_loss_at(monkeypatch, 12)
        runs.append(run_solver("dip", scans[0], steps=40, params={"network": "tiny", "ema_decay": 0.9}, seed=1,
                               device="cpu", ssim_every=4, metrics_block=block))
    assert runs[0].diverged and runs[0].steps_run == 13
    assert_same(runs[1], runs[0])  # the image and EMA of step 12, the peak before it


def test_progress_reports_the_same_steps_and_values(scans):
    seen = {1: [], 50: []}
    for block in seen:
        run_solver("dip", scans[0], steps=25, params={"network": "tiny"}, seed=1, device="cpu", metrics_block=block,
                   progress=lambda done, total, values, block=block: seen[block].append((done, total, values)))
    assert [d for d, _, _ in seen[1]] == [1, 11, 21, 25] and seen[50] == seen[1]


def test_packs_copy_in_blocks_with_the_numbers_of_copies_every_step(scans, monkeypatch):
    stopped = [run_solver_pack("es-dip", scans, steps=80, params=ES, seeds=[1, 2, 3], device="cpu", ssim_every=4,
                               metrics_block=block) for block in (1, 50)]
    assert any(r.stopped_early for r in stopped[0])
    diverged = []
    for block in (1, 50):
        nan_loss_at(monkeypatch, 3 * 9 + 1)  # slot 1 of step 9 (the pack evaluates slot by slot)
        diverged.append(run_solver_pack("dip", scans, steps=30, params={"network": "tiny", "ema_decay": 0.9},
                                        seeds=[1, 2, 3], device="cpu", metrics_block=block))
    assert diverged[0][1].diverged and diverged[0][1].steps_run == 10
    for one, blocked in (stopped, diverged):
        for a, b in zip(one, blocked):
            assert_same(b, a)
