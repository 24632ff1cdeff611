"""The DIP "skip" encoder-decoder of Ulyanov et al. 2018 (models/skip.py of their code, supplement Fig. 21).

Per scale i: a skip branch (k_s x k_s conv to n_s[i] channels, norm, act), a down branch
(stride-2 conv to n_d[i], norm, act, conv, norm, act) leading to the deeper scales, whose
output is upsampled by 2 and concatenated with the skip branch, then norm, conv to n_u[i],
norm, act, and a 1x1 conv, norm, act. A final 1x1 conv gives the output, optionally through a
sigmoid. The input is padded (reflect) to a multiple of 2^scales and the output cropped back,
so any image size works and the output has the input's size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from recon.nets.layers import (act, check_options, conv, crop,
                               output_activation, pad_to_multiple, per_scale, upsample)
from recon.nets.layers import norm as make_norm


class _Scale(nn.Module):
    def __init__(self, in_ch, down_ch, up_ch, skip_ch, deeper_ch, kd, ku, ks, norm_kind, groups,
                 upsampling, pad, bias, need_1x1_up):
        super().__init__()
        mk_norm = lambda c: make_norm(norm_kind, c, groups)  # noqa: E731
        self.skip = None
        if skip_ch > 0:
            self.skip = nn.Sequential(conv(in_ch, skip_ch, ks, bias=bias, pad=pad), mk_norm(skip_ch), act())
        self.down = nn.Sequential(
            conv(in_ch, down_ch, kd, stride=2, bias=bias, pad=pad), mk_norm(down_ch), act(),
            conv(down_ch, down_ch, kd, bias=bias, pad=pad), mk_norm(down_ch), act())
        self.upsample = upsample(upsampling)
        layers = [mk_norm(skip_ch + deeper_ch), conv(skip_ch + deeper_ch, up_ch, ku, bias=bias, pad=pad),
                  mk_norm(up_ch), act()]
        if need_1x1_up:
            layers += [conv(up_ch, up_ch, 1, bias=bias, pad=pad), mk_norm(up_ch), act()]
        self.up = nn.Sequential(*layers)


class SkipNet(nn.Module):
    """Ulyanov et al.'s skip network; see the module docstring.

    Args:
        in_channels, out_channels: e.g. 32 noise channels in; 1, 2 (MRI real/imag) or 3 out.
        scales: number of stride-2 downsamplings (5 in Ulyanov et al.).
        channels_down, channels_up, channels_skip: an int for every scale, or a list of `scales`
            entries, finest first (a skip of 0 channels drops that scale's skip branch).
        kernel_down, kernel_up, kernel_skip: conv sizes (3, 3, 1 in Ulyanov et al.).
        upsampling: 'nearest' (default, deterministic on GPU) or 'bilinear'.
        norm: 'batch' (Ulyanov et al.), 'group' or 'none'; groups: GroupNorm groups (gcd with channels).
        pad: 'reflection' (Ulyanov et al.) or 'zero'.
        sigmoid: squash the output to [0, 1].
    """

    def __init__(self, in_channels: int, out_channels: int, scales: int = 5,
                 channels_down=128, channels_up=128, channels_skip=4,
                 kernel_down: int = 3, kernel_up: int = 3, kernel_skip: int = 1,
                 upsampling: str = "nearest", norm: str = "batch", groups: int = 8,
                 pad: str = "reflection", bias: bool = True, need_1x1_up: bool = True,
                 sigmoid: bool = True):
        super().__init__()
        check_options(upsampling, norm, pad, scales)
        down = per_scale("channels_down", channels_down, scales)
        up = per_scale("channels_up", channels_up, scales)
        skip = per_scale("channels_skip", channels_skip, scales)
        self.scales = scales
        self.levels = nn.ModuleList()
        ch = in_channels
        for i in range(scales):
            deeper = up[i + 1] if i < scales - 1 else down[i]
            self.levels.append(_Scale(ch, down[i], up[i], skip[i], deeper, kernel_down, kernel_up,
                                      kernel_skip, norm, groups, upsampling, pad, bias, need_1x1_up))
            ch = down[i]
        self.head = conv(up[0], out_channels, 1, bias=bias, pad=pad)
        self.out_act = output_activation(sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, pads = pad_to_multiple(x, 2 ** self.scales)
        skips = []
        for level in self.levels:
            skips.append(level.skip(x) if level.skip is not None else None)
            x = level.down(x)
        for level, s in zip(reversed(self.levels), reversed(skips)):
            x = level.upsample(x)
            x = level.up(x if s is None else torch.cat([s, x], dim=1))
        return crop(self.out_act(self.head(x)), pads)
