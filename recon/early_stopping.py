"""Early stopping by windowed moving variance (ES-WMV, Wang et al. 2021; Alg. 2 of the CT chapter)."""
from __future__ import annotations

import math

import torch


class MovingVariance:
    """VAR(k) = 1/W sum_w ||x^(k-w) - mean||^2 over the last W iterates (eq. 19), in O(1) per step.

    Keeps a ring buffer of the last W iterates with running sums of x and of ||x||^2 in float64.
    """

    def __init__(self, window: int):
        if window < 2:
            raise ValueError(f"variance window must be >= 2, got {window}")
        self.window = window
        self.buffer: torch.Tensor | None = None
        self.count = 0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add an iterate; returns VAR over the window once it is full, else None."""
        x = x.detach().to(torch.float64)
        if self.buffer is None:
            self.buffer = torch.zeros((self.window, *x.shape), dtype=torch.float64, device=x.device)
            self.sum_x = torch.zeros_like(x)
            self.sum_sq = torch.zeros((), dtype=torch.float64, device=x.device)
        slot = self.count % self.window
        if self.count >= self.window:
            old = self.buffer[slot]
            self.sum_x -= old
            self.sum_sq -= torch.sum(old * old)
        self.buffer[slot] = x
        self.sum_x += x
        self.sum_sq += torch.sum(x * x)
        self.count += 1
        if self.count < self.window:
            return None
        mean = self.sum_x / self.window
        return torch.clamp(self.sum_sq / self.window - torch.sum(mean * mean), min=0.0)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "count": self.count, "sum_x": self.sum_x, "sum_sq": self.sum_sq}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.count = state["buffer"], int(state["count"])
        self.sum_x, self.sum_sq = state["sum_x"], state["sum_sq"]


class EarlyStopper:
    """Alg. 2: track the best metric g(k) (new best when g < delta * g_min); stop after `patience`."""

    def __init__(self, patience: int, delta: float = 1.0):
        self.patience = patience
        self.delta = delta
        self.best = math.inf
        self.best_step: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record g(step); True when it is a new best."""
        if self.improves(value, self.best):
            self.best, self.best_step = value, step
            return True
        return False

    def improves(self, value, best):
        """g < delta * g_min (floats, or tensors: the loop decides on the device)."""
        return value < self.delta * best

    def should_stop(self, step: int) -> bool:
        """After update(step): True when Alg. 2's loop (while k <= k_min + p) would not run step + 1."""
        return self.best_step is not None and step >= self.best_step + self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = float(state["best"]), state["best_step"]
