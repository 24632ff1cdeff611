"""Scan loading: one function, `load_scan`, turns a source string into arrays in [0, 1].

Sources
- ``skimage:NAME``: an image bundled with scikit-image (no download; see `SKIMAGE_IMAGES`).
- ``pydicom:FILE`` / ``nibabel:FILE``: a real scan shipped inside an installed package (pydicom's
  test files, e.g. ``pydicom:CT_small.dcm``, ``pydicom:MR_small.dcm``; nibabel's test data, e.g.
  ``nibabel:example4d.nii.gz#slice=12``), so studies run on real CT and MRI without a download.
- NIfTI (nibabel; ``.nii`` / ``.nii.gz``): axial slice ``#slice=K`` (default the middle one) of the
  first volume (``#volume=T`` picks another of a 4-D series).
- PNG / JPEG / BMP (pillow), TIFF (tifffile), ``.npy`` / ``.npz`` (``np.load``, no pickle).
- DICOM (pydicom; ``.dcm`` or any file with the ``DICM`` preamble).
- fastMRI HDF5: ``FILE.h5#slice=K`` (measured k-space plus its reference reconstruction).

A ``#key=value[&key=value]`` suffix selects inside a file: ``slice=K`` for HDF5, multi-frame
DICOM, multi-page TIFF and 3-D ``.npy`` stacks; ``key=NAME`` for an ``.npz`` array.

Intensity rule (recorded in ``meta['normalisation']``): uint8 and bool images are divided by
their type's range (as the DIP papers do for 8-bit images); float images already inside [0, 1]
are kept; anything else (16-bit, DICOM values after rescale slope/intercept, floats outside
[0, 1]) is min/max-normalised to [0, 1], with the original range kept in ``meta``.

fastMRI k-space is larger than its reference (readout oversampling, e.g. 640x368 k-space for a
320x320 ``reconstruction_rss``). We do what fastMRI's data transforms do: inverse centred FFT
per coil, centre-crop the coil images to the reference size, FFT back. ``size`` then resamples
by cropping (or zero-padding) the centre of k-space after a square centre crop, which is the
exact lower-resolution acquisition of the same object; the reference becomes the root sum of
squares of those coil images (at native size it is the file's own reference). K-space and
reference are scaled together so the reference slice has maximum 1.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom")
HDF5_SUFFIXES = (".h5", ".hdf5")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# sources that name data inside installed packages rather than a file path
PACKAGE_SOURCES = ("skimage:", "pydicom:", "nibabel:")


class ScanError(ValueError):
    """A scan source that cannot be loaded; the message names the file, the field and what was expected."""


@dataclass
class ScanData:
    """One loaded scan.

    image: float32 in [0, 1], (H, W) or (H, W, 3) — the ground truth for simulated studies, and
        the reference magnitude for fastMRI files. None only if a source has no image at all.
    kspace: complex64 (coils, H, W) measured, fully sampled k-space (fastMRI), else None.
    reference: float32 (H, W) reference reconstruction that goes with `kspace`, else None
        (for image sources the image itself is the ground truth).
    meta: where it came from (source, format, slice, original shape, normalisation, scale).
    """

    image: np.ndarray | None
    kspace: np.ndarray | None = None
    reference: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[:2]) if self.image is not None else tuple(self.kspace.shape[-2:])


# --------------------------------------------------------------------------------------------
# skimage's bundled images (checked offline with scikit-image 0.26: these need no download)
# --------------------------------------------------------------------------------------------
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
                  "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
                  "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
                  "shepp_logan", "text")


def _load_skimage(name: str) -> tuple[np.ndarray, dict]:
    from skimage import data

    if name not in SKIMAGE_IMAGES:
        raise ScanError(f"skimage:{name}: unknown scikit-image image; expected one of {', '.join(SKIMAGE_IMAGES)}")
    loader = data.shepp_logan_phantom if name == "shepp_logan" else getattr(data, name)
    try:
        arr = np.asarray(loader())
    except Exception as err:  # e.g. an image that needs pooch/network
        raise ScanError(f"skimage:{name}: could not load ({err})") from err
    return arr, {"format": "skimage"}


# files that installed packages ship: pydicom's test files, nibabel's test data
def _package_data_dir(package: str) -> Path:
    if package == "pydicom":
        from pydicom.data import get_testdata_file

        return Path(get_testdata_file("CT_small.dcm")).parent
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def resolve_package_source(source: str) -> str:
    """'pydicom:CT_small.dcm#x' -> '/.../pydicom/data/test_files/CT_small.dcm#x' (other sources unchanged)."""
    package, _, rest = source.partition(":")
    if package not in ("pydicom", "nibabel") or not rest:
        return source
    name, sep, frag = rest.partition("#")
    path = _package_data_dir(package) / name
    if "/" in name or not path.is_file():
        shipped = sorted(f.name for f in _package_data_dir(package).iterdir()
                         if f.name.endswith(DICOM_SUFFIXES + NIFTI_SUFFIXES))
        raise ScanError(f"{source}: {package} ships no file {name!r}; expected a file of "
                        f"{_package_data_dir(package)}, e.g. {', '.join(shipped[:8])}")
    return f"{path}{sep}{frag}"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _split_source(source: str) -> tuple[str, dict[str, str]]:
    """'FILE#slice=3&key=x' -> ('FILE', {'slice': '3', 'key': 'x'})."""
    if "#" not in source or Path(source).expanduser().is_file():  # a '#' inside a real file name
        return source, {}
    path, frag = source.rsplit("#", 1)
    options: dict[str, str] = {}
    for part in filter(None, frag.replace(",", "&").split("&")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("slice", "key", "volume"):
            raise ScanError(f"{source}: bad selector {part!r}; expected '#slice=K', '#key=NAME' or "
                            "'#volume=T' (NIfTI)")
        options[key.strip()] = value.strip()
    return path, options


def _slice_index(options: dict[str, str], n: int, where: str, default: int | None = None) -> int:
    if "slice" not in options:
        if default is None:
            raise ScanError(f"{where}: holds {n} slices; select one with '#slice=K' (0 <= K < {n})")
        return default
    text = options["slice"]
    try:
        k = int(text)
    except ValueError:
        raise ScanError(f"{where}: slice must be an integer, got {text!r}") from None
    if not 0 <= k < n:
        raise ScanError(f"{where}: slice {k} out of range; the file has {n} slices (0..{n - 1})")
    return k


def _no_options(options: dict[str, str], where: str, allowed: tuple[str, ...] = ()) -> None:
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise ScanError(f"{where}: selector {', '.join(extra)} does not apply to this file type")


def _to_unit(arr: np.ndarray, where: str) -> tuple[np.ndarray, dict]:
    """Intensities to float32 [0, 1] by the rule in the module docstring."""
    if arr.dtype == bool:
        return arr.astype(np.float32), {"normalisation": "bool"}
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0), {"normalisation": "uint8/255"}
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ScanError(f"{where}: pixel type {arr.dtype} is not supported; expected integer, float or bool")
    values = arr.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ScanError(f"{where}: image has NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return values.astype(np.float32), {"normalisation": "float in [0,1], kept"}
    if hi <= lo:
        raise ScanError(f"{where}: image is constant ({lo}); nothing to reconstruct")
    out = (values - lo) / (hi - lo)
    return out.astype(np.float32), {"normalisation": "min/max", "value_min": lo, "value_max": hi}


def _channels(arr: np.ndarray, grayscale: bool, where: str) -> np.ndarray:
    """(H, W) or (H, W, 3); drops alpha, converts RGB to gray (ITU-R 709 luma) when asked."""
    from skimage.color import rgb2gray

    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[..., :3]
        return rgb2gray(rgb).astype(np.float32) if grayscale else rgb.astype(np.float32)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray or gray + alpha
        return arr[..., 0]
    raise ScanError(f"{where}: image of shape {arr.shape}; expected (H, W) or (H, W, 3|4) "
                    "(a stack needs '#slice=K')")


def _resize(img: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop to a square, then anti-aliased resize to size x size (skimage)."""
    if size is None:
        return img
    from skimage.transform import resize

    img = _crop_square(img)
    if img.shape[0] != size:
        img = resize(img, (size, size) + img.shape[2:], order=1, anti_aliasing=img.shape[0] > size,
                     preserve_range=True)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _crop_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top:top + s, left:left + s]


def _check_size(size: int | None, channels: int = 1) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ScanError(f"size must be an integer >= 8 pixels, got {size!r}")
    if size is not None:
        check_memory(size, channels)


# a resized image needs a float64 working copy (the resize) and its float32 result
BYTES_PER_PIXEL = 8 + 4


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(size: int, channels: int = 1) -> None:
    """Refuse a size x size image that cannot fit in memory, before allocating it."""
    need = size * size * channels * BYTES_PER_PIXEL
    have = available_memory()
    if have is not None and need > have:
        raise ScanError(f"size {size} px needs about {need / 2 ** 30:.1f} GiB for the image alone, more than the "
                        f"{have / 2 ** 30:.1f} GiB of memory available; expected a smaller size")


# --------------------------------------------------------------------------------------------
# readers: each returns the raw array (any dtype) and meta
# --------------------------------------------------------------------------------------------
def _read_pillow(path: Path, options: dict) -> tuple[np.ndarray, dict]:
    from PIL import Image, UnidentifiedImageError

    _no_options(options, str(path))
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as err:
        raise ScanError(f"{path}: unreadable image ({err}); expected a PNG, JPEG or BMP file") from err
    return arr, {"format": "image"}


def _read_tiff(path: Path, options: dict) -> tuple[np.ndarray, dict]:
    import tifffile

    _no_options(options, str(path), ("slice",))
    try:
        arr = tifffile.imread(path)
    except Exception as err:
        raise ScanError(f"{path}: unreadable TIFF ({err})") from err
    return _select_stack(arr, options, str(path)), {"format": "tiff"}


def _select_stack(arr: np.ndarray, options: dict, where: str) -> np.ndarray:
    """Pick `#slice=K` from a (slices, H, W[, C]) stack; without it the array must be one image."""
    if "slice" in options:
        if arr.ndim not in (3, 4):
            raise ScanError(f"{where}: '#slice' needs a stack (slices, H, W); array has shape {arr.shape}")
        return arr[_slice_index(options, arr.shape[0], where)]
    return arr


# what np.load raises for empty, truncated or corrupt files
_NUMPY_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _np_load(path: Path, where: str):
    if path.stat().st_size == 0:
        raise ScanError(f"{where}: empty file (0 bytes); expected a NumPy .npy or .npz file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle (refused for user input), or a short .npy
        raise ScanError(f"{where}: cannot load without pickle or truncated ({err}); expected a complete "
                        "numeric array") from err
    except _NUMPY_ERRORS as err:
        raise ScanError(f"{where}: unreadable NumPy file, empty, truncated or corrupt ({err})") from err


def _npz_member(loaded, key: str, where: str) -> np.ndarray:
    try:
        return loaded[key]
    except ValueError as err:
        raise ScanError(f"{where}[{key}]: cannot load without pickle or truncated ({err})") from err
    except _NUMPY_ERRORS as err:
        raise ScanError(f"{where}[{key}]: unreadable array, truncated or corrupt ({err})") from err


def _read_numpy(path: Path, options: dict) -> tuple[np.ndarray, dict]:
    where = str(path)
    loaded = _np_load(path, where)
    if isinstance(loaded, np.ndarray):
        _no_options(options, where, ("slice",))
        return _select_stack(loaded, options, where), {"format": "npy"}
    with loaded:
        keys = list(loaded.files)
        _no_options(options, where, ("slice", "key"))
        key = options.get("key") or ("image" if "image" in keys else (keys[0] if len(keys) == 1 else None))
        if key is None or key not in keys:
            wanted = f"key {options['key']!r}" if "key" in options else "an array named 'image' or a single array"
            raise ScanError(f"{where}: expected {wanted}; keys found: {', '.join(keys) or 'none'}")
        arr = _npz_member(loaded, key, where)
    return _select_stack(arr, options, f"{where}[{key}]"), {"format": "npz", "key": key}


def _read_nifti(path: Path, options: dict) -> tuple[np.ndarray, dict]:
    import nibabel

    where = str(path)
    _no_options(options, where, ("slice", "volume"))
    try:
        volume = np.asanyarray(nibabel.load(path).dataobj)
    except Exception as err:  # nibabel raises its own ImageFileError, EOFError, zlib errors ...
        raise ScanError(f"{where}: unreadable NIfTI file ({err})") from err
    if volume.ndim == 4:
        volume = volume[..., _slice_index({"slice": options.get("volume", "0")}, volume.shape[3], where)]
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise ScanError(f"{where}: NIfTI array of shape {volume.shape}; expected a 2-D, 3-D or 4-D image")
    k = _slice_index(options, volume.shape[2], where, default=volume.shape[2] // 2)
    # rot90: voxel axes (i, j) of the usual RAS-ish storage shown with anterior at the top
    return np.rot90(volume[:, :, k]), {"format": "nifti", "slice": k}


def _read_dicom(path: Path, options: dict) -> tuple[np.ndarray, dict]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    where = str(path)
    _no_options(options, where, ("slice",))
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as err:
        raise ScanError(f"{where}: not a readable DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise ScanError(f"{where}: DICOM has no PixelData (7FE0,0010); expected an image")
    try:
        raw = ds.pixel_array
    except Exception as err:  # compressed syntax without a decoder, bad lengths, ...
        raise ScanError(f"{where}: cannot decode PixelData ({err})") from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raw = raw[_slice_index(options, frames, where)]
    elif "slice" in options:
        _slice_index(options, 1, where)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    meta = {"format": "dicom", "modality": str(getattr(ds, "Modality", "")), "photometric": photometric,
            "rescale_slope": float(getattr(ds, "RescaleSlope", 1.0)),
            "rescale_intercept": float(getattr(ds, "RescaleIntercept", 0.0))}
    if not photometric.startswith("MONOCHROME"):  # RGB / YBR: colour samples, no modality LUT
        return raw, meta
    # Modality LUT: stored values -> physical units (RescaleSlope/Intercept, e.g. HU for CT).
    # The caller then min/max-normalises them (a display window would clip tissue the
    # reconstruction should keep); the physical range is kept in meta.
    values = apply_modality_lut(raw, ds).astype(np.float64)
    if photometric == "MONOCHROME1":  # MONOCHROME1: low values display white; show as people see it
        values = values.max() + values.min() - values
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise ScanError(f"{where}: DICOM image is constant ({lo}); nothing to reconstruct")
    meta.update(normalisation="min/max of rescaled values", value_min=lo, value_max=hi)
    return ((values - lo) / (hi - lo)).astype(np.float32), meta


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------------------------
# fastMRI HDF5
# --------------------------------------------------------------------------------------------
def fft2c(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (fastMRI's and recon.operators.mri's convention)."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def ifft2c(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def _center_fit(k: np.ndarray, n: int) -> np.ndarray:
    """Centre crop (or zero-pad) k-space to n x n: the same object at another resolution."""
    out = np.zeros(k.shape[:-2] + (n, n), dtype=k.dtype)
    H, W = k.shape[-2:]
    h, w = min(H, n), min(W, n)
    src = _center_crop(k, h, w)
    top, left = (n - h) // 2, (n - w) // 2
    out[..., top:top + h, left:left + w] = src
    return out


def rss(coil_images: np.ndarray) -> np.ndarray:
    """Root sum of squares over the coil axis (fastMRI's `reconstruction_rss`)."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=0))


def _read_fastmri(path: Path, options: dict, size: int | None) -> ScanData:
    import h5py

    where = str(path)
    _no_options(options, where, ("slice",))
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise ScanError(f"{where}: not a readable HDF5 file ({err})") from err
    with fh:
        if "kspace" not in fh:
            raise ScanError(f"{where}: no dataset 'kspace'; expected a fastMRI file "
                            f"(datasets found: {', '.join(fh.keys()) or 'none'})")
        if "mask" in fh:
            raise ScanError(f"{where}: k-space is already undersampled (dataset 'mask': a fastMRI test/"
                            "challenge file); expected fully sampled k-space")
        ks = fh["kspace"]
        if ks.ndim not in (3, 4) or not np.issubdtype(ks.dtype, np.complexfloating):
            raise ScanError(f"{where}: dataset 'kspace' is {ks.dtype} {ks.shape}; expected complex "
                            "(slices, coils, H, W) or single-coil (slices, H, W)")
        n = ks.shape[0]
        k = _slice_index(options, n, f"{where} dataset 'kspace'", default=n // 2)
        kspace = np.asarray(ks[k]).astype(np.complex64)
        single = ks.ndim == 3
        ref_name = "reconstruction_esc" if single else "reconstruction_rss"
        ref = None
        if ref_name in fh:
            rd = fh[ref_name]
            if rd.ndim != 3 or rd.shape[0] != n:
                raise ScanError(f"{where}: dataset '{ref_name}' has shape {rd.shape}; expected "
                                f"({n}, H, W) to match 'kspace'")
            ref = np.asarray(rd[k]).astype(np.float64)
        attrs = {key: _plain(value) for key, value in fh.attrs.items()}
    if single:
        kspace = kspace[None]
    if not np.all(np.isfinite(kspace.view(np.float32))):
        raise ScanError(f"{where} dataset 'kspace' slice {k}: has NaN or infinite values")
    coils = ifft2c(kspace)
    H, W = coils.shape[-2:]
    h, w = (min(H, ref.shape[0]), min(W, ref.shape[1])) if ref is not None else (H, W)
    coils = _center_crop(coils, h, w)  # fastMRI: crop the oversampled coil images to the reference
    meta = {"format": "fastmri", "slice": k, "slices": n, "coils": int(kspace.shape[0]),
            "kspace_shape": [int(H), int(W)], "attrs": attrs}
    if size is not None:
        s0 = min(h, w)
        coils = _center_crop(coils, s0, s0)
        # ortho FFT: truncating N -> M pixels scales intensities by N / M; undo it
        kspace = _center_fit(fft2c(coils), size) * (size / s0)
        coils = ifft2c(kspace)
        reference = rss(coils)
        meta["reference_kind"] = "rss of the resampled fully sampled k-space"
    else:
        kspace = fft2c(coils)
        if ref is None:
            reference = rss(coils)
            meta["reference_kind"] = "rss of the fully sampled k-space (file has no reference)"
        else:
            reference = _center_crop(ref, h, w)
            meta["reference_kind"] = ref_name
    peak = float(reference.max())
    if not peak > 0:
        raise ScanError(f"{where} slice {k}: reference is all zeros; nothing to reconstruct")
    meta["scale"] = 1.0 / peak  # k-space and reference multiplied by this (reference max -> 1)
    reference = (reference / peak).astype(np.float32)
    kspace = (kspace / peak).astype(np.complex64)
    image = np.clip(reference, 0.0, 1.0)
    meta["normalisation"] = "divided by the reference slice maximum"
    return ScanData(image=image, kspace=kspace, reference=reference, meta=meta)


def _plain(value: Any) -> Any:
    """HDF5 attribute -> JSON-friendly value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_scan(source: str, *, size: int | None = None, grayscale: bool = True) -> ScanData:
    """Load `source` (see the module docstring) as a ScanData; raises ScanError on bad input.

    size: resize to size x size pixels (centre-crop to square first); None keeps the native size.
    grayscale: convert RGB to gray (MRI and CT always need gray; the CLI forces it there).
    """
    _check_size(size, 1 if grayscale else 3)
    source = resolve_package_source(str(source))
    if source.startswith("skimage:"):
        path_text, options = source, {}
        arr, meta = _load_skimage(source.split(":", 1)[1])
    else:
        path_text, options = _split_source(source)
        path = Path(path_text).expanduser()
        if not path.exists():
            raise ScanError(f"{path}: no such file")
        if not path.is_file():
            raise ScanError(f"{path}: not a file")
        suffix = path.suffix.lower()
        if suffix in HDF5_SUFFIXES:
            scan = _read_fastmri(path, options, size)
            scan.meta.update(source=source, path=str(path))
            return scan
        if suffix in IMAGE_SUFFIXES:
            arr, meta = _read_pillow(path, options)
        elif suffix in TIFF_SUFFIXES:
            arr, meta = _read_tiff(path, options)
        elif suffix in NUMPY_SUFFIXES:
            arr, meta = _read_numpy(path, options)
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            arr, meta = _read_nifti(path, options)
        elif suffix in DICOM_SUFFIXES or _is_dicom(path):
            arr, meta = _read_dicom(path, options)
        else:
            known = IMAGE_SUFFIXES + TIFF_SUFFIXES + NUMPY_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES + HDF5_SUFFIXES
            raise ScanError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected one of "
                            f"{', '.join(known)} or a DICOM file")
    where = path_text if not options else source
    arr = np.asarray(arr)
    if np.iscomplexobj(arr):
        raise ScanError(f"{where}: complex array {arr.shape}; expected a real image "
                        "(measured k-space comes from a fastMRI .h5 file)")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise ScanError(f"{where}: pixel type {arr.dtype} is not supported; expected integer, float or bool")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        raise ScanError(f"{where}: array of shape {arr.shape} is channel-first or a stack; expected (H, W) "
                        "or (H, W, 3), or a stack (slices, H, W) with '#slice=K'")
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 2:
        raise ScanError(f"{where}: array of shape {arr.shape}; expected an image (H, W) or (H, W, 3) "
                        "(a stack needs '#slice=K')")
    unit, norm = _to_unit(arr, where)
    image = _channels(unit, grayscale, where)
    meta = {**norm, **meta, "source": source, "original_shape": list(arr.shape)}
    image = _resize(np.clip(image, 0.0, 1.0).astype(np.float32), size)
    meta["shape"] = list(image.shape)
    return ScanData(image=np.ascontiguousarray(image, dtype=np.float32), meta=meta)


# --------------------------------------------------------------------------------------------
# headers: what a file holds, without reading its pixels (the driver's pre-flight on a login node)
# --------------------------------------------------------------------------------------------
def scan_header(source: str) -> tuple:
    """A hashable description of what `source` holds (format, array shapes, pixel types; the
    selector), read from the file's header only: two sources with equal headers load into
    images of the same shape. Raises ScanError for a missing, empty or header-truncated file;
    a format without a cheap header read (or a header this cannot parse) is loaded by the
    caller instead (NotImplementedError)."""
    source = resolve_package_source(str(source))
    if source.startswith("skimage:"):
        return ("skimage", source)
    path_text, options = _split_source(source)
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ScanError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ScanError(f"{path}: empty file (0 bytes)")
    suffix, selector = path.suffix.lower(), tuple(sorted(options.items()))
    readers = {**dict.fromkeys(IMAGE_SUFFIXES, _pillow_header), **dict.fromkeys(TIFF_SUFFIXES, _tiff_header),
               **dict.fromkeys(NUMPY_SUFFIXES, _numpy_header), **dict.fromkeys(HDF5_SUFFIXES, _hdf5_header),
               **dict.fromkeys(DICOM_SUFFIXES, _dicom_header)}
    reader = readers.get(suffix) or (_dicom_header if _is_dicom(path) else None)
    if reader is None:
        raise NotImplementedError(suffix)
    return (suffix, selector, reader(path))


def _pillow_header(path: Path) -> tuple:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header; pixels only on load()
            return (im.size, im.mode, "transparency" in im.info)
    except (UnidentifiedImageError, OSError) as err:
        raise ScanError(f"{path}: unreadable image ({err}); expected a PNG, JPEG or BMP file") from err


def _tiff_header(path: Path) -> tuple:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return (tuple(series.shape), str(series.dtype))
    except Exception as err:
        raise ScanError(f"{path}: unreadable TIFF ({err})") from err


def _npy_header(fh, size: int, where: str) -> tuple:
    """(shape, dtype) from an open .npy stream of `size` bytes; a file shorter than its header
    says (truncated) or an object array (needs pickle) is refused as np.load would."""
    try:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    except (ValueError, OSError, EOFError) as err:
        raise ScanError(f"{where}: unreadable NumPy file, empty, truncated or corrupt ({err})") from err
    if dtype.hasobject:
        raise ScanError(f"{where}: cannot load without pickle (object array); expected a numeric array")
    if fh.tell() + int(np.prod(shape)) * dtype.itemsize > size:
        raise ScanError(f"{where}: truncated: its header promises {shape} {dtype}, the file is {size} bytes")
    return (tuple(shape), dtype.str)


def _numpy_header(path: Path) -> tuple:
    where = str(path)
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as fh:
            return _npy_header(fh, path.stat().st_size, where)
    try:
        with zipfile.ZipFile(path) as zf:  # reads the central directory at the end: a cut file fails here
            members = []
            for info in zf.infolist():
                with zf.open(info) as fh:
                    members.append((info.filename, _npy_header(fh, info.file_size, f"{where}[{info.filename}]")))
            return tuple(members)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
        raise ScanError(f"{where}: unreadable NumPy file, empty, truncated or corrupt ({err})") from err


def _hdf5_header(path: Path) -> tuple:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            shapes = []
            fh.visititems(lambda name, obj: shapes.append((name, obj.shape, obj.dtype.str))
                          if isinstance(obj, h5py.Dataset) else None)
            return tuple(sorted(shapes))
    except OSError as err:
        raise ScanError(f"{path}: unreadable HDF5 file ({err})") from err


def _dicom_header(path: Path) -> tuple:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:
        raise ScanError(f"{path}: unreadable DICOM file ({err})") from err
    keys = ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames", "BitsAllocated", "PixelRepresentation",
            "PhotometricInterpretation")
    if "Rows" not in ds:
        raise NotImplementedError("DICOM without Rows")  # let the full load say what is wrong
    return tuple(str(ds.get(k, "")) for k in keys)


# --------------------------------------------------------------------------------------------
# measured arrays (CT sinograms): raw numbers, no intensity rule
# --------------------------------------------------------------------------------------------
def load_array(source: str) -> np.ndarray:
    """A measured real array from .npy or .npz (`FILE.npz#key=NAME`, default 'sinogram' or the only
    array), without pickle; raises ScanError naming the file."""
    path_text, options = _split_source(resolve_package_source(str(source)))
    path = Path(path_text).expanduser()
    if path.suffix.lower() not in NUMPY_SUFFIXES:
        raise ScanError(f"{source}: a measured sinogram must be a .npy or .npz file")
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    where = str(path)
    loaded = _np_load(path, where)
    if isinstance(loaded, np.ndarray):
        _no_options(options, where)
        arr = loaded
    else:
        with loaded:
            _no_options(options, where, ("key",))
            keys = list(loaded.files)
            key = options.get("key") or ("sinogram" if "sinogram" in keys else (keys[0] if len(keys) == 1 else None))
            if key is None or key not in keys:
                raise ScanError(f"{source}: expected an array named by '#key=NAME' or 'sinogram'; "
                                f"found {', '.join(keys) or 'none'}")
            arr = _npz_member(loaded, key, where)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ScanError(f"{where}: array {arr.dtype} {arr.shape}; expected a non-empty real (views, detectors) "
                        "sinogram")
    return arr


__all__ = ["ScanData", "ScanError", "load_scan", "load_array", "scan_header", "check_memory", "available_memory",
           "SKIMAGE_IMAGES", "fft2c", "ifft2c", "rss"]
