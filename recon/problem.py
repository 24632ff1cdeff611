"""A reconstruction problem: operator, measurements, network input choices, reference."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from recon.operators.base import LinearOperator, Operator


# the image-shaped network inputs `Problem.initial_image` builds ('fbp': CT only)
IMAGE_INPUTS = ("auto", "adjoint", "fbp", "measurements")


@dataclass
class Problem:
    """Everything a solver needs to reconstruct one scan.

    Images are network-format (1, C, H, W) float32; MRI uses C=2 (real, imag).
    `ground_truth` is optional (measured data without reference). PSNR/SSIM are computed on
    `display(x)` (magnitude for MRI) against `display(ground_truth)` with `data_range`.

    One scale for every task (DESIGN.md): `operator` has unit norm (||A|| = 1, power iteration)
    and `measurements` are on its scale; `measurement_scale` c keeps the physical one:
    physical y = c * measurements, physical operator = c * operator. FBP and the degraded image
    use the physical values, so images stay on the image's scale.
    """

    task: str
    operator: Operator
    measurements: torch.Tensor
    ground_truth: torch.Tensor | None = None
    data_range: float = 1.0
    # filtered back-projection of a *physical* sinogram (CT), on the image's scale
    fbp: Callable[[torch.Tensor], torch.Tensor] | None = None
    measurement_scale: float = 1.0  # c = ||physical A||: physical y = c * measurements
    # (H, W) region the papers score inside (CT: the reconstruction disc); None = whole frame
    metric_mask: torch.Tensor | None = None
    default_input: str = "measurements"  # what initial_image('auto') gives (the task's choice)
    noise_sigma: float | None = None  # noise std of the physical measurements, if known
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.operator.domain_shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.operator.domain_shape)

    @property
    def is_complex(self) -> bool:
        """Complex images as 2 real channels (MRI): the measurements are complex."""
        return self.channels == 2 and self.measurements.is_complex()

    def to(self, device: torch.device | str) -> "Problem":
        dev = torch.device(device)
        gt = None if self.ground_truth is None else self.ground_truth.to(dev)
        mask = None if self.metric_mask is None else self.metric_mask.to(dev)
        return replace(self, operator=self.operator.to(dev), measurements=self.measurements.to(dev),
                       ground_truth=gt, metric_mask=mask)

    def display(self, x: torch.Tensor) -> torch.Tensor:
        """The image people look at and metrics use: magnitude for MRI, x itself otherwise."""
        if self.is_complex:
            return torch.sqrt(x[:, 0:1] ** 2 + x[:, 1:2] ** 2)
        return x

    def score(self, image: torch.Tensor, with_ssim: bool = True) -> dict[str, torch.Tensor]:
        """The task's quality scores of `image` against the ground truth (0-d tensors): 'psnr' and,
        when `with_ssim`, 'ssim' as the papers define them for this task; tasks that score inside a
        mask add the whole-frame values as 'psnr_full' / 'ssim_full'. Empty without ground truth."""
        from recon.metrics import psnr, ssim

        if self.ground_truth is None:
            return {}
        shown = self.display(image)
        reference = self.display(self.ground_truth.to(shown.device))
        mask, dr = self.metric_mask, self.data_range
        out = {"psnr": psnr(shown, reference, dr, mask=mask)}
        if mask is not None:
            out["psnr_full"] = psnr(shown, reference, dr)
        if with_ssim:
            out["ssim"] = ssim(shown, reference, dr, mask=mask)
            if mask is not None:
                out["ssim_full"] = ssim(shown, reference, dr)
        return out

    def data_fidelity(self, x: torch.Tensor) -> torch.Tensor:
        """1/2 ||A x - y||_2^2 (eq. 3 of the DIP-for-CT chapter)."""
        r = self.operator(x) - self.measurements
        if r.is_complex():
            return 0.5 * torch.sum(r.real ** 2 + r.imag ** 2)
        return 0.5 * torch.sum(r ** 2)

    @torch.no_grad()
    def physical_measurements(self) -> torch.Tensor:
        """y on its physical scale (the sinogram in pixel units, the low-resolution image)."""
        return self.measurements * self.measurement_scale

    @torch.no_grad()
    def adjoint_image(self) -> torch.Tensor:
        """A^H y; for non-linear operators, the measurements themselves when shapes match."""
        if isinstance(self.operator, LinearOperator):
            return self.operator.adjoint(self.measurements)
        if tuple(self.measurements.shape) == self.image_shape:
            return self.measurements.clone()
        raise ValueError(f"task {self.task!r}: no adjoint for a non-linear operator with "
                         f"measurements of shape {tuple(self.measurements.shape)}")

    @torch.no_grad()
    def physical_adjoint_image(self) -> torch.Tensor:
        """A^H y with the physical operator and data (c^2 A^H y): MRI's zero-filled image."""
        return self.adjoint_image() * self.measurement_scale ** 2

    @torch.no_grad()
    def measurement_image(self) -> torch.Tensor:
        """y itself when it is an image of the right shape (denoise, inpaint, deblur), else A^H y."""
        if tuple(self.measurements.shape) == self.image_shape and not self.measurements.is_complex():
            return self.physical_measurements()
        return self.adjoint_image()

    @torch.no_grad()
    def fbp_image(self) -> torch.Tensor:
        if self.fbp is None:
            raise ValueError(f"task {self.task!r} has no filtered back-projection; use 'adjoint'")
        return self.fbp(self.physical_measurements())

    @torch.no_grad()
    def initial_image(self, kind: str) -> torch.Tensor:
        """Image-shaped network input: 'auto' (the task's default, `default_input`: A^H y for MRI
        and CT as in the aSeqDIP paper, Sec. 3.2, with the unit-norm A; y for restoration),
        'adjoint' (A^H y), 'fbp' (CT) or 'measurements' (y)."""
        if kind == "auto":
            kind = self.default_input
        if kind == "adjoint":
            return self.adjoint_image()
        if kind == "fbp":
            return self.fbp_image()
        if kind == "measurements":
            return self.measurement_image()
        raise ValueError(f"unknown input kind {kind!r}; expected one of {', '.join(map(repr, IMAGE_INPUTS))}")
