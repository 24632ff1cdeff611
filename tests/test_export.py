"""`dipcohort export`: every format read back with its own library and compared with the store's image.

A real tiny cohort (3 scans: a DICOM CT-like slice with pixel spacing, a grey skimage image and an
RGB one; 2 solvers; 6 steps of the tiny network) is run once per module, then exported.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline
from dipcohort.cli import main
from pipeline.export import UINT16_MAX, from_uint16

STEPS = 6
SPACING = (0.7, 0.8)      # (row, column) mm of the source DICOM
SOURCE_SHAPE = (48, 40)   # rows, columns: centre-cropped to 40 x 40, resized to 32 x 32


def _write_source_dicom(path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "P123", "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = SOURCE_SHAPE
    ds.PixelSpacing = [str(SPACING[0]), str(SPACING[1])]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    yy, xx = np.mgrid[:SOURCE_SHAPE[0], :SOURCE_SHAPE[1]]
    ds.PixelData = (100 + 20 * xx + 10 * yy + 300 * ((xx - 20) ** 2 + (yy - 24) ** 2 < 80)).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    source = _write_source_dicom(root / "slice.dcm")
    (root / "cohort.yaml").write_text(f"""
cohort: export-test
steps: {STEPS}
size: 32
scans:
  - {{id: ct-slice, source: slice.dcm, task: denoise, params: {{sigma: 25}}}}
  - {{id: camera, source: "skimage:camera", task: denoise, params: {{sigma: 25}}}}
  - {{id: astronaut, source: "skimage:astronaut", task: denoise, color: true, params: {{sigma: 25}}}}
solvers:
  - {{name: dip, params: {{network: tiny}}}}
  - {{name: adjoint}}
""")
    out = root / "r.zarr"
    assert main(["run", str(root / "cohort.yaml"), "--out", str(out), "--progress", "quiet"]) == 0
    return out, source


def _jobs(store_path):
    ds = pipeline.open_results(store_path)
    return {(str(s), str(v)): str(j) for j, s, v in zip(ds.job.values, ds.scan_id.values, ds.solver.values)}


def _stored(store_path, job):
    image = pipeline.load_image(store_path, job, "final", display=True).values
    return image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)


def _window(store_path, job):
    ref = pipeline.load_image(store_path, job, "reference", display=True).values
    return float(ref.min()), float(ref.max())


def _export(store_path, tmp_path, fmt, *extra):
    out = tmp_path / fmt
    assert main(["export", str(store_path), "--format", fmt, "--out", str(out), *extra]) == 0
    return out


def test_npy_is_the_stored_image_exactly(store, tmp_path):
    path, _ = store
    out = _export(path, tmp_path, "npy")
    jobs = _jobs(path)
    files = sorted(out.glob("*.npy"))
    assert len(files) == len(jobs) == 6
    for (scan, solver), job in jobs.items():
        [match] = [f for f in files if f.name.startswith(f"{scan}__{solver}-")]
        np.testing.assert_array_equal(np.load(match), _stored(path, job))


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_png_and_tiff_scaled_on_the_reference_range(store, tmp_path, fmt):
    path, _ = store
    out = _export(path, tmp_path, fmt, "--solvers", "dip")
    jobs = _jobs(path)
    for scan in ("ct-slice", "camera", "astronaut"):
        job = jobs[(scan, "dip")]
        [file] = out.glob(f"{scan}__dip-*")
        if fmt == "png":
            import png

            width, height, rows, info = png.Reader(filename=str(file)).read()
            assert info["bitdepth"] == 16
            values = np.array([list(r) for r in rows], dtype=np.uint16).reshape(height, width, -1).squeeze(-1) \
                if info["planes"] == 1 else np.array([list(r) for r in rows], dtype=np.uint16).reshape(height, width, 3)
            text = _png_text(file)
        else:
            import tifffile

            with tifffile.TiffFile(file) as tif:
                values = tif.asarray()
                text = tif.pages[0].description
            assert values.dtype == np.uint16
        meta = json.loads(text)
        window = _window(path, job)
        assert meta["solver"] == "dip" and meta["window"] == pytest.approx(list(window))
        expected = _stored(path, job)
        assert values.shape == expected.shape
        inside = (expected >= window[0]) & (expected <= window[1])
        np.testing.assert_allclose(from_uint16(values, window)[inside], expected[inside],
                                   atol=(window[1] - window[0]) / UINT16_MAX)  # half a level each way
        assert (values[expected > window[1]] == UINT16_MAX).all() and (values[expected < window[0]] == 0).all()


def _png_text(path):
    import png

    for kind, data in png.Reader(filename=str(path)).chunks():
        if kind == b"tEXt":
            key, _, text = data.partition(b"\0")
            if key == b"Description":
                return text.decode("latin-1")
    raise AssertionError("no Description text chunk")


def test_nifti_carries_the_dicom_spacing_else_says_identity(store, tmp_path):
    import nibabel as nib

    path, _ = store
    out = _export(path, tmp_path, "nifti", "--solvers", "dip")
    jobs = _jobs(path)
    side = min(SOURCE_SHAPE)
    for scan in ("ct-slice", "camera", "astronaut"):
        [file] = out.glob(f"{scan}__dip-*.nii.gz")
        img = nib.load(file)
        data = np.asarray(img.dataobj)
        expected = _stored(path, jobs[(scan, "dip")])
        back = np.swapaxes(data[:, :, 0, 0, :] if data.ndim == 5 else data[:, :, 0], 0, 1)
        np.testing.assert_array_equal(back, expected)
        descrip = img.header["descrip"].tobytes().decode()
        if scan == "ct-slice":
            h, w = expected.shape
            assert img.affine[0, 0] == pytest.approx(SPACING[1] * side / w)   # x: columns
            assert img.affine[1, 1] == pytest.approx(SPACING[0] * side / h)   # y: rows
            assert "from the source DICOM" in descrip
        else:
            np.testing.assert_array_equal(img.affine, np.eye(4))
            assert "identity affine" in descrip


def test_dicom_is_a_derived_image_in_the_source_study(store, tmp_path):
    import pydicom

    path, source = store
    out = _export(path, tmp_path, "dicom", "--scans", "ct-slice", "camera")
    jobs = _jobs(path)
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 4
    for file in files:
        ds = pydicom.dcmread(file)
        scan, solver = file.name.split("__")[0], file.name.split("__")[1].split("-")[0]
        expected = _stored(path, jobs[(scan, solver)])
        window = _window(path, jobs[(scan, solver)])
        values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        inside = (expected >= window[0]) & (expected <= window[1])
        np.testing.assert_allclose(values[inside], expected[inside], atol=(window[1] - window[0]) / UINT16_MAX)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription.startswith(solver) and solver in ds.DerivationDescription
        if scan == "ct-slice":
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == "P123"
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            side = min(SOURCE_SHAPE)
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx(
                [SPACING[0] * side / expected.shape[0], SPACING[1] * side / expected.shape[1]])
            assert ds.Modality == "CT"
        else:
            assert ds.StudyInstanceUID != source.StudyInstanceUID and "PixelSpacing" not in ds


def test_bad_selection_and_out_are_clear_errors(store, tmp_path, capsys):
    path, _ = store
    assert main(["export", str(path), "--format", "png", "--out", str(tmp_path / "x"), "--scans", "nope"]) == 2
    assert "--scans: nope not in the store" in capsys.readouterr().err
    file = tmp_path / "a-file"
    file.write_text("")
    assert main(["export", str(path), "--format", "png", "--out", str(file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["export", str(path), "--format", "png", "--out", str(tmp_path / "y"), "--image", "ema"]) == 2
    assert "missing in the store" in capsys.readouterr().err
