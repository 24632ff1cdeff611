"""Deep Decoder (Heckel & Hand 2019; tutorial Sec. III-C1; CT chapter eq. 8).

Layer i = 0..d-1: 1x1 conv (no bias) -> bilinear upsampling x2 (all but the last layer) ->
ReLU -> channel-wise normalisation (BatchNorm2d with affine parameters, which on a batch of one
normalises each channel over the image); then a 1x1 conv to the output channels and a sigmoid.
No spatial convolutions: the spatial structure comes from the fixed upsampling only.

The input is a fixed small random tensor, not an image: for an H x W output it has shape
`net.input_shape(H, W)` = (1, in_channels, ceil(H / 2^(d-1)), ceil(W / 2^(d-1))); Heckel & Hand
draw it from U(0, 1) scaled by 1/10 and keep it fixed. Calling `input_shape(H, W)` also records
(H, W) as the output size: the upsampled map (a multiple of 2^(d-1)) is cropped to it, so sizes
that are not multiples of 2^(d-1) work. `forward(z, output_size=(H, W))` overrides it per call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from recon.nets.layers import NORMS, UPSAMPLING, check_choice, output_activation, upsample
from recon.nets.layers import norm as make_norm


class DeepDecoder(nn.Module):
    """Deep Decoder with `layers` layers of `channels` channels; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, layers: int = 6, channels: int = 128,
                 upsampling: str = "bilinear", norm: str = "batch", groups: int = 8,
                 sigmoid: bool = True):
        super().__init__()
        check_choice("upsampling", upsampling, UPSAMPLING)
        check_choice("norm", norm, NORMS)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers, self.in_channels = layers, in_channels
        self.output_size: tuple[int, int] | None = None
        blocks = []
        for i in range(layers):
            block = [nn.Conv2d(in_channels if i == 0 else channels, channels, 1, bias=False)]
            if i < layers - 1:
                block.append(upsample(upsampling))
            block += [nn.ReLU(), make_norm(norm, channels, groups)]
            blocks.append(nn.Sequential(*block))
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.out_act = output_activation(sigmoid)

    @property
    def factor(self) -> int:
        return 2 ** (self.layers - 1)

    def input_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of the fixed input for an H x W output; records (H, W) as the output size."""
        self.output_size = (int(height), int(width))
        return (1, self.in_channels, math.ceil(height / self.factor), math.ceil(width / self.factor))

    def forward(self, z: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.out_act(self.head(self.body(z)))
        h, w = output_size or self.output_size or x.shape[-2:]
        if h > x.shape[-2] or w > x.shape[-1]:
            raise ValueError(f"deep decoder input {tuple(z.shape)} gives {tuple(x.shape[-2:])} pixels, "
                             f"fewer than the output size {(h, w)}; build it with input_shape(H, W)")
        return x[..., :h, :w]
