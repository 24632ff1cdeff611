"""Networks for untrained-network reconstruction: presets by name.

    net = build_network("skip", in_channels=32, out_channels=3, upsampling="bilinear")

Families: `SkipNet` (Ulyanov et al. 2018), `UNet` (CT chapter / Barbano et al. 2022b),
`DeepDecoder` (Heckel & Hand 2019; its input is a fixed small tensor of shape
`net.input_shape(H, W)`, see recon/nets/deep_decoder.py).

Output sigmoid: every preset uses sigmoid="auto", i.e. a sigmoid unless the output has 2
channels (MRI real/imag, which take negative values); pass sigmoid=True/False to override.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from recon.nets.deep_decoder import DeepDecoder
from recon.nets.skip import SkipNet
from recon.nets.unet import UNet

__all__ = ["PRESETS", "Preset", "build_network", "count_parameters", "describe_presets",
           "SkipNet", "UNet", "DeepDecoder"]


@dataclass(frozen=True)
class Preset:
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


PRESETS: dict[str, Preset] = {
    # Ulyanov et al. 2018, supplement (denoising / restoration architecture): 5 scales,
    # n_d = n_u = 128, n_s = 4, k_d = k_u = 3, k_s = 1, reflection padding, LeakyReLU, batch norm,
    # sigmoid output. They upsample bilinearly; we default to nearest for GPU determinism
    # (DESIGN.md; CT chapter footnote 8) — pass upsampling="bilinear" for their exact setting.
    "skip": Preset(SkipNet, dict(scales=5, channels_down=128, channels_up=128, channels_skip=4,
                                 kernel_down=3, kernel_up=3, kernel_skip=1),
                   "DIP skip network, Ulyanov et al. 2018 (5 scales, 128 ch, skip 4)"),
    # CT chapter Sec. 6.2: U-Net following Barbano et al. 2022b, six scales of 128 channels,
    # skips at the two lowest resolution levels, LeakyReLU, nearest upsampling, ~3M parameters.
    # The aSeqDIP paper only says "U-Net [19]" (Ronneberger et al. 2015) and gives no layer
    # details, so its solvers use this network too.
    "unet": Preset(UNet, dict(scales=6, channels=128, skip_channels=(0, 0, 0, 4, 4)),
                   "U-Net of the CT chapter Sec. 6.2 (6 scales, 128 ch, skips at 2 lowest levels)"),
    # Hybrid DIP-ADMM thesis Sec. 3.3: "the similar encoder-decoder architecture to deep image
    # prior ... n_u = n_d = [16, 32, 64, 128, 128], n_s = [0, 0, 0, 0, 0], k_d = k_u = 3": Ulyanov
    # et al.'s network with five scales and no skip branches (other settings as Ulyanov et al.'s).
    "dip-admm": Preset(SkipNet, dict(scales=5, channels_down=[16, 32, 64, 128, 128],
                                     channels_up=[16, 32, 64, 128, 128], channels_skip=0,
                                     kernel_down=3, kernel_up=3),
                       "DIP-ADMM thesis Sec. 3.3 encoder-decoder (5 scales, 16-128 ch, no skips)"),
    # Heckel & Hand 2019 / tutorial Sec. III-C1: six layers of 128 channels (100,224 parameters
    # for RGB output), bilinear upsampling.
    "deep-decoder": Preset(DeepDecoder, dict(layers=6, channels=128),
                           "Deep Decoder, Heckel & Hand 2019 (6 layers, 128 ch)"),
    # Small networks for CPU runs, tests and the demo (not from a paper).
    "skip-small": Preset(SkipNet, dict(scales=3, channels_down=16, channels_up=16, channels_skip=4),
                         "small skip network for CPU (3 scales, 16 ch, skip 4)"),
    # The chapter's U-Net (Sec. 6.2) at CPU scale: 4 scales of 32 channels, skips (4 channels) at
    # the two lowest resolution levels as in the chapter; for 32-64 px images (the demo, tuning).
    "unet-small": Preset(UNet, dict(scales=4, channels=32, skip_channels=(0, 4, 4)),
                         "the chapter's U-Net at CPU scale (4 scales, 32 ch, skips at 2 lowest levels)"),
    "deep-decoder-small": Preset(DeepDecoder, dict(layers=4, channels=32),
                                 "small Deep Decoder for CPU (4 layers, 32 ch)"),
    "tiny": Preset(SkipNet, dict(scales=2, channels_down=8, channels_up=8, channels_skip=4),
                   "fastest skip network for unit tests (2 scales, 8 ch, skip 4)"),
}


def build_network(preset: str, in_channels: int, out_channels: int, **overrides: Any) -> nn.Module:
    """Build a preset network; `overrides` replace constructor arguments (validated by name)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; expected one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    allowed = [p for p in inspect.signature(spec.cls.__init__).parameters
               if p not in ("self", "in_channels", "out_channels")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"network preset {preset!r} ({spec.cls.__name__}): unknown option(s) "
                         f"{', '.join(unknown)}; expected some of {', '.join(allowed)}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"network preset {preset!r}: {name} must be a positive integer, got {value!r}")
    kwargs = {**spec.kwargs, "sigmoid": "auto", **overrides}
    if kwargs["sigmoid"] == "auto":
        kwargs["sigmoid"] = out_channels != 2
    try:
        return spec.cls(in_channels, out_channels, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"network preset {preset!r}: {err}") from err


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def describe_presets(in_channels: int = 32, out_channels: tuple[int, ...] = (1, 2, 3),
                     show: bool = True) -> dict[str, dict[int, int]]:
    """Parameter count of every preset per output channel count; prints a table when `show`.

    Skip networks and U-Nets take `in_channels` (32 noise channels by default, Ulyanov et al.);
    Deep Decoders take their own channel count as input.
    """
    counts: dict[str, dict[int, int]] = {}
    for name, spec in PRESETS.items():
        cin = spec.kwargs["channels"] if spec.cls is DeepDecoder else in_channels
        counts[name] = {c: count_parameters(build_network(name, cin, c)) for c in out_channels}
    if show:
        head = "".join(f"{f'out={c}':>12}" for c in out_channels)
        print(f"parameters (input channels: {in_channels}; Deep Decoders: their own width)")
        print(f"{'preset':<20}{head}  description")
        for name, spec in PRESETS.items():
            row = "".join(f"{counts[name][c]:>12,}" for c in out_channels)
            print(f"{name:<20}{row}  {spec.doc}")
    return counts
