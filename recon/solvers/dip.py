"""Vanilla DIP (Ulyanov et al. 2018; Alg. 1 of the DIP-for-CT chapter)."""
from __future__ import annotations

from dataclasses import dataclass

from recon.solvers import register
from recon.solvers.base import NetworkParams, NetworkSolver


@dataclass
class DIPParams(NetworkParams):
    """Defaults of NetworkParams: the CT chapter's U-Net (Sec. 6.2), Adam lr 1e-4 and a fixed input
    z = 0.1 N(0, I) with the image's channels (the chapter's code, run_dip.py; see base.py)."""


@register
class DIP(NetworkSolver):
    """min_theta 1/2 ||A f_theta(z) - y||^2 with a fixed input z (optionally jittered, EMA'd)."""

    name = "dip"
    Params = DIPParams
    packable = True

    def objective(self, x):
        data = self.problem.data_fidelity(x)
        return {"loss": data, "data": data}
