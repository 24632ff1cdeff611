"""pipeline.io.load_scan on real files in real formats, written here into tmp_path."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.transform import resize

from pipeline.io import SKIMAGE_IMAGES, ScanError, fft2c, ifft2c, load_scan, rss


def _gradient(h: int = 40, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (x + 2 * y).astype(np.float64) / (w - 1 + 2 * (h - 1))


# ---------------------------------------------------------------------------------------------
# skimage
# ---------------------------------------------------------------------------------------------
def test_skimage_camera_matches_skimage_data():
    scan = load_scan("skimage:camera")
    assert scan.image.dtype == np.float32 and scan.image.shape == (512, 512)
    np.testing.assert_allclose(scan.image, data.camera() / 255.0, atol=1e-6)
    assert scan.kspace is None and scan.reference is None
    assert scan.meta["source"] == "skimage:camera"


@pytest.mark.parametrize("name", SKIMAGE_IMAGES)
def test_every_listed_skimage_image_loads_offline(name):
    scan = load_scan(f"skimage:{name}", size=16)
    assert scan.image.shape == (16, 16)
    assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0 and scan.image.max() > scan.image.min()


def test_shepp_logan_and_color():
    phantom = load_scan("skimage:shepp_logan")
    np.testing.assert_allclose(phantom.image, data.shepp_logan_phantom(), atol=1e-6)
    rgb = load_scan("skimage:astronaut", grayscale=False, size=32)
    assert rgb.image.shape == (32, 32, 3)
    gray = load_scan("skimage:astronaut", size=32)
    assert gray.image.shape == (32, 32)


def test_resize_crops_to_square_and_antialiases():
    scan = load_scan("skimage:coins", size=64)  # 303 x 384: crop to 303 x 303 first
    crop = data.coins()[:, 40:343] / 255.0
    expected = resize(crop, (64, 64), anti_aliasing=True, order=1)
    assert scan.image.shape == (64, 64)
    np.testing.assert_allclose(scan.image, expected, atol=1e-5)


def test_unknown_skimage_name_lists_valid_names():
    with pytest.raises(ScanError, match=r"skimage:nope.*camera.*shepp_logan"):
        load_scan("skimage:nope")


# ---------------------------------------------------------------------------------------------
# PNG / TIFF / JPEG
# ---------------------------------------------------------------------------------------------
def test_png_8bit_gray_and_rgba(tmp_path):
    from PIL import Image

    img = (_gradient() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "g.png")
    scan = load_scan(str(tmp_path / "g.png"))
    np.testing.assert_allclose(scan.image, img / 255.0, atol=1e-6)
    assert scan.meta["normalisation"] == "uint8/255"

    rgba = np.dstack([img, img // 2, 255 - img, np.full_like(img, 7)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.png")
    color = load_scan(str(tmp_path / "c.png"), grayscale=False)
    assert color.image.shape == (40, 48, 3)  # alpha dropped
    np.testing.assert_allclose(color.image[..., 1], (img // 2) / 255.0, atol=1e-6)


def test_png_16bit_is_min_max_normalised(tmp_path):
    from PIL import Image

    img = (1000 + _gradient() * 3000).astype(np.uint16)
    Image.fromarray(img).save(tmp_path / "w.png")
    scan = load_scan(str(tmp_path / "w.png"))
    assert scan.meta["normalisation"] == "min/max"
    assert scan.meta["value_min"] == img.min() and scan.meta["value_max"] == img.max()
    np.testing.assert_allclose(scan.image, (img - 1000.0) / (img.max() - 1000.0), atol=1e-6)


def test_jpeg_loads(tmp_path):
    from PIL import Image

    img = (_gradient() * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "g.jpg", quality=95)
    scan = load_scan(str(tmp_path / "g.jpg"))
    assert np.abs(scan.image - img / 255.0).max() < 0.05  # lossy


def test_tiff_float_and_stack(tmp_path):
    import tifffile

    img = _gradient().astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", img)
    np.testing.assert_allclose(load_scan(str(tmp_path / "f.tif")).image, img, atol=1e-7)
    stack = np.stack([img, 1 - img, img * 0.5]).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tiff", stack)
    np.testing.assert_allclose(load_scan(f"{tmp_path / 's.tiff'}#slice=1").image, 1 - img, atol=1e-7)
    with pytest.raises(ScanError, match=r"s\.tiff.*slice"):
        load_scan(str(tmp_path / "s.tiff"))  # a stack without #slice


def test_unreadable_image_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ScanError, match=r"broken\.png.*unreadable"):
        load_scan(str(bad))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ScanError, match=r"nothere\.png: no such file"):
        load_scan(str(tmp_path / "nothere.png"))
    odd = tmp_path / "x.xyz"
    odd.write_text("hello")
    with pytest.raises(ScanError, match=r"x\.xyz.*unknown file type '\.xyz'"):
        load_scan(str(odd))


# ---------------------------------------------------------------------------------------------
# NPY / NPZ
# ---------------------------------------------------------------------------------------------
def test_npy_float_kept_and_out_of_range_normalised(tmp_path):
    img = _gradient()
    np.save(tmp_path / "a.npy", img)
    np.testing.assert_allclose(load_scan(str(tmp_path / "a.npy")).image, img, atol=1e-7)
    np.save(tmp_path / "b.npy", img * 500 - 100)
    scan = load_scan(str(tmp_path / "b.npy"))
    np.testing.assert_allclose(scan.image, img, atol=1e-6)
    assert scan.meta["value_min"] == pytest.approx(-100)


def test_npy_errors_name_file_and_expectation(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(10.0))
    with pytest.raises(ScanError, match=r"v\.npy.*shape \(10,\).*expected"):
        load_scan(str(tmp_path / "v.npy"))
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ScanError, match=r"s\.npy.*pixel type"):
        load_scan(str(tmp_path / "s.npy"))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ScanError, match=r"o\.npy.*pickle"):
        load_scan(str(tmp_path / "o.npy"))
    np.save(tmp_path / "c.npy", np.ones((8, 8), np.complex64))
    with pytest.raises(ScanError, match=r"c\.npy.*complex"):
        load_scan(str(tmp_path / "c.npy"))
    np.save(tmp_path / "n.npy", np.full((8, 8), np.nan))
    with pytest.raises(ScanError, match=r"n\.npy.*NaN"):
        load_scan(str(tmp_path / "n.npy"))


def test_npz_key_rules(tmp_path):
    img = _gradient()
    np.savez(tmp_path / "one.npz", anything=img)
    np.testing.assert_allclose(load_scan(str(tmp_path / "one.npz")).image, img, atol=1e-7)
    np.savez(tmp_path / "named.npz", image=img, mask=img > 0.5)
    assert load_scan(str(tmp_path / "named.npz")).meta["key"] == "image"
    assert load_scan(f"{tmp_path / 'named.npz'}#key=mask").meta["key"] == "mask"
    np.savez(tmp_path / "two.npz", a=img, b=img)
    with pytest.raises(ScanError, match=r"two\.npz.*'image'.*keys found: a, b"):
        load_scan(str(tmp_path / "two.npz"))


def test_npy_stack_slice_out_of_range(tmp_path):
    np.save(tmp_path / "st.npy", np.random.default_rng(0).random((3, 16, 16)))
    assert load_scan(f"{tmp_path / 'st.npy'}#slice=2").image.shape == (16, 16)
    with pytest.raises(ScanError, match=r"st\.npy.*slice 5 out of range.*3 slices"):
        load_scan(f"{tmp_path / 'st.npy'}#slice=5")


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------
def _write_dicom(path, stored: np.ndarray, *, slope=2.0, intercept=-1024.0, modality="CT",
                 photometric="MONOCHROME2"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    frames = stored.shape[0] if stored.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1  # signed
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_applies_rescale_and_min_max(tmp_path):
    stored = (_gradient() * 1500 - 200).astype(np.int16)
    _write_dicom(tmp_path / "ct.dcm", stored)
    scan = load_scan(str(tmp_path / "ct.dcm"))
    hu = stored * 2.0 - 1024.0
    assert scan.meta["modality"] == "CT"
    assert scan.meta["value_min"] == pytest.approx(hu.min()) and scan.meta["value_max"] == pytest.approx(hu.max())
    np.testing.assert_allclose(scan.image, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_dicom_without_suffix_multiframe_and_monochrome1(tmp_path):
    stored = np.stack([(_gradient() * 1000).astype(np.int16), (1000 - _gradient() * 1000).astype(np.int16)])
    _write_dicom(tmp_path / "IM0001", stored, slope=1.0, intercept=0.0, modality="MR")
    second = load_scan(f"{tmp_path / 'IM0001'}#slice=1")
    np.testing.assert_allclose(second.image, 1 - _gradient(), atol=2e-3)
    with pytest.raises(ScanError, match=r"IM0001.*2 slices"):
        load_scan(str(tmp_path / "IM0001"))
    _write_dicom(tmp_path / "m1.dcm", stored[0], slope=1.0, intercept=0.0, photometric="MONOCHROME1")
    np.testing.assert_allclose(load_scan(str(tmp_path / "m1.dcm")).image, 1 - _gradient(), atol=2e-3)


def test_dicom_errors(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(ScanError, match=r"bad\.dcm.*DICOM"):
        load_scan(str(bad))
    stored = np.zeros((8, 8), np.int16)
    _write_dicom(tmp_path / "flat.dcm", stored)
    with pytest.raises(ScanError, match=r"flat\.dcm.*constant"):
        load_scan(str(tmp_path / "flat.dcm"))


# ---------------------------------------------------------------------------------------------
# fastMRI HDF5
# ---------------------------------------------------------------------------------------------
def _sensitivities(coils: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[-1:1:h * 1j, -1:1:w * 1j]
    maps = []
    for c in range(coils):
        angle = 2 * np.pi * c / coils
        cy, cx = 1.2 * np.sin(angle), 1.2 * np.cos(angle)
        maps.append(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 2.0) * np.exp(1j * angle))
    maps = np.array(maps)
    return maps / rss(maps).max()


def _write_fastmri(path, *, slices=3, coils=4, ref=32, oversample=(64, 40), single=False, with_ref=True,
                   extra=None):
    """fastMRI-like file: k-space on an oversampled grid, reference = RSS of the centre crop."""
    import h5py

    H, W = oversample
    truth = []
    kspace, recon = [], []
    for s in range(slices):
        obj = resize(data.shepp_logan_phantom(), (ref, ref), anti_aliasing=True) * (1 + 0.5 * s)
        full = np.zeros((H, W), np.complex128)
        top, left = (H - ref) // 2, (W - ref) // 2
        full[top:top + ref, left:left + ref] = obj * np.exp(0.3j)
        coil_imgs = full[None] * (_sensitivities(coils, H, W) if not single else 1.0)
        k = fft2c(coil_imgs) * 3e-4  # fastMRI values are small
        kspace.append(k[0] if single else k)
        crop = ifft2c(k)[:, top:top + ref, left:left + ref]
        recon.append(rss(crop))
        truth.append(obj)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("kspace", data=np.array(kspace, dtype=np.complex64))
        if with_ref:
            name = "reconstruction_esc" if single else "reconstruction_rss"
            fh.create_dataset(name, data=np.array(recon, dtype=np.float32))
        fh.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader/>")
        fh.attrs["acquisition"] = "CORPD_FBK"
        fh.attrs["max"] = float(np.max(recon))
        fh.attrs["norm"] = float(np.linalg.norm(recon))
        fh.attrs["patient_id"] = "abc123"
        for key, value in (extra or {}).items():
            fh.create_dataset(key, data=value)
    return np.array(truth), np.array(recon)


def test_fastmri_multicoil_crop_and_scale(tmp_path):
    path = tmp_path / "file1000001.h5"
    truth, recon = _write_fastmri(path)
    scan = load_scan(f"{path}#slice=1")
    assert scan.kspace.shape == (4, 32, 32) and scan.kspace.dtype == np.complex64
    assert scan.reference.shape == (32, 32) and scan.reference.max() == pytest.approx(1.0)
    np.testing.assert_allclose(scan.reference, recon[1] / recon[1].max(), atol=1e-5)
    # the cropped, re-FFT'd k-space reproduces the reference by root sum of squares
    np.testing.assert_allclose(rss(ifft2c(scan.kspace)), scan.reference, atol=1e-4)
    np.testing.assert_allclose(scan.image, scan.reference)
    assert scan.meta["slice"] == 1 and scan.meta["coils"] == 4 and scan.meta["kspace_shape"] == [64, 40]
    assert scan.meta["attrs"]["acquisition"] == "CORPD_FBK"
    assert scan.meta["reference_kind"] == "reconstruction_rss"
    assert load_scan(str(path)).meta["slice"] == 1  # default: the middle slice


def test_fastmri_size_resamples_kspace_consistently(tmp_path):
    path = tmp_path / "f.h5"
    _, recon = _write_fastmri(path)
    scan = load_scan(f"{path}#slice=0", size=16)
    assert scan.kspace.shape == (4, 16, 16) and scan.reference.shape == (16, 16)
    np.testing.assert_allclose(rss(ifft2c(scan.kspace)), scan.reference, atol=1e-5)
    # the exact lower-resolution acquisition: the centre of the native k-space, with the ortho-FFT
    # intensity factor 16/32 undone, in the file's units
    native = load_scan(f"{path}#slice=0")
    expected = native.kspace[:, 8:24, 8:24] / native.meta["scale"] * (16 / 32)
    np.testing.assert_allclose(scan.kspace / scan.meta["scale"], expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())
    small = resize(recon[0] / recon[0].max(), (16, 16), anti_aliasing=True)
    assert np.corrcoef(small.ravel(), scan.reference.ravel())[0, 1] > 0.9  # same object (with Gibbs ringing)


def test_fastmri_single_coil_uses_esc(tmp_path):
    path = tmp_path / "single.h5"
    _, recon = _write_fastmri(path, single=True)
    scan = load_scan(f"{path}#slice=2")
    assert scan.kspace.shape == (1, 32, 32)
    assert scan.meta["reference_kind"] == "reconstruction_esc"
    np.testing.assert_allclose(np.abs(ifft2c(scan.kspace[0])), scan.reference, atol=1e-4)


def test_fastmri_without_reference_computes_rss(tmp_path):
    path = tmp_path / "noref.h5"
    _, recon = _write_fastmri(path, with_ref=False, oversample=(32, 32))
    scan = load_scan(f"{path}#slice=0")
    np.testing.assert_allclose(scan.reference, recon[0] / recon[0].max(), atol=1e-4)
    assert "file has no reference" in scan.meta["reference_kind"]


def test_fastmri_errors_name_file_dataset_and_slice(tmp_path):
    import h5py

    path = tmp_path / "f.h5"
    _write_fastmri(path, slices=2)
    with pytest.raises(ScanError, match=r"f\.h5 dataset 'kspace'.*slice 7 out of range.*2 slices"):
        load_scan(f"{path}#slice=7")
    with pytest.raises(ScanError, match=r"slice must be an integer, got 'x'"):
        load_scan(f"{path}#slice=x")
    with pytest.raises(ScanError, match=r"bad selector"):
        load_scan(f"{path}#frame=1")
    with h5py.File(tmp_path / "nok.h5", "w") as fh:
        fh.create_dataset("reconstruction_rss", data=np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ScanError, match=r"nok\.h5: no dataset 'kspace'.*reconstruction_rss"):
        load_scan(str(tmp_path / "nok.h5"))
    with h5py.File(tmp_path / "real.h5", "w") as fh:
        fh.create_dataset("kspace", data=np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ScanError, match=r"real\.h5: dataset 'kspace' is float32.*expected complex"):
        load_scan(str(tmp_path / "real.h5"))
    _write_fastmri(tmp_path / "test.h5", slices=1, extra={"mask": np.ones(40, bool)})
    with pytest.raises(ScanError, match=r"test\.h5.*already undersampled"):
        load_scan(str(tmp_path / "test.h5"))
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(ScanError, match=r"junk\.h5.*HDF5"):
        load_scan(str(tmp_path / "junk.h5"))


def test_fft_convention_is_centred_orthonormal():
    x = np.zeros((8, 8), complex)
    x[4, 4] = 1.0  # the centre pixel (fftshift convention)
    np.testing.assert_allclose(fft2c(x), np.full((8, 8), 1 / 8), atol=1e-12)
    z = np.random.default_rng(0).standard_normal((2, 8, 6)) + 1j
    np.testing.assert_allclose(ifft2c(fft2c(z)), z, atol=1e-12)
    assert np.linalg.norm(fft2c(z)) == pytest.approx(np.linalg.norm(z))


def test_bad_size():
    with pytest.raises(ScanError, match="size"):
        load_scan("skimage:camera", size=3)


def test_hash_inside_a_real_file_name_is_not_a_selector(tmp_path):
    img = _gradient()
    np.save(tmp_path / "scan#1.npy", img)
    np.testing.assert_allclose(load_scan(str(tmp_path / "scan#1.npy")).image, img, atol=1e-7)


def test_empty_and_truncated_numpy_files_name_the_file(tmp_path):
    from pipeline.io import load_array

    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    good = tmp_path / "good.npz"
    np.savez(good, sinogram=np.ones((8, 16)))
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    np.save(tmp_path / "full.npy", np.ones((32, 32), np.float32))
    short = tmp_path / "short.npy"
    short.write_bytes((tmp_path / "full.npy").read_bytes()[:200])
    for path, message in ((empty, "empty file"), (truncated, "truncated"), (short, "truncated")):
        for loader in (load_scan, load_array):
            with pytest.raises(ScanError, match=message) as err:
                loader(str(path))
            assert str(path) in str(err.value)
    np.testing.assert_array_equal(load_array(str(good)), np.ones((8, 16)))
    with pytest.raises(ScanError, match="'#key=NAME' or 'sinogram'"):
        np.savez(tmp_path / "two.npz", a=np.ones(3), b=np.ones(3))
        load_array(str(tmp_path / "two.npz"))


def test_size_is_checked_against_available_memory(monkeypatch):
    import pipeline.io as io

    monkeypatch.setattr(io, "available_memory", lambda: 2 ** 30)
    with pytest.raises(ScanError, match="size 100000 px needs about 111.8 GiB"):
        load_scan("skimage:camera", size=100000)
    assert load_scan("skimage:camera", size=64).image.shape == (64, 64)


# ---------------------------------------------------------------------------------------------
# scans shipped inside installed packages, NIfTI
# ---------------------------------------------------------------------------------------------
def test_pydicom_source_is_the_shipped_dicom_file():
    import pydicom
    from pydicom.data import get_testdata_file

    scan = load_scan("pydicom:CT_small.dcm")
    assert scan.image.shape == (128, 128)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(scan.image, expected, atol=1e-6)


def test_unknown_package_file_names_the_package_and_a_shipped_file():
    with pytest.raises(ScanError, match=r"pydicom:nope\.dcm: pydicom ships no file 'nope\.dcm'.*CT_small\.dcm"):
        load_scan("pydicom:nope.dcm")
    with pytest.raises(ScanError, match="nibabel ships no file"):
        load_scan("nibabel:../setup.py")


def test_nifti_slice_and_volume_selection(tmp_path):
    import nibabel

    volume = np.random.default_rng(0).random((20, 24, 5, 2)).astype(np.float32) * 0.5 + 0.25
    path = tmp_path / "series.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    np.testing.assert_allclose(load_scan(f"{path}#slice=3").image, np.rot90(volume[:, :, 3, 0]), atol=1e-6)
    np.testing.assert_allclose(load_scan(f"{path}#slice=1&volume=1").image, np.rot90(volume[:, :, 1, 1]), atol=1e-6)
    assert load_scan(str(path)).meta["slice"] == 2  # the middle slice by default
    with pytest.raises(ScanError, match="slice"):
        load_scan(f"{path}#slice=9")
    broken = tmp_path / "broken.nii"
    broken.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ScanError, match="broken.nii: unreadable NIfTI"):
        load_scan(str(broken))


def test_nibabel_shipped_epi_slice_loads():
    scan = load_scan("nibabel:example4d.nii.gz#slice=12", size=32)
    assert scan.image.shape == (32, 32) and scan.meta["format"] == "nifti" and 0.1 < scan.image.mean() < 0.5
