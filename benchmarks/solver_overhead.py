"""Seconds per step of each network solver next to a bare PyTorch loop with the same network,
operator and input (plain Adam on 1/2||A f(z) - y||^2, no metrics), and their ratio.

    python benchmarks/solver_overhead.py [--size 64] [--steps 100] [--network unet]
        [--device cpu|cuda] [--task denoise] [--solvers dip,es-dip,aseqdip,self-guided] [--repeats 3]

The solvers run through `run_solver` exactly as a job does: PSNR every step, SSIM every
`--ssim-every` steps (10, run_solver's default), moving variance every step, one host sync per
step. Every solver uses the same network preset so that steps cost the same work (its other
settings are its defaults: aseqdip N = 2, self-guided N_eta = 4, ...). A solver's time per step
is (run of 5 + S steps) - (run of 5 steps), divided by S, so set-up and final metrics cancel;
on the CPU the clock is process time (steady on a shared machine), on CUDA wall time after a
synchronize. Figures are the median over `--repeats` interleaved repeats.
Goals: dip <= 1.05x the bare loop; aseqdip <= 1.2x dip at equal steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.nets import build_network, count_parameters  # noqa: E402
from recon.tasks import simulate  # noqa: E402
from recon.solvers import get_solver, run_solver  # noqa: E402

TASK_OPTIONS = {"denoise": {"sigma": 25}, "mri": {"acceleration": 4}, "ct": {"views": 18},
                "inpaint": {"hole_ratio": 0.1}}


def clock(device: torch.device):
    """CPU: process time (this process's CPU seconds; steady on a shared machine, and equal to
    wall time with one thread). CUDA: wall time after a synchronize."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def bare_loop(problem, network: str, steps: int, seed: int, device: torch.device, lr: float) -> float:
    """Seconds per step of a plain Adam loop: the reference every solver is compared with."""
    gen = torch.Generator(device=device).manual_seed(seed)
    z = 0.1 * torch.randn(problem.image_shape, generator=gen, device=device)  # vanilla DIP's default input
    torch.manual_seed(seed)
    net = build_network(network, problem.channels, problem.channels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    op, y = problem.operator, problem.measurements

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            r = op(net(z)) - y
            loss = 0.5 * torch.sum(r.real ** 2 + r.imag ** 2) if r.is_complex() else 0.5 * torch.sum(r ** 2)
            loss.backward()
            opt.step()

    run(5)  # warm-up
    t0 = clock(device)
    run(steps)
    return (clock(device) - t0) / steps


def solver_step(name: str, problem, network: str, steps: int, seed: int, device: torch.device,
                ssim_every: int) -> float:
    """(time of a run of WARM + steps) - (time of a run of WARM steps), per step: set-up, the
    first slow steps and the final metrics cancel; what is left is the loop's steady state."""
    params = {"network": network}
    warm = 5

    def timed(n: int) -> float:
        t0 = clock(device)
        run_solver(name, problem, steps=n, params=params, seed=seed, device=device, ssim_every=ssim_every)
        return clock(device) - t0

    timed(warm)  # first-call costs (allocator, kernels)
    return (timed(warm + steps) - timed(warm)) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    ap.add_argument("--network", default="unet", help="network preset for every solver (default: unet, "
                    "the CT chapter's U-Net, every network solver's default)")
    ap.add_argument("--task", default="denoise", choices=sorted(TASK_OPTIONS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--solvers", default="dip,es-dip,aseqdip,self-guided,tv-dip,dip-denoiser-admm")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is shown")
    ap.add_argument("--ssim-every", type=int, default=10, help="SSIM every k steps (run_solver's default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: CPU time = wall time)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.solvers.split(",") if n.strip()]
    for n in names:
        if not get_solver(n).uses_network:
            ap.error(f"--solvers: {n!r} is not a network solver")
    if "dip" not in names:
        names.insert(0, "dip")

    from skimage import data, transform
    image = transform.resize(data.camera() / 255.0, (args.size, args.size), anti_aliasing=True)
    problem = simulate(args.task, image, TASK_OPTIONS[args.task], seed=0).to(device)
    net = build_network(args.network, problem.channels, problem.channels)
    print(f"task {args.task}, {args.size} px, network {args.network} ({count_parameters(net):,} parameters), "
          f"device {device}, {args.steps} steps x {args.repeats} repeats, threads {torch.get_num_threads()}")
    print(f"solvers log loss and terms, PSNR every step, SSIM every {args.ssim_every} steps, moving variance")

    times: dict[str, list[float]] = {"bare": []}
    for r in range(args.repeats):
        times["bare"].append(bare_loop(problem, args.network, args.steps, r, device, lr=1e-4))
        for n in names:
            times.setdefault(n, []).append(solver_step(n, problem, args.network, args.steps, r, device,
                                                       args.ssim_every))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'loop':<20}{'ms/step':>10}{'x bare':>9}{'x dip':>8}  goal")
    for k, v in med.items():
        goal = {"dip": "<= 1.05x bare", "aseqdip": "<= 1.20x dip"}.get(k, "")
        ok = ""
        if k == "dip":
            ok = "  ok" if v / med["bare"] <= 1.05 else "  MISSED"
        if k == "aseqdip":
            ok = "  ok" if v / med["dip"] <= 1.2 else "  MISSED"
        print(f"{k:<20}{1e3 * v:>10.2f}{v / med['bare']:>9.3f}{v / med['dip']:>8.3f}  {goal}{ok}")


if __name__ == "__main__":
    main()
