"""Per-step values kept on the device and copied to the host in blocks (no host sync per step).

The loop writes each step's 0-d tensors (loss terms, scores, moving variance) into a
preallocated float64 buffer on the solver's device and copies the pending rows in one transfer
every `METRICS_BLOCK` steps, at checkpoints, at the last step and where an early stop could fire.
What must pick an iterate at the step it happens (the oracle peak, ES-WMV's selected iterate, the
image at a divergence) is chosen on the device with `torch.where`, so a block copy decides
exactly what a per-step copy would have.
"""
from __future__ import annotations

import torch

METRICS_BLOCK = 50  # steps between host copies; 1 copies every step


class Selection:
    """A running best on the device: its value, step and image, replaced where `better` holds."""

    def __init__(self, value: float, step: int, image: torch.Tensor | None, device: torch.device):
        self.value = torch.tensor(value, dtype=torch.float64, device=device)
        self.step = torch.tensor(step, dtype=torch.int64, device=device)
        self.image = image

    def offer(self, better: torch.Tensor, value: torch.Tensor, k: int, image: torch.Tensor) -> None:
        self.value = torch.where(better, value, self.value)
        self.step = torch.where(better, k, self.step)
        self.image = torch.where(better, image, image if self.image is None else self.image)

    def scalars(self) -> list[torch.Tensor]:
        return [self.value, self.step.double()]


class StepBuffer:
    """Rows of named 0-d tensors on the device; `payload` + `unpack` hand them to the host."""

    def __init__(self, block: int, device: torch.device):
        if block < 1:
            raise ValueError(f"metrics block must be >= 1, got {block}")
        self.block, self.device = block, device
        self.columns: dict[str, int] = {}
        self.buffer = torch.empty((block, 16), dtype=torch.float64, device=device)
        self.pending: list[tuple[int, tuple[str, ...]]] = []  # (step, names written) per row
        self._index: dict[tuple[str, ...], torch.Tensor] = {}  # device column indices per name set

    @property
    def full(self) -> bool:
        return len(self.pending) == self.block

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        names = tuple(tensors)
        index = self._index.get(names)
        if index is None:
            for name in names:
                self.columns.setdefault(name, len(self.columns))
            if len(self.columns) > self.buffer.shape[1]:  # a solver with many terms: widen
                wider = torch.empty((self.block, 2 * len(self.columns)), dtype=torch.float64, device=self.device)
                wider[:, : self.buffer.shape[1]] = self.buffer
                self.buffer = wider
            index = self._index[names] = torch.tensor([self.columns[n] for n in names], device=self.device)
        row = torch.stack([t.detach().to(torch.float64).reshape(()) for t in tensors.values()])
        self.buffer[len(self.pending)].index_copy_(0, index, row)
        self.pending.append((k, names))

    def payload(self) -> torch.Tensor:
        """The pending rows, flat, for one host copy."""
        return self.buffer[: len(self.pending)].reshape(-1)

    def unpack(self, values: list[float]) -> list[tuple[int, dict[str, float]]]:
        """(step, {name: value}) per pending row from the copied payload; empties the buffer."""
        width = self.buffer.shape[1]
        rows = []
        for i, (k, names) in enumerate(self.pending):
            row = values[i * width:(i + 1) * width]
            rows.append((k, {name: row[self.columns[name]] for name in names}))
        self.pending = []
        return rows


def host_floats(payloads: list[torch.Tensor]) -> list[float]:
    """Every payload in one device-to-host copy."""
    return torch.cat(payloads).tolist() if payloads else []
