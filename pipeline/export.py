"""Reconstructions out of the store, in the formats viewers and archives read.

    export(STORE, DIR, fmt="nifti", scans=None, solvers=None, image="final") -> list of files

One file per job (status done or diverged), named `<scan_id>__<solver>-<config6>__seed<k>.<ext>`,
holding the image people look at (`pipeline.query.load_image(..., display=True)`: the magnitude
for MRI, the colour image for RGB restoration):

- npy: float32, the store's values unchanged (H, W) or (H, W, 3).
- png / tiff: 16-bit, scaled on the reference's range [lo, hi] (the ground truth's min and max;
  the image's own range for measured data without one): v = round(clip((x - lo) / (hi - lo)) * 65535).
  The mapping is recorded in the file (PNG text chunk / TIFF ImageDescription, JSON) so values
  can be put back on the store's scale.
- nifti (nibabel): float32 on the store's scale, array axes (x, y[, rgb]) as NIfTI expects.
  Pixel spacing comes from the source DICOM (PixelSpacing, adjusted for the centre crop and
  resize the scan went through); without one the affine is the identity and the header's
  description says so.
- dicom (pydicom): a derived Secondary Capture image (ImageType DERIVED\\SECONDARY), uint16
  with RescaleSlope / RescaleIntercept putting the values back on the store's scale. Where the
  input was DICOM it joins the source's study (StudyInstanceUID), references the source series
  and image (ReferencedSeriesSequence, SourceImageSequence) and carries its patient, modality
  and pixel spacing; the series description names the solver and its parameters (the full
  parameters in DerivationDescription).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import UsageError

FORMATS = ("nifti", "dicom", "png", "tiff", "npy")
IMAGES = ("final", "early_stopped", "ema")
EXTENSIONS = {"nifti": ".nii.gz", "dicom": ".dcm", "png": ".png", "tiff": ".tif", "npy": ".npy"}
EXPORTED = ("done", "diverged")
UINT16_MAX = 65535


@dataclass(frozen=True)
class Item:
    """One job to export: its identity, its image on the store's scale and the 16-bit window."""

    job_id: str
    scan_id: str
    solver: str
    config: str
    params: str
    seed: int
    source: str
    image: np.ndarray          # (H, W) or (H, W, 3) float32, display format
    window: tuple[float, float]

    @property
    def stem(self) -> str:
        safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s)  # noqa: E731
        return f"{safe(self.scan_id)}__{safe(self.solver)}-{self.config[:6]}__seed{self.seed}"

    @property
    def description(self) -> str:
        return f"dipcohort {self.solver} {self.params} seed {self.seed} (job {self.job_id})"


def export(store: str | Path, out: str | Path, fmt: str, *, scans: Sequence[str] | None = None,
           solvers: Sequence[str] | None = None, image: str = "final") -> list[Path]:
    """Write one file per selected job into `out`; returns the paths written."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if image not in IMAGES:
        raise UsageError(f"--image {image!r}: expected one of {', '.join(IMAGES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    jobs = select_jobs(store, scans, solvers)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"nifti": write_nifti, "dicom": write_dicom, "png": write_png, "tiff": write_tiff,
              "npy": write_npy}[fmt]
    paths = []
    for item in load_items(store, jobs, image):
        path = out / f"{item.stem}{EXTENSIONS[fmt]}"
        writer(item, path, store)
        paths.append(path)
    return paths


def select_jobs(store, scans: Sequence[str] | None, solvers: Sequence[str] | None) -> list[dict]:
    """The finished jobs of the chosen scans and solvers (all when None), as coordinate dicts."""
    from pipeline.query import open_results

    ds = open_results(store)
    table = {name: ds[name].values for name in ("scan_id", "solver", "config", "params", "seed", "source", "status")}
    table["job"] = ds["job"].values
    for flag, wanted, key in (("--scans", scans, "scan_id"), ("--solvers", solvers, "solver")):
        unknown = sorted(set(wanted or ()) - set(map(str, table[key])))
        if unknown:
            raise UsageError(f"{flag}: {', '.join(unknown)} not in the store; expected some of "
                             f"{', '.join(sorted(set(map(str, table[key]))))}")
    rows = []
    for i in range(len(table["job"])):
        if str(table["status"][i]) not in EXPORTED:
            continue
        if scans and str(table["scan_id"][i]) not in scans or solvers and str(table["solver"][i]) not in solvers:
            continue
        rows.append({k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in table.items()})
    if not rows:
        raise UsageError(f"{store}: no finished job matches the selection (only done and diverged jobs are exported)")
    return rows


def load_items(store, jobs: list[dict], image: str):
    from pipeline.query import load_image

    for row in jobs:
        values = as_hwc(load_image(store, str(row["job"]), image, display=True).values)
        if not np.isfinite(values).all():
            raise UsageError(f"job {row['job']} ({row['scan_id']}/{row['solver']}): its {image!r} image is "
                             f"missing in the store (the solver did not produce one); choose another --image")
        reference = as_hwc(load_image(store, str(row["job"]), "reference", display=True).values)
        window = _window(reference if np.isfinite(reference).all() else values)
        yield Item(job_id=str(row["job"]), scan_id=str(row["scan_id"]), solver=str(row["solver"]),
                   config=str(row["config"]), params=str(row["params"]), seed=int(row["seed"]),
                   source=str(row["source"]), image=values, window=window)


def as_hwc(chw: np.ndarray) -> np.ndarray:
    """(C, H, W) display image as (H, W) for one channel, (H, W, C) for colour."""
    arr = np.asarray(chw, dtype=np.float32)
    return arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)


def _window(reference: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(reference)), float(np.max(reference))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def to_uint16(item: Item) -> np.ndarray:
    lo, hi = item.window
    return np.round(np.clip((item.image - lo) / (hi - lo), 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def from_uint16(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Back to the store's scale (inverse of to_uint16 inside the window)."""
    lo, hi = window
    return values.astype(np.float64) / UINT16_MAX * (hi - lo) + lo


def _mapping(item: Item) -> str:
    lo, hi = item.window
    return json.dumps({"software": "dipcohort", "job": item.job_id, "scan_id": item.scan_id,
                       "solver": item.solver, "params": json.loads(item.params or "{}"), "seed": item.seed,
                       "window": [lo, hi], "value": f"{lo!r} + v / {UINT16_MAX} * ({hi!r} - {lo!r})"})


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def write_npy(item: Item, path: Path, store) -> None:
    np.save(path, item.image.astype(np.float32), allow_pickle=False)


def write_png(item: Item, path: Path, store) -> None:
    import png  # pypng: 16-bit grey and RGB (Pillow writes 16-bit grey only)

    values = to_uint16(item)
    planes = 1 if values.ndim == 2 else values.shape[-1]
    writer = png.Writer(width=values.shape[1], height=values.shape[0], bitdepth=16, greyscale=planes == 1,
                        planes=planes)
    with path.open("wb") as fh:
        writer.write(fh, values.reshape(values.shape[0], -1).tolist())
    _png_add_text(path, "Description", _mapping(item))


def _png_add_text(path: Path, key: str, text: str) -> None:
    """Insert a tEXt chunk after IHDR (pypng's writer has no text option for arbitrary keys)."""
    import struct
    import zlib

    data = path.read_bytes()
    end_ihdr = 8 + 8 + 13 + 4
    body = key.encode("latin-1") + b"\0" + text.encode("latin-1", "replace")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    path.write_bytes(data[:end_ihdr] + chunk + data[end_ihdr:])


def write_tiff(item: Item, path: Path, store) -> None:
    import tifffile

    values = to_uint16(item)
    tifffile.imwrite(path, values, photometric="minisblack" if values.ndim == 2 else "rgb",
                     description=_mapping(item), metadata=None)


def write_nifti(item: Item, path: Path, store) -> None:
    import nibabel as nib

    spacing = source_spacing(item, store)
    data = np.swapaxes(item.image, 0, 1)[:, :, None]  # (x, y, 1[, rgb]): NIfTI's first axis is x
    if data.ndim == 4:
        data = data[:, :, :, None, :]  # colour as the 5th (vector) dimension
    affine = np.eye(4)
    if spacing is not None:
        affine[0, 0], affine[1, 1] = spacing[1], spacing[0]  # PixelSpacing is (row, column) = (dy, dx)
        note = f"pixel spacing {spacing[0]:.4g}x{spacing[1]:.4g} mm from the source DICOM"
    else:
        note = "identity affine: the source has no pixel spacing"
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    if data.ndim == 5:
        img.header.set_intent("vector")
    img.header["descrip"] = f"dipcohort {item.solver}; {note}"[:79].encode()
    img.header.set_xyzt_units("mm" if spacing is not None else "unknown")
    img.to_filename(str(path))


def write_dicom(item: Item, path: Path, store) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    source = source_dicom(item, store)
    values = to_uint16(item)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"  # workstation: computed by software
    ds.Manufacturer, ds.SoftwareVersions = "dipcohort", _version()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 999, 1
    ds.SeriesDescription = f"{item.solver} {_short_params(item.params)}"[:64]  # LO: 64 characters at most
    ds.DerivationDescription = item.description[:1024]                       # ST: the full parameters
    ds.ImageComments = _mapping(item)[:10240]
    if source is not None:
        for key in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "PatientName",
                    "PatientID", "PatientBirthDate", "PatientSex", "Modality", "FrameOfReferenceUID"):
            if key in source:
                setattr(ds, key, source[key].value)
        ref = Dataset()
        ref.SeriesInstanceUID = source.SeriesInstanceUID
        ds.ReferencedSeriesSequence = DicomSequence([ref])
        image_ref = Dataset()
        image_ref.ReferencedSOPClassUID, image_ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        ds.SourceImageSequence = DicomSequence([image_ref])
        spacing = source_spacing(item, store)
        if spacing is not None:
            ds.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    else:
        ds.StudyInstanceUID = generate_uid()
        ds.Modality = "OT"
        ds.PatientName, ds.PatientID = "dipcohort^reconstruction", item.scan_id[:64]
    lo, hi = item.window
    ds.RescaleIntercept, ds.RescaleSlope = f"{lo:.10g}", f"{(hi - lo) / UINT16_MAX:.10g}"
    ds.RescaleType = "US"  # unspecified: the store's intensity scale
    photometric = "MONOCHROME2" if values.ndim == 2 else "RGB"
    ds.set_pixel_data(values, photometric_interpretation=photometric, bits_stored=16)
    ds.save_as(path, enforce_file_format=True)


def _short_params(params: str) -> str:
    try:
        value = json.loads(params or "{}")
    except json.JSONDecodeError:
        return params
    return " ".join(f"{k}={v}" for k, v in sorted(value.items()))


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dipcohort")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# the source DICOM, where the scan came from one
# ---------------------------------------------------------------------------------------------
def source_path(item: Item, store) -> Path | None:
    """The scan's source file (relative paths are relative to the store's directory)."""
    from pipeline.io import resolve_package_source

    if not item.source or item.source.startswith("skimage:"):
        return None
    path = Path(resolve_package_source(item.source).partition("#")[0])
    if not path.is_absolute():
        path = Path(store).resolve().parent / path
    return path if path.is_file() else None


def source_dicom(item: Item, store):
    """The source's DICOM header (no pixels), or None when the source is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = source_path(item, store)
    if path is None:
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return None


def source_spacing(item: Item, store) -> tuple[float, float] | None:
    """(row, column) spacing in mm of the exported image: the source's PixelSpacing scaled by the
    centre crop to a square and the resize to the stored size (pipeline.io does both)."""
    ds = source_dicom(item, store)
    if ds is None or "PixelSpacing" not in ds or "Rows" not in ds or "Columns" not in ds:
        return None
    dy, dx = (float(v) for v in ds.PixelSpacing)
    if not (math.isfinite(dy) and math.isfinite(dx)) or dy <= 0 or dx <= 0:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    h, w = item.image.shape[:2]
    if (h, w) == (rows, cols):  # loaded at its native size
        return dy, dx
    side = min(rows, cols)      # centre-cropped to a square, then resized to h x w
    return dy * side / h, dx * side / w
