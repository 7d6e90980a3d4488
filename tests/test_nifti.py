"""NIfTI volumes from de-identified series (research/nifti.py), checked with nibabel.

The series are built with pydicom from its sample CT and MR files: known pixel patterns
per slice, positions along the slice normal, files named and listed in shuffled order,
so slice order, voxel values and geometry can be compared exactly with what was written.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RLELossless, generate_uid

from dicomshare.research import nifti
from dicomshare.research.nifti import NotAVolume, series_to_nifti

ROWS, COLUMNS = 96, 128  # not square, so rows and columns cannot be swapped unnoticed
PIXEL_SPACING = (0.5, 0.8)  # between rows, between columns: different for the same reason
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIGIN = (-100.0, -120.0, -50.0)
SECRET = "Doe^Jane"
SECRET_ID = "SECRET-1234"


def pattern(k: int) -> np.ndarray:
    """Slice k's stored values: a ramp over rows and columns, offset by the slice."""
    return (np.add.outer(np.arange(ROWS), 3 * np.arange(COLUMNS)) + 200 * k).astype(np.int16)


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.array(orientation[:3]), np.array(orientation[3:]))


def ras(lps: Sequence[float]) -> np.ndarray:
    return np.array([-lps[0], -lps[1], lps[2]])


def base(name: str = "CT_small.dcm", **attrs: object) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientName = SECRET
    ds.PatientID = SECRET_ID
    ds.InstitutionName = "St Elsewhere"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()


def save(ds: Dataset, folder: Path) -> Path:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def series(folder: Path, n: int = 10, *, step: float = 2.5,
           orientation: Sequence[float] = AXIAL, origin: Sequence[float] = ORIGIN,
           name: str = "CT_small.dcm", slope: float | None = 1.0,
           intercept: float | None = -1024.0, pixels: np.ndarray | None = None,
           positions: list[np.ndarray] | None = None, **attrs: object) -> list[Path]:
    """n slices of one series, ``step`` mm apart along the normal, in shuffled order."""
    series_uid = generate_uid()
    normal = normal_of(orientation)
    files = []
    for k in range(n):
        ds = base(name, SeriesInstanceUID=series_uid, **attrs)
        set_pixels(ds, pattern(k) if pixels is None else pixels[k])
        position = (np.array(origin) + k * step * normal if positions is None
                    else positions[k])
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.InstanceNumber = k + 1
        for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        files.append(save(ds, folder))
    random.Random(n).shuffle(files)
    return files


def reason(files: list[Path], tmp_path: Path) -> str:
    with pytest.raises(NotAVolume) as caught:
        series_to_nifti(files, tmp_path / "out" / "v.nii.gz")
    assert not (tmp_path / "out" / "v.nii.gz").exists()
    return caught.value.reason


def test_ct_series_values_order_and_affine(tmp_path: Path) -> None:
    files = series(tmp_path / "in")
    out = tmp_path / "nifti" / "patient" / "study" / "series.nii.gz"
    result = series_to_nifti(files, out)

    assert result is not None
    assert result.path == out and out.exists()
    assert (result.shape, result.slices, result.dtype) == ((COLUMNS, ROWS, 10), 10, "int16")
    assert result.spacing == pytest.approx((0.8, 0.5, 2.5))
    assert result.size == out.stat().st_size
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial file left

    image = nib.load(out)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == (COLUMNS, ROWS, 10)
    for k in range(10):  # by position, whatever the file order; Hounsfield units
        np.testing.assert_array_equal(data[:, :, k], pattern(k).T.astype(np.int16) - 1024)
    assert image.dataobj.slope == 1.0 and image.dataobj.inter == 0.0

    affine = image.affine
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*ras(ORIGIN), 1], atol=1e-4)
    np.testing.assert_allclose(affine[:3, :3], np.diag([-0.8, -0.5, 2.5]), atol=1e-6)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    header = image.header
    assert header.get_zooms() == pytest.approx((0.8, 0.5, 2.5))
    assert header.get_xyzt_units()[0] == "mm"
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-6)


def test_oblique_series(tmp_path: Path) -> None:
    a, b = np.radians(30), np.radians(20)
    orientation = (np.cos(a), np.sin(a), 0.0,
                   -np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b))
    rounded = [round(float(v), 6) for v in orientation]
    files = series(tmp_path / "in", 6, step=3.0, orientation=rounded)
    result = series_to_nifti(files, tmp_path / "v.nii.gz")
    assert result is not None and result.shape == (COLUMNS, ROWS, 6)

    image = nib.load(tmp_path / "v.nii.gz")
    row, col, normal = np.array(rounded[:3]), np.array(rounded[3:]), normal_of(rounded)
    for k in range(6):
        ipp = np.array(ORIGIN) + k * 3.0 * normal
        for r, c in ((0, 0), (ROWS - 1, 0), (0, COLUMNS - 1), (40, 70)):
            lps = ipp + c * PIXEL_SPACING[1] * row + r * PIXEL_SPACING[0] * col
            np.testing.assert_allclose(image.affine @ [c, r, k, 1], [*ras(lps), 1], atol=1e-3)
        np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, k], pattern(k).T - 1024)
    np.testing.assert_allclose(image.header.get_qform(), image.affine, atol=1e-4)
    assert image.header.get_zooms() == pytest.approx((0.8, 0.5, 3.0), abs=1e-4)


def test_slices_descending_along_the_normal_are_reordered(tmp_path: Path) -> None:
    # Scanned feet first: the first instance is the top slice.
    positions = [np.array(ORIGIN) - k * 2.5 * normal_of(AXIAL) for k in range(5)]
    files = series(tmp_path / "in", 5, positions=positions)
    series_to_nifti(files, tmp_path / "v.nii.gz")
    image = nib.load(tmp_path / "v.nii.gz")
    data = np.asarray(image.dataobj)
    for k in range(5):  # the lowest position (instance 5) is slice 0
        np.testing.assert_array_equal(data[:, :, k], pattern(4 - k).T - 1024)
    np.testing.assert_allclose(image.affine @ [0, 0, 0, 1], [*ras(positions[-1]), 1], atol=1e-4)
    assert image.affine[2, 2] == pytest.approx(2.5)


def test_mr_without_rescale_keeps_integers(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 4, name="MR_small.dcm", slope=None, intercept=None)
    result = series_to_nifti(files, tmp_path / "mr.nii.gz")
    assert result is not None and result.modality == "MR" and result.dtype == "int16"
    data = np.asarray(nib.load(tmp_path / "mr.nii.gz").dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data[:, :, 3], pattern(3).T)


def test_unsigned_values_above_int16_stay_exact(tmp_path: Path) -> None:
    pixels = np.stack([pattern(k).astype(np.uint16) + 40000 for k in range(3)])
    files = series(tmp_path / "in", 3, name="MR_small.dcm", slope=None, intercept=None,
                   pixels=pixels)
    result = series_to_nifti(files, tmp_path / "mr.nii.gz")
    assert result is not None and result.dtype == "uint16"
    data = np.asarray(nib.load(tmp_path / "mr.nii.gz").dataobj)
    np.testing.assert_array_equal(data[:, :, 2], pixels[2].T)


def test_fractional_slope_gives_float32(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 3, slope=0.5, intercept=-10.25)
    result = series_to_nifti(files, tmp_path / "v.nii.gz")
    assert result is not None and result.dtype == "float32"
    data = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data[:, :, 1], pattern(1).T * 0.5 - 10.25)


def test_compressed_instances(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 4)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    series_to_nifti(files, tmp_path / "v.nii.gz")
    data = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj)
    np.testing.assert_array_equal(data[:, :, 2], pattern(2).T - 1024)


def test_enhanced_multi_frame_instance(tmp_path: Path) -> None:
    order = [3, 0, 4, 1, 2]  # frame f shows the slice at position order[f]
    ds = base(SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    set_pixels(ds, np.stack([pattern(k) for k in order]))
    ds.NumberOfFrames = len(order)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)

    def item(**values: object) -> Dataset:
        d = Dataset()
        for key, value in values.items():
            setattr(d, key, value)
        return d

    shared = item(
        PlaneOrientationSequence=DicomSequence([item(ImageOrientationPatient=list(AXIAL))]),
        PixelMeasuresSequence=DicomSequence([item(PixelSpacing=list(PIXEL_SPACING),
                                                  SliceThickness=2.5)]),
        PixelValueTransformationSequence=DicomSequence([item(
            RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([
        item(PlanePositionSequence=DicomSequence([item(ImagePositionPatient=[
            ORIGIN[0], ORIGIN[1], ORIGIN[2] + 2.5 * k])])) for k in order])
    path = save(ds, tmp_path / "in")

    result = series_to_nifti([path], tmp_path / "v.nii.gz")
    assert result is not None and result.shape == (COLUMNS, ROWS, 5) and result.slices == 5
    image = nib.load(tmp_path / "v.nii.gz")
    data = np.asarray(image.dataobj)
    for k in range(5):
        np.testing.assert_array_equal(data[:, :, k], pattern(k).T - 1024)
    np.testing.assert_allclose(image.affine @ [0, 0, 0, 1], [*ras(ORIGIN), 1], atol=1e-4)
    assert image.header.get_zooms() == pytest.approx((0.8, 0.5, 2.5))


def test_header_carries_no_identifying_text(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 3, StudyDescription="CT head for Jane Doe",
                   SeriesDescription=SECRET_ID)
    out = tmp_path / "v.nii.gz"
    series_to_nifti(files, out)
    header = nib.load(out).header
    assert header["descrip"].item() == b"dicomshare"
    assert header["db_name"].item() == b"" and header["aux_file"].item() == b""
    assert header["intent_name"].item() == b""
    assert len(header.extensions) == 0
    raw = out.read_bytes()
    assert raw[3] & 0x08 == 0, "the gzip header names a file"
    assert raw[4:8] == b"\0\0\0\0", "the gzip header carries a time"
    content = gzip.decompress(raw)
    for text in (SECRET, SECRET_ID, "Jane", "Elsewhere", files[0].stem):
        assert text.encode() not in content


@pytest.mark.parametrize(("damage", "expected"), [
    ("localizer", "localizer"),
    ("other plane", "mixed orientations"),
    ("size", "different sizes"),
    ("gap", "irregular slice gaps"),
    ("duplicate", "one position"),
    ("tilt", "sheared"),
    ("spacing", "pixel spacings"),
    ("rgb", "not greyscale"),
    ("single", "at least 2"),
])
def test_not_a_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str,
                      expected: str) -> None:
    files = series(tmp_path / "in", 6)
    by_instance = sorted(files, key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    victim = by_instance[3]
    ds = pydicom.dcmread(victim)
    if damage == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif damage == "other plane":
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif damage == "size":
        set_pixels(ds, pattern(3)[:64])
    elif damage == "gap":
        victim.unlink()
    elif damage == "duplicate":
        ds.ImagePositionPatient = pydicom.dcmread(by_instance[2]).ImagePositionPatient
    elif damage == "tilt":
        for k, path in enumerate(by_instance):
            tilted = pydicom.dcmread(path)
            tilted.ImagePositionPatient = [ORIGIN[0], ORIGIN[1] + 0.8 * k, ORIGIN[2] + 2.5 * k]
            tilted.save_as(path)
    elif damage == "spacing":
        ds.PixelSpacing = [0.6, 0.8]
    elif damage == "rgb":
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.zeros((ROWS, COLUMNS, 3), np.uint8).tobytes()
    if damage not in ("gap", "tilt", "single"):
        ds.save_as(victim)
    if damage == "gap":
        files = [f for f in files if f != victim]
    if damage == "single":
        files = [victim]

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels decoded for a series that is not a volume")

    monkeypatch.setattr(nifti, "pixel_array", no_decoding)  # headers decide, cheaply
    assert expected in reason(files, tmp_path)


def test_not_ct_or_mr_is_not_applicable(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 3, Modality="PT")
    assert series_to_nifti(files, tmp_path / "v.nii.gz") is None
    assert not (tmp_path / "v.nii.gz").exists()


def test_mixed_modalities_and_empty_series(tmp_path: Path) -> None:
    files = series(tmp_path / "in", 3)
    ds = pydicom.dcmread(files[0])
    ds.Modality = "MR"
    ds.save_as(files[0])
    assert "mixed modalities" in reason(files, tmp_path)
    assert "no instances" in reason([], tmp_path)
