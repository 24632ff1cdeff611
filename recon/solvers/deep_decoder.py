"""Deep Decoder (Heckel & Hand 2019; tutorial Sec. III-C1): an under-parameterised decoder fitted
to the data, min_theta 1/2 ||A f_theta(z) - y||^2, from its own small fixed random input z of
shape `net.input_shape(H, W)` drawn from U(0, 1) / 10 (Heckel & Hand)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon.nets import PRESETS, DeepDecoder as DeepDecoderNet
from recon.solvers import register
from recon.solvers.base import NetworkParams, NetworkSolver, OptionChecks


@dataclass
class DeepDecoderParams(NetworkParams):
    network: str = "deep-decoder"   # 6 layers of 128 channels: tutorial Sec. III-C1
    lr: float = 0.008               # Adam lr 0.008 for the Deep Decoder: tutorial Sec. IV (Fig. 6 setup)
    input: str = "noise"            # its own fixed random input (the only input it takes)
    input_noise_scale: float = 0.1  # z ~ U(0, 1) scaled by 1/10: Heckel & Hand 2019

    def check(self, c: OptionChecks) -> None:
        super().check(c)
        c.one_of("network", tuple(n for n, s in PRESETS.items() if issubclass(s.cls, DeepDecoderNet)),
                 " (a Deep Decoder preset)")
        c.one_of("input", ("noise",), " (its own fixed random input)")


@register
class DeepDecoder(NetworkSolver):
    name = "deep-decoder"
    Params = DeepDecoderParams
    packable = True

    def initial_input(self) -> torch.Tensor:
        p = self.params
        preset = PRESETS[p.network]
        layers, channels = preset.kwargs.get("layers", 6), preset.kwargs.get("channels", 128)
        h, w = self.problem.image_shape[2:]
        factor = 2 ** (layers - 1)
        shape = (1, channels, math.ceil(h / factor), math.ceil(w / factor))
        return p.input_noise_scale * torch.rand(shape, generator=self.generator, device=self.device)

    def __init__(self, problem, params, seed, device):
        super().__init__(problem, params, seed, device)
        expected = self.net.input_shape(*problem.image_shape[2:])  # also fixes the output size
        if tuple(expected) != tuple(self.z.shape):  # pragma: no cover - guards preset drift
            raise RuntimeError(f"deep-decoder: input {tuple(self.z.shape)} does not match the network's {expected}")

    def objective(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        data = self.problem.data_fidelity(x)
        return {"loss": data, "data": data}
