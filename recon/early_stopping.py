"""Early stopping by the moving variance of the iterates (Wang et al. 2021/2023; Alg. 2 of the CT chapter):
windowed (ES-WMV, eq. 19 of the chapter) or exponential (ES-EMV, Wang et al.'s memory-light variant)."""
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


class ExponentialMovingVariance:
    """ES-EMV of Wang et al. (github.com/sun-umn/Early_Stopping_for_DIP, ES_EMV.ipynb, class EWMVar):
    with delta_k = x_k - m_{k-1},  m_k = m_{k-1} + alpha delta_k,  v_k = (1 - alpha)(v_{k-1} + alpha ||delta_k||^2),
    m_0 = x_0, v_0 = 0: an exponentially weighted variance with memory ~1/alpha steps, O(1) memory.

    v_k starts at 0 and is biased low until about 1/alpha iterates have entered it, so, as Wang et al.'s code
    only tracks it after its first 100 of 5,000 steps, `update` returns it once 1/alpha steps have passed.
    (Their code also clips m_k to [0, 1]; not here: an average of iterates in [0, 1] stays there, and
    other modalities' display ranges differ.)
    """

    def __init__(self, alpha: float):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"EMV alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.warmup = math.ceil(1.0 / alpha)
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.var = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add an iterate; returns v_k once `warmup` iterates followed x_0, else None."""
        x = x.detach().to(torch.float64)
        if self.mean is None:
            self.mean, self.var = x.clone(), torch.zeros((), dtype=torch.float64, device=x.device)
        else:
            delta = x - self.mean
            self.mean = self.mean + self.alpha * delta  # not in place: a state_dict may share it
            self.var = (1.0 - self.alpha) * (self.var + self.alpha * torch.sum(delta * delta))
        self.count += 1
        return self.var.clone() if self.count > self.warmup else None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], int(state["count"])


VARIANCES = ("wmv", "emv")


def make_variance(kind: str, window: int, alpha: float) -> MovingVariance | ExponentialMovingVariance:
    """The detector's statistic g(k) of Alg. 2: 'wmv' (window W) or 'emv' (weight alpha)."""
    if kind == "wmv":
        return MovingVariance(window)
    if kind == "emv":
        return ExponentialMovingVariance(alpha)
    raise ValueError(f"es_variance must be one of {', '.join(VARIANCES)}, got {kind!r}")


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
