"""Plain U-Net (Ronneberger et al. 2015) as used for DIP in the CT chapter (Sec. 6.2).

The chapter follows the implementation of Barbano et al. 2022b (itself dival's UNet): an input
block (3x3 conv, norm, LeakyReLU), per lower scale a down block (stride-2 3x3 conv, norm, act,
3x3 conv, norm, act), per up step: upsample x2, concatenate a skip branch (1x1 conv of the
encoder features to skip_channels, norm, act) when skip_channels > 0, then norm, 3x3 conv, norm,
act, 3x3 conv, norm, act; a 1x1 output conv and an optional sigmoid. `scales` = number of
resolutions (scales - 1 downsamplings). Barbano et al.'s skip_channels (0, 0, 0, 0, 4, 4) index the
up blocks from the bottleneck; here it is written per encoder scale as (0, 0, 0, 4, 4). Other
differences from that code: a scale with no skip is not
concatenated at all (dival concatenates a zeroed 1-channel map), and the input is padded to a
multiple of 2^(scales-1) and the output cropped back instead of cropping inside the network.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from recon.nets.layers import (act, check_options, conv, crop,
                               output_activation, pad_to_multiple, per_scale, upsample)
from recon.nets.layers import norm as make_norm


class _Up(nn.Module):
    def __init__(self, in_ch, out_ch, enc_ch, skip_ch, k, norm_kind, groups, upsampling, pad, bias):
        super().__init__()
        mk_norm = lambda c: make_norm(norm_kind, c, groups)  # noqa: E731
        self.upsample = upsample(upsampling)
        self.skip = None
        if skip_ch > 0:
            self.skip = nn.Sequential(conv(enc_ch, skip_ch, 1, bias=bias, pad=pad), mk_norm(skip_ch), act())
        self.conv = nn.Sequential(
            mk_norm(in_ch + skip_ch), conv(in_ch + skip_ch, out_ch, k, bias=bias, pad=pad), mk_norm(out_ch), act(),
            conv(out_ch, out_ch, k, bias=bias, pad=pad), mk_norm(out_ch), act())

    def forward(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        if self.skip is not None:
            x = torch.cat([x, self.skip(enc)], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """U-Net with per-scale channels and skip channels; see the module docstring.

    channels: per scale, finest first (an int repeats it over `scales`).
    skip_channels: per up step, finest first (scales - 1 entries: entry i is the skip from encoder
        scale i; the coarsest scale is the bottleneck and has none); 0 = no skip.
    """

    def __init__(self, in_channels: int, out_channels: int, scales: int = 6, channels=128,
                 skip_channels=(0, 0, 0, 4, 4), kernel: int = 3, upsampling: str = "nearest",
                 norm: str = "batch", groups: int = 8, pad: str = "zero", bias: bool = True,
                 sigmoid: bool = True):
        super().__init__()
        check_options(upsampling, norm, pad, scales)
        ch = per_scale("channels", channels, scales)
        sk = per_scale("skip_channels", skip_channels, scales - 1, "up step")
        self.scales = scales
        mk_norm = lambda c: make_norm(norm, c, groups)  # noqa: E731
        self.inc = nn.Sequential(conv(in_channels, ch[0], kernel, bias=bias, pad=pad), mk_norm(ch[0]), act())
        self.down = nn.ModuleList(
            nn.Sequential(conv(ch[i - 1], ch[i], kernel, stride=2, bias=bias, pad=pad), mk_norm(ch[i]), act(),
                          conv(ch[i], ch[i], kernel, bias=bias, pad=pad), mk_norm(ch[i]), act())
            for i in range(1, scales))
        # up step i goes from scale i+1 to scale i and takes the skip of encoder scale i
        self.up = nn.ModuleList(
            _Up(ch[i + 1], ch[i], ch[i], sk[i], kernel, norm, groups, upsampling, pad, bias)
            for i in reversed(range(scales - 1)))
        self.head = conv(ch[0], out_channels, 1, bias=bias, pad=pad)
        self.out_act = output_activation(sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pads = pad_to_multiple(x, 2 ** (self.scales - 1))
        feats = [self.inc(x)]
        for block in self.down:
            feats.append(block(feats[-1]))
        x = feats[-1]
        for block, enc in zip(self.up, reversed(feats[:-1])):
            x = block(x, enc)
        return crop(self.out_act(self.head(x)), pads)
