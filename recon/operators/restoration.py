"""Image-restoration forward models: denoising, inpainting, deblurring, super-resolution.

Every linear operator here acts on network-format images (B, C, H, W) and has an exact
adjoint. Convolutions use circular boundary conditions: the blur is then a circulant
matrix (norm = sum of a non-negative kernel = 1), and the adjoint of the circular padding
folds the wrapped borders back, so `adjoint` is the true transpose of `forward`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recon.operators.base import LinearOperator, Operator

__all__ = [
    "Identity", "Mask", "Blur", "SaturatedBlur", "Downsample",
    "box_mask", "random_pixel_mask", "gaussian_kernel", "motion_kernel", "lanczos2_kernel",
]


def _image_shape(domain_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in domain_shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise ValueError(f"domain_shape must be (1, C, H, W), got {domain_shape}")
    return shape


# ----------------------------------------------------------------------------- masks

def box_mask(height: int, width: int, hole_ratio: float) -> torch.Tensor:
    """Float mask (1 = observed) with a centred missing box of area ~ hole_ratio * H * W.

    The hole keeps the image's aspect ratio (side = sqrt(HIAR) * side), as the central-region
    masks of the aSeqDIP paper (Table 1, HIAR in {0.1, 0.25}).
    """
    if not 0.0 < hole_ratio < 1.0:
        raise ValueError(f"hole_ratio must lie in (0, 1), got {hole_ratio}")
    hh = max(1, round(height * math.sqrt(hole_ratio)))
    hw = max(1, round(width * math.sqrt(hole_ratio)))
    top, left = (height - hh) // 2, (width - hw) // 2
    mask = torch.ones(height, width)
    mask[top:top + hh, left:left + hw] = 0.0
    return mask


def random_pixel_mask(height: int, width: int, missing: float, generator: torch.Generator) -> torch.Tensor:
    """Float mask with exactly round(missing * H * W) pixels missing, chosen uniformly."""
    if not 0.0 < missing < 1.0:
        raise ValueError(f"missing must lie in (0, 1), got {missing}")
    n = height * width
    drop = torch.randperm(n, generator=generator)[: round(missing * n)]
    mask = torch.ones(n)
    mask[drop] = 0.0
    return mask.reshape(height, width)


# ---------------------------------------------------------------------------- kernels

def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised isotropic Gaussian kernel (size x size, size odd)."""
    _check_odd(size, "kernel_size")
    if sigma <= 0:
        raise ValueError(f"kernel_sigma must be > 0, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def motion_kernel(size: int, length: float | None = None, angle: float = 45.0) -> torch.Tensor:
    """Normalised linear-motion kernel: a segment of `length` px at `angle` degrees, antialiased.

    Points sampled densely along the segment are splatted bilinearly onto the grid.
    """
    _check_odd(size, "kernel_size")
    length = float(size if length is None else length)
    if not 0 < length <= size:
        raise ValueError(f"motion length must lie in (0, kernel_size={size}], got {length}")
    n = max(2, int(4 * length) + 1)
    t = torch.linspace(-length / 2, length / 2, n, dtype=torch.float64)
    a = math.radians(angle)
    c = size // 2
    ys, xs = c - t * math.sin(a), c + t * math.cos(a)
    k = torch.zeros(size, size, dtype=torch.float64)
    y0, x0 = ys.floor(), xs.floor()
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            w = (1 - (ys - yy).abs()) * (1 - (xs - xx).abs())
            ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            k.index_put_((yy[ok].long(), xx[ok].long()), w[ok], accumulate=True)
    return (k / k.sum()).float()


def lanczos2_kernel(factor: int) -> tuple[torch.Tensor, int]:
    """Separable Lanczos-2 antialiasing kernel for decimation by `factor`, and its left offset.

    Low-res pixel j averages the high-res block [j*f, (j+1)*f) around its centre (f-1)/2; the
    kernel is Lanczos-2 stretched by f. DIP's public super-resolution code uses this kernel
    (`Downsampler(kernel_type='lanczos2', phase=0.5)`, Ulyanov et al. 2018); the paper names none.
    Returns the 1-D taps and p_min, the tap position (relative to j*f) of the first tap.
    """
    f = int(factor)
    c = (f - 1) / 2
    p_min, p_max = math.floor(c - 2 * f) + 1, math.ceil(c + 2 * f) - 1
    p = torch.arange(p_min, p_max + 1, dtype=torch.float64)
    d = (p - c) / f
    k = torch.sinc(d) * torch.sinc(d / 2) * (d.abs() < 2)
    return (k / k.sum()).float(), p_min


def _check_odd(size: int, name: str) -> None:
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd positive integer, got {size}")


# ------------------------------------------------------------------ circular padding

def _pad_circular(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """pads = (left, right, top, bottom), each at most the image size along its axis."""
    return F.pad(x, pads, mode="circular") if any(pads) else x


def _fold(z: torch.Tensor, before: int, after: int, n: int, dim: int) -> torch.Tensor:
    """Adjoint of circular padding along one dim: add the wrapped margins back onto the core."""
    out = z.narrow(dim, before, n)
    if before:
        head = z.narrow(dim, 0, before)  # copies of x[n-before:n]
        zeros = torch.zeros_like(out.narrow(dim, 0, n - before))
        out = out + torch.cat([zeros, head], dim)
    if after:
        tail = z.narrow(dim, before + n, after)  # copies of x[0:after]
        zeros = torch.zeros_like(out.narrow(dim, 0, n - after))
        out = out + torch.cat([tail, zeros], dim)
    return out


def _unpad_circular_adjoint(z: torch.Tensor, pads: tuple[int, int, int, int], h: int, w: int) -> torch.Tensor:
    left, right, top, bottom = pads
    return _fold(_fold(z, top, bottom, h, -2), left, right, w, -1)


# --------------------------------------------------------------------------- operators

class Identity(LinearOperator):
    """Denoising: A = I."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Mask(LinearOperator):
    """Inpainting: A x = m * x with a 0/1 mask shared by all channels (self-adjoint)."""

    def __init__(self, mask: torch.Tensor, channels: int = 1):
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.dim() != 2:
            raise ValueError(f"inpainting mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
        super().__init__((1, channels, *mask.shape))
        self.register_buffer("mask", mask[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask

    @property
    def missing_fraction(self) -> float:
        return float(1.0 - self.mask.mean())


class Blur(LinearOperator):
    """Deblurring: circular convolution of each channel with a (odd-sized) kernel."""

    def __init__(self, kernel: torch.Tensor, domain_shape):
        _, c, h, w = _image_shape(domain_shape)
        kernel = torch.as_tensor(kernel, dtype=torch.float32)
        if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"blur kernel must be 2-D with odd sides, got shape {tuple(kernel.shape)}")
        kh, kw = kernel.shape
        if kh > h or kw > w:
            raise ValueError(f"blur kernel {kh}x{kw} is larger than the image {h}x{w}")
        super().__init__((1, c, h, w))
        # conv2d correlates; flipping makes forward a true convolution with `kernel`
        self.register_buffer("weight", torch.flip(kernel, (0, 1))[None, None])
        self.pads = (kw // 2, kw // 2, kh // 2, kh // 2)

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x.dtype).expand(x.shape[1], 1, *self.weight.shape[-2:]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_pad_circular(x, self.pads), self._w(x), groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = F.conv_transpose2d(y, self._w(y), groups=y.shape[1])
        return _unpad_circular_adjoint(z, self.pads, *self.domain_shape[-2:])


class SaturatedBlur(Operator):
    """Non-linear deblurring model: y = s(k * x) with a smooth saturation s(v) = tanh(g v) / tanh(g).

    s is monotone, differentiable, s(0) = 0, s(1) = 1 and compresses bright values like a
    camera's saturating response. The aSeqDIP paper uses the BKSE network-approximated blur
    (Tran et al. 2021) instead; it needs pretrained weights, so we substitute this analytic
    model, which likewise has no adjoint.
    """

    def __init__(self, kernel: torch.Tensor, domain_shape, gain: float = 2.0):
        super().__init__(domain_shape)
        if gain <= 0:
            raise ValueError(f"saturation gain must be > 0, got {gain}")
        self.blur = Blur(kernel, domain_shape)
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * self.blur(x)) / math.tanh(self.gain)


class Downsample(LinearOperator):
    """Super-resolution: Lanczos-2 antialiasing blur, then decimation by an integer factor.

    forward: strided convolution over the circularly padded image; adjoint: the transposed
    (strided) convolution, with the circular padding folded back.
    """

    def __init__(self, factor: int, domain_shape):
        _, c, h, w = _image_shape(domain_shape)
        if int(factor) != factor or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor}")
        factor = int(factor)
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} must be divisible by factor {factor}")
        taps, p_min = lanczos2_kernel(factor)
        k = taps.numel()
        if k > h or k > w:
            raise ValueError(f"image {h}x{w} too small for factor {factor} (kernel of {k} px)")
        super().__init__((1, c, h, w))
        self.factor = factor
        self.register_buffer("weight", torch.outer(taps, taps)[None, None])
        before = -p_min
        after_h = (h // factor - 1) * factor + k - h - before
        after_w = (w // factor - 1) * factor + k - w - before
        self.pads = (before, after_w, before, after_h)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        _, c, h, w = self.domain_shape
        return (1, c, h // self.factor, w // self.factor)

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x.dtype).expand(x.shape[1], 1, *self.weight.shape[-2:]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_pad_circular(x, self.pads), self._w(x), stride=self.factor, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = F.conv_transpose2d(y, self._w(y), stride=self.factor, groups=y.shape[1])
        return _unpad_circular_adjoint(z, self.pads, *self.domain_shape[-2:])
