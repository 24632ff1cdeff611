"""2-D parallel-beam CT: ray transform as a sparse matrix, its exact adjoint, FBP, post-log data.

Geometry is that of `skimage.transform.radon`: the rotation axis is pixel (N//2, N//2); for
view angle theta (degrees) detector d (offset u = d - D//2) integrates the image sampled
bilinearly at unit steps t along the ray
    x = N//2 + u cos(theta) + t sin(theta),   y = N//2 - u sin(theta) + t cos(theta),
for D samples t = -D//2 .. D - 1 - D//2, with the image zero outside its support. circle=True
uses D = N detectors (the inscribed disc is the field of view), circle=False D = ceil(sqrt(2) N).
Unit pixel size, so sinogram values equal skimage's. Sinograms are (B, 1, views, detectors).

The matrix A (views*D x N*N) and its transpose are stored as CSR buffers (so `.to(device)` moves
them); `ray_transform` keeps the operators of the last few geometries, so a warm worker running
job after job of one geometry builds the matrix once (`operator_builds()` counts the builds).
Forward multiplies by A, adjoint by A^T, and the autograd backward of each uses the other, so the
adjoint is exact by construction on CPU and CUDA.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from recon.operators.base import LinearOperator

__all__ = ["RayTransform", "ray_transform", "operator_builds", "equispaced_angles", "fbp_filter", "FILTERS",
           "post_log_measurements", "LODOPAB_ATTENUATION", "LODOPAB_MIN_PHOTONS", "LODOPAB_PHOTONS"]

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

# mu_max * field of view = 81.35858 m^-1 * 0.26 m: images in [0, 1] scaled to attenuation
# coefficients as in LoDoPaB-CT (Leuschner et al. 2021, Sci. Data 8:109, "Methods").
LODOPAB_ATTENUATION = 81.35858 * 0.26
# mean photons per detector bin without attenuation in LoDoPaB-CT's low-dose data, N0 = 4096
# (same section); the order of magnitude, ~1e4, of low-dose CT benchmarks
LODOPAB_PHOTONS = 4096.0
# zero photon counts are replaced by 0.1 before the log, as in LoDoPaB-CT (same section).
LODOPAB_MIN_PHOTONS = 0.1


_NORMS: dict[tuple, float] = {}  # RayTransform.norm by geometry
# Operators kept by geometry (warm workers; see ray_transform): a cohort has few geometries, and
# one at 512 px / 30 views takes ~6 s and ~228 MiB to build.
OPERATOR_CACHE_SIZE = 4


def equispaced_angles(views: int) -> np.ndarray:
    """theta = linspace(0, 180, views, endpoint=False) degrees, as skimage's default."""
    if int(views) != views or views < 1:
        raise ValueError(f"views must be a positive integer, got {views}")
    return np.linspace(0.0, 180.0, int(views), endpoint=False)


def _view_block(n: int, d: int, theta_deg: float) -> sp.csr_matrix:
    """Rows of A for one view: bilinear samples along each of the d rays."""
    a = math.radians(theta_deg)
    u = (np.arange(d) - d // 2)[:, None].astype(np.float64)
    t = (np.arange(d) - d // 2)[None, :].astype(np.float64)
    x = n // 2 + u * math.cos(a) + t * math.sin(a)
    y = n // 2 - u * math.sin(a) + t * math.cos(a)
    rows = np.broadcast_to(np.arange(d)[:, None], x.shape)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    r_parts, c_parts, w_parts = [], [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xx, yy, w = x0 + dx, y0 + dy, wx * wy
            ok = (xx >= 0) & (xx < n) & (yy >= 0) & (yy < n) & (w > 0)
            r_parts.append(rows[ok])
            c_parts.append((yy[ok] * n + xx[ok]).astype(np.int64))
            w_parts.append(w[ok])
    coo = sp.coo_matrix((np.concatenate(w_parts), (np.concatenate(r_parts), np.concatenate(c_parts))),
                        shape=(d, n * n))
    return coo.tocsr()  # sums duplicate entries


def _csr_parts(m: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row pointers, column indices, values) of a CSR matrix as dense tensors."""
    m = m.astype(np.float32)
    m.sort_indices()
    index = np.int32 if m.nnz < 2 ** 31 - 1 else np.int64  # int32 halves the index memory
    return (torch.from_numpy(m.indptr.astype(index)), torch.from_numpy(m.indices.astype(index)),
            torch.from_numpy(m.data))


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape) -> torch.Tensor:
    """A CSR view of stored parts (no copy). The parts are kept as ordinary buffers so the
    module deep-copies, pickles and moves between devices like any other."""
    with warnings.catch_warnings():  # torch flags CSR as beta; the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)


def system_matrix(n: int, d: int, angles: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """The CSR parts of A and A^T for a geometry ({a,at}_{crow,col,val})."""
    a = sp.vstack([_view_block(n, d, th) for th in angles], format="csr")
    return {f"{name}_{part}": value for name, m in (("a", a), ("at", a.T.tocsr()))
            for part, value in zip(("crow", "col", "val"), _csr_parts(m))}


def fbp_filter(size: int, name: str = "ramp") -> np.ndarray:
    """Frequency response of the FBP filter for a padded length `size`, as skimage builds it:
    the ramp from the Fourier transform of its band-limited spatial kernel (Kak & Slaney 1988,
    Ch. 3, eq. 61), optionally apodised by a window."""
    if name not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {name!r}")
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    h = 2 * np.real(np.fft.fft(f))
    if name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        h[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        h *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif name == "hamming":
        h *= np.fft.fftshift(np.hamming(size))
    elif name == "hann":
        h *= np.fft.fftshift(np.hanning(size))
    return h


class _SparseMatmul(torch.autograd.Function):
    """y = M x with dL/dx = M^T dL/dy, M^T given explicitly (deterministic, no transposes)."""

    @staticmethod
    def forward(ctx, x, m, mt):  # noqa: D401
        ctx.mt = mt
        return torch.sparse.mm(m, x)

    @staticmethod
    def backward(ctx, grad):
        return torch.sparse.mm(ctx.mt, grad.contiguous()), None, None


class RayTransform(LinearOperator):
    """Parallel-beam ray transform A: (B, 1, N, N) -> (B, 1, views, detectors)."""

    def __init__(self, size: int, views: int | None = None, angles=None, circle: bool = True,
                 detectors: int | None = None, filter_name: str = "ramp"):
        if int(size) != size or size < 2:
            raise ValueError(f"CT image size must be an integer >= 2, got {size}")
        n = int(size)
        if (views is None) == (angles is None):
            raise ValueError("give exactly one of views (equispaced over 180 degrees) or angles (degrees)")
        theta = equispaced_angles(views) if angles is None else np.asarray(angles, dtype=np.float64).reshape(-1)
        if theta.size < 1 or not np.all(np.isfinite(theta)):
            raise ValueError("angles must be a non-empty list of finite numbers (degrees)")
        d = int(detectors) if detectors is not None else (n if circle else math.ceil(math.sqrt(2) * n))
        if d < 1:
            raise ValueError(f"detectors must be >= 1, got {detectors}")
        super().__init__((1, 1, n, n))
        self.size, self.detectors, self.circle = n, d, bool(circle)
        self.angles = theta
        for name, value in system_matrix(n, d, tuple(float(t) for t in theta)).items():
            self.register_buffer(name, value, persistent=False)
        self.filter_name = filter_name
        # skimage pads the (circle-to-square padded) sinogram to a power of two >= 64
        diag = math.ceil(math.sqrt(2) * d) if circle else d
        self.padded = max(64, int(2 ** math.ceil(math.log2(2 * diag))))
        h = fbp_filter(self.padded, filter_name)[: self.padded // 2 + 1]
        self.register_buffer("freq_filter", torch.from_numpy(h.astype(np.float32)))
        r = n // 2
        yy, xx = np.mgrid[:n, :n] - r
        self.register_buffer("disc", torch.from_numpy(((yy ** 2 + xx ** 2) <= r ** 2).astype(np.float32)))

    @property
    def views(self) -> int:
        return int(self.angles.size)

    @property
    def geometry(self) -> tuple:
        """What the matrix depends on: size, detectors, circle and the angles (degrees)."""
        return (self.size, self.detectors, self.circle, tuple(np.round(self.angles, 9).tolist()))

    def norm(self, iterations: int = 100, seed: int = 0, tol: float = 1e-7) -> float:
        """||A|| by power iteration, computed once per geometry (it costs ~100 products at 512 px;
        warm workers reuse it)."""
        key = (self.geometry, iterations, seed, tol)
        if key not in _NORMS:
            _NORMS[key] = super().norm(iterations, seed, tol)
        return _NORMS[key]

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (1, 1, self.views, self.detectors)

    @property
    def matrix(self) -> torch.Tensor:
        """A as a sparse CSR tensor (views*detectors, N*N)."""
        return _csr(self.a_crow, self.a_col, self.a_val, (self.views * self.detectors, self.size ** 2))

    @property
    def matrix_t(self) -> torch.Tensor:
        """A^T as a sparse CSR tensor (N*N, views*detectors)."""
        return _csr(self.at_crow, self.at_col, self.at_val, (self.size ** 2, self.views * self.detectors))

    def _matmul(self, m: torch.Tensor, mt: torch.Tensor, x: torch.Tensor, out_shape) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b * c, -1).t().to(m.dtype).contiguous()
        out = _SparseMatmul.apply(flat, m, mt)
        return out.t().reshape(b, c, *out_shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(self.matrix, self.matrix_t, x, (self.views, self.detectors))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._matmul(self.matrix_t, self.matrix, y, (self.size, self.size))

    def filter_sinogram(self, y: torch.Tensor) -> torch.Tensor:
        """Filter each projection along the detector axis (zero-padded to avoid wrap-around)."""
        spec = torch.fft.rfft(y, n=self.padded, dim=-1) * self.freq_filter.to(y.dtype)
        return torch.fft.irfft(spec, n=self.padded, dim=-1)[..., : self.detectors]

    def fbp(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection pi/(2 V) A^T (h * y), zero outside the disc when circle=True
        (the normalisation and masking of skimage.transform.iradon)."""
        x = self.adjoint(self.filter_sinogram(y)) * (math.pi / (2 * self.views))
        return x * self.disc if self.circle else x


def ray_transform(size: int, views: int | None = None, angles=None, circle: bool = True,
                  detectors: int | None = None, filter_name: str = "ramp") -> RayTransform:
    """`RayTransform(...)`, built once per geometry in this process (the last OPERATOR_CACHE_SIZE
    geometries are kept): jobs of one geometry, in a pack or one after another, share one
    operator. It is returned on the CPU (a job moves it to its device in place, as Problem.to
    does with every operator), so a worker runs one job or pack at a time on it."""
    angle_key = None if angles is None else tuple(float(a) for a in np.asarray(angles, dtype=np.float64).reshape(-1))
    return _shared_ray_transform(size, views, angle_key, bool(circle), detectors, filter_name).to("cpu")


@functools.lru_cache(maxsize=OPERATOR_CACHE_SIZE)
def _shared_ray_transform(size, views, angles, circle, detectors, filter_name) -> RayTransform:
    return RayTransform(size, views=views, angles=angles, circle=circle, detectors=detectors, filter_name=filter_name)


def operator_builds() -> int:
    """How many operators (system matrices) `ray_transform` has built in this process."""
    return _shared_ray_transform.cache_info().misses


def post_log_measurements(sinogram: torch.Tensor, size: int, photons: float | None = None,
                          attenuation: float = LODOPAB_ATTENUATION, generator: torch.Generator | None = None,
                          min_photons: float = LODOPAB_MIN_PHOTONS) -> torch.Tensor:
    """Post-log data y ~ A x from clean line integrals `sinogram` = A x (pixel units).

    With pixel size fov/N, the physical line integral is c A x with c = attenuation / N. Counts
    are Poisson(I0 exp(-c A x)) (monoenergetic source, no scatter: eq. in Sec. 4 of the aSeqDIP
    paper); y = -log(max(counts, min_photons) / I0) / c returns to pixel units, so the operator
    stays A. photons=None gives the noise-free post-log data (the paper's setting, I0 "assumed
    1 for simplicity").
    """
    if photons is None:
        return sinogram.clone()
    if photons <= 0:
        raise ValueError(f"photons (I0) must be > 0, got {photons}")
    if attenuation <= 0:
        raise ValueError(f"attenuation must be > 0, got {attenuation}")
    c = attenuation / size
    rate = (photons * torch.exp(-c * sinogram.double())).cpu()
    counts = torch.poisson(rate, generator=generator).to(sinogram.device)
    y = -torch.log(torch.clamp(counts, min=min_photons) / photons) / c
    return y.to(sinogram.dtype)
