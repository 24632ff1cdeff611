"""Building blocks shared by the networks: padding, norms, convolutions, size padding/cropping."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batch", "group", "none")
UPSAMPLING = ("nearest", "bilinear")
PADDING = ("reflection", "zero")


class SamePad(nn.Module):
    """Reflection padding by `p` pixels; replicate padding where a map is too small to reflect."""

    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "reflect" if min(x.shape[-2:]) > self.p else "replicate"
        return F.pad(x, (self.p,) * 4, mode=mode)


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = True,
         pad: str = "reflection") -> nn.Module:
    """Conv2d keeping the size (stride 1) or giving ceil(size/2) (stride 2)."""
    p = (kernel - 1) // 2
    if pad == "reflection" and p > 0:
        return nn.Sequential(SamePad(p), nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0, bias=bias))
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=p, bias=bias)


def norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """Batch norm (Ulyanov et al.), group norm (batch-size independent) or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, groups), channels)
    return nn.Identity()


def act() -> nn.Module:
    # LeakyReLU(0.2): Ulyanov et al. 2018 supplement and the U-Net of the CT chapter (Sec. 6.2)
    return nn.LeakyReLU(0.2, inplace=False)


def upsample(mode: str) -> nn.Module:
    # nearest by default: bilinear backward is non-deterministic on GPU (CT chapter, footnote 8)
    if mode == "bilinear":
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    return nn.Upsample(scale_factor=2, mode="nearest")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad H, W up to a multiple (reflect where possible) so every stride-2 level halves exactly.

    At least 2 * multiple, so the coarsest map is >= 2x2 (batch norm needs > 1 value per channel).
    Returns the padded tensor and (top, bottom, left, right) for `crop`.
    """
    h, w = x.shape[-2:]
    ph = max(math.ceil(h / multiple), 2) * multiple - h
    pw = max(math.ceil(w / multiple), 2) * multiple - w
    pads = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    if ph == 0 and pw == 0:
        return x, pads
    top, bottom, left, right = pads
    # reflect needs pad < size; repeat in steps so any size works
    while any((top, bottom, left, right)):
        h, w = x.shape[-2:]
        t, b = min(top, h - 1), min(bottom, h - 1)
        le, r = min(left, w - 1), min(right, w - 1)
        mode = "reflect" if min(h, w) > 1 else "replicate"
        if mode == "replicate":
            t, b, le, r = top, bottom, left, right
        x = F.pad(x, (le, r, t, b), mode=mode)
        top, bottom, left, right = top - t, bottom - b, left - le, right - r
    return x, pads


def crop(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = pads
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


def output_activation(sigmoid: bool) -> nn.Module:
    return nn.Sigmoid() if sigmoid else nn.Identity()


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {', '.join(choices)}")


def check_options(upsampling: str, norm: str, pad: str, scales: int) -> None:
    """The options every encoder-decoder preset shares, checked with the valid choices named."""
    check_choice("upsampling", upsampling, UPSAMPLING)
    check_choice("norm", norm, NORMS)
    check_choice("pad", pad, PADDING)
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")


def per_scale(name: str, value, scales: int, what: str = "scale") -> list[int]:
    """An int repeated per scale, or a list of length `scales`."""
    if isinstance(value, int):
        return [value] * scales
    value = list(value)
    if len(value) != scales:
        raise ValueError(f"{name} has {len(value)} entries; expected one per {what} ({scales})")
    return [int(v) for v in value]
