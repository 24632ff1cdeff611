"""ES-DIP: vanilla DIP stopped by the windowed moving variance (ES-WMV; Wang et al. 2021/2023,
Alg. 2 of the CT chapter, tutorial Sec. III-B).

The shared loop computes VAR(k) over the last W iterates every step (or, with es_variance 'emv',
Wang et al.'s exponential moving variance with weight emv_alpha), keeps the iterate with the
smallest VAR (a new best needs VAR < delta * best) and stops `patience` steps after it; the
result's image is that selected iterate, also when the budget ends first. The variance is taken
of the iterate the loss sees: with input jitter, the jittered output, as Wang et al.'s code does.
The defaults are the papers' full-scale values; the demo's scale needs others (docs/tuning.md,
sweep 4, and manifests/demo.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass

from recon.solvers import register
from recon.solvers.dip import DIP, DIPParams


@dataclass
class ESDIPParams(DIPParams):
    early_stop: bool = True
    variance_window: int = 100   # W = 100: Wang et al. (ES-WMV defaults), CT chapter Sec. 4.1 / Alg. 2
    patience: int = 1000         # p = 1000: Wang et al. defaults, as the CT chapter's experiments use
    # delta of Alg. 2 (no value in the chapter): 1 = any decrease is a new best, ES-WMV's "VAR stops
    # decreasing" rule; the chapter's public code uses 0.99 (from Subspace DIP)
    es_delta: float = 1.0
    # es_variance 'wmv' (ES-WMV, the chapter's Alg. 2 with eq. 19); 'emv': ES-EMV with Wang et al.'s
    # alpha 0.1 (their ES_EMV.ipynb); both inherited from SolverParams


@register
class ESDIP(DIP):
    """Vanilla DIP (Alg. 1) with ES-WMV early stopping (Alg. 2) done by the shared loop."""

    name = "es-dip"
    Params = ESDIPParams
