"""Operator contract shared by every modality.

Operators act on *network-format* images: real float32 tensors (B, C, H, W). Complex MRI
images are 2 real channels (real, imag) on this side; the MRI operator turns them into
complex tensors internally, so its measurements are complex while its domain is real.
Inner products are real (Re<.,.>), which keeps the dot-product test valid for complex ranges.
"""
from __future__ import annotations

import torch


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product Re<a, b>, for real or complex tensors."""
    if a.is_complex() or b.is_complex():
        return torch.real(torch.sum(a * torch.conj(b)))
    return torch.sum(a * b)


class Operator(torch.nn.Module):
    """A forward model x -> y. Non-linear models implement `forward` only."""

    linear: bool = False

    def __init__(self, domain_shape: tuple[int, ...]):
        super().__init__()
        self.domain_shape = tuple(domain_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for t in list(self.buffers()) + list(self.parameters()):
            return t.device
        return torch.device("cpu")


class LinearOperator(Operator):
    """A linear forward model with its exact adjoint."""

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x."""
        return self.adjoint(self.forward(x))

    @torch.no_grad()
    def norm(self, iterations: int = 100, seed: int = 0, tol: float = 1e-7) -> float:
        """Operator norm ||A||_2 by power iteration on A^H A."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(self.domain_shape, generator=gen).to(self.device)
        x = x / x.norm()
        value = 0.0
        for _ in range(iterations):
            y = self.normal(x)
            new = float(y.norm())
            x = y / max(new, 1e-30)
            if abs(new - value) <= tol * max(new, 1e-30):
                value = new
                break
            value = new
        return value ** 0.5


@torch.no_grad()
def dot_product_test(op: LinearOperator, seed: int = 0) -> float:
    """Relative error |<Ax, y> - <x, A^H y>| / |<Ax, y>| for random x, y."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(op.domain_shape, generator=gen, dtype=torch.float64)
    ax = op.forward(x.to(op.device, torch.float32))
    if ax.is_complex():
        y = torch.randn(ax.shape, generator=gen, dtype=torch.complex128)
    else:
        y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
    y = y.to(op.device, ax.dtype)
    x = x.to(op.device, torch.float32)
    lhs = float(inner(ax, y))
    rhs = float(inner(x, op.adjoint(y)))
    return abs(lhs - rhs) / max(abs(lhs), 1e-30)


class ScaledOperator(LinearOperator):
    """A / c: the same forward model divided by a constant, e.g. c = ||A|| for a unit-norm operator
    (deepinv's `Tomography(normalize=True)`). `base` keeps the physical operator (its FBP, masks)."""

    def __init__(self, base: LinearOperator, scale: float):
        if not scale > 0:
            raise ValueError(f"operator scale must be > 0, got {scale}")
        super().__init__(base.domain_shape)
        self.base = base
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) / self.scale

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.base.adjoint(y) / self.scale

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # geometry of the physical operator (views, factor, mask, ...)
            return getattr(super().__getattr__("base"), name)


def unit_norm(op: LinearOperator, tol: float = 1e-4) -> tuple[LinearOperator, float]:
    """(A / ||A||, ||A||) with ||A|| by power iteration; A itself and 1.0 when ||A|| is already 1
    within `tol` (identity, masks, normalised blurs and coil maps: exactly 1 by construction)."""
    c = op.norm()
    if abs(c - 1.0) <= tol:
        return op, 1.0
    return ScaledOperator(op, c), c
