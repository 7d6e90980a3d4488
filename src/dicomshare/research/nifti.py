"""One NIfTI-1 volume (``.nii.gz``) from the de-identified DICOM files of one CT or MR series.

Research pipelines mostly want volumes, not slices. A volume is only written when the
series really is one regular grid: a single orientation, one image size and pixel
spacing, slices evenly spaced along the slice normal and not sheared (no gantry tilt),
one image per position, greyscale. Anything else raises :class:`NotAVolume` with a
reason for the export report; a series that is not CT or MR is simply not applicable
(``None``). Guessing at a resampling would hand researchers geometry the scanner never
produced.

Headers are read first, without pixels, so a series that is not a volume costs no
decoding; the pixels are then decoded one slice at a time into a single array. Voxels
are the modality values (RescaleSlope/Intercept applied: Hounsfield units for CT), as
int16 when that is exact, else the smallest exact integer type, else float32.

Geometry: voxel index (i, j, k) is (column, row, slice), slices sorted by their position
along the normal ``row direction x column direction`` (never by file order). The affine
maps voxel (0, 0, 0) to the first slice's ImagePositionPatient; DICOM patient
coordinates are LPS and NIfTI's are RAS, so the first two rows are negated. qform and
sform both carry it with the scanner code. The header carries no text from the DICOM
files (``descrip`` is ``dicomshare``), and nibabel writes the gzip stream without a file
name or time stamp.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

MODALITIES = ("CT", "MR")
# Cosines of the orientation may differ this much between slices (about 0.06 degrees):
# DS rounding differs between scanners, a localizer or another plane differs by far more.
ORIENTATION_TOLERANCE = 1e-3
# Pixel spacing (mm) may differ this much between slices.
SPACING_TOLERANCE = 1e-3
# A gap between slice positions may differ from the median gap by this much:
# max(GAP_TOLERANCE_MM, GAP_TOLERANCE_RELATIVE x median).
GAP_TOLERANCE_MM = 0.01
GAP_TOLERANCE_RELATIVE = 0.01
# No slice may be further than this fraction of a voxel from where the affine puts it.
POSITION_TOLERANCE_VOXELS = 0.1
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SCANNER = 1  # NIFTI_XFORM_SCANNER_ANAT
DESCRIPTION = b"dicomshare"


class NotAVolume(Exception):
    """The series cannot be one regular NIfTI volume; ``reason`` says why (no identifiers)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class NiftiResult:
    """What was written: for the export manifest."""

    path: Path
    shape: tuple[int, int, int]  # (columns, rows, slices): NIfTI i, j, k
    spacing: tuple[float, float, float]  # mm along i, j, k
    slices: int  # images used, one per slice
    dtype: str
    modality: str
    size: int
    sha256: str

    def as_json(self, root: Path | None = None) -> dict[str, Any]:
        """``path`` relative to ``root`` (the export folder) when given."""
        path = self.path.relative_to(root) if root is not None else self.path
        return {"path": str(path), "shape": list(self.shape), "spacing": list(self.spacing),
                "slices": self.slices, "dtype": self.dtype, "modality": self.modality,
                "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class _Slice:
    """One image plane: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    position: np.ndarray  # ImagePositionPatient, LPS, mm
    orientation: np.ndarray  # ImageOrientationPatient: row then column direction cosines
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    slope: float
    intercept: float


def series_to_nifti(files: list[Path], out_path: Path) -> NiftiResult | None:
    """Write ``out_path`` (``.nii.gz``) from the files of one series.

    Returns None when the series is not CT or MR (nothing to report); raises
    :class:`NotAVolume` when it is CT or MR but not one regular volume.
    """
    if not files:
        raise NotAVolume("no instances")
    headers: list[tuple[Path, Dataset]] = [
        (Path(f), pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    modalities = {str(ds.get("Modality", "")).strip().upper() for _, ds in headers}
    if not modalities & set(MODALITIES):
        return None
    if len(modalities) > 1:
        raise NotAVolume(f"mixed modalities {', '.join(sorted(modalities))}")
    modality = modalities.pop()
    rows, columns = _check_images(headers)
    slices = _slices(headers)
    ordered, step, row_dir, col_dir, normal = _geometry(slices)
    data = _voxels(ordered, rows, columns)

    dr, dc = ordered[0].spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # i: along a row, one column to the next
    lps[:3, 1] = col_dir * dr  # j: down a column, one row to the next
    lps[:3, 2] = normal * step
    lps[:3, 3] = ordered[0].position
    affine = _RAS_FROM_LPS @ lps

    # (slices, rows, columns) in C order is (columns, rows, slices) in Fortran order,
    # NIfTI's own: the transpose costs no copy.
    volume = data.transpose(2, 1, 0)
    header = nib.Nifti1Header()
    header.set_data_dtype(volume.dtype)
    image = nib.Nifti1Image(volume, affine, header)
    image.set_qform(affine, code=_SCANNER)
    image.set_sform(affine, code=_SCANNER)
    hdr = image.header
    hdr.set_xyzt_units("mm")
    hdr.set_zooms((dc, dr, step))
    hdr["descrip"] = DESCRIPTION
    hdr["db_name"] = b""
    hdr["aux_file"] = b""
    hdr["intent_name"] = b""
    hdr.set_slope_inter(1.0, 0.0)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel picks gzip from the name's ending, so the temporary name keeps it.
    partial = out_path.with_name(f".partial-{os.getpid()}-{out_path.name}")
    try:
        nib.save(image, partial)
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = partial.stat().st_size
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    return NiftiResult(out_path, shape, (float(dc), float(dr), float(step)), len(ordered),
                       str(volume.dtype), modality, size, digest.hexdigest())


def _check_images(headers: list[tuple[Path, Dataset]]) -> tuple[int, int]:
    """Every instance a greyscale image of one size, none a localizer."""
    sizes = set()
    for _, ds in headers:
        if "Rows" not in ds or "Columns" not in ds:
            raise NotAVolume("an instance has no image (no Rows/Columns)")
        image_type = [str(v).strip().upper() for v in _values(ds.get("ImageType"))]
        if "LOCALIZER" in image_type:
            raise NotAVolume("a localizer is in the series")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise NotAVolume(f"not greyscale ({photometric or 'no photometric interpretation'}, "
                             f"{samples} samples per pixel)")
        sizes.add((int(ds.Rows), int(ds.Columns)))
    if len(sizes) > 1:
        raise NotAVolume("images of different sizes: "
                         + ", ".join(f"{r}x{c}" for r, c in sorted(sizes)))
    return sizes.pop()


def _slices(headers: list[tuple[Path, Dataset]]) -> list[_Slice]:
    """Planes of single-frame instances, or of the frames of one multi-frame instance."""
    multi = [(p, ds) for p, ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if not multi:
        return [_single(p, ds) for p, ds in headers]
    if len(headers) > 1:
        raise NotAVolume("multi-frame instances together with others are not supported")
    path, ds = multi[0]
    return [_frame(path, ds, k) for k in range(int(ds.NumberOfFrames))]


def _single(path: Path, ds: Dataset) -> _Slice:
    return _plane(path, None, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                  ds.get("PixelSpacing"), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))


def _frame(path: Path, ds: Dataset, index: int) -> _Slice:
    """A frame of an enhanced multi-frame instance: its functional groups, else the shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not per_frame or len(per_frame) <= index:
        raise NotAVolume("multi-frame instance without per-frame functional groups")
    groups = [per_frame[index]] + ([shared[0]] if shared else [])

    def find(sequence: str, keyword: str) -> Any:
        for group in groups:
            items = group.get(sequence)
            if items and keyword in items[0]:
                return items[0].get(keyword)
        return ds.get(keyword)  # a few writers keep the plane at the top level too

    return _plane(path, index, find("PlanePositionSequence", "ImagePositionPatient"),
                  find("PlaneOrientationSequence", "ImageOrientationPatient"),
                  find("PixelMeasuresSequence", "PixelSpacing"),
                  find("PixelValueTransformationSequence", "RescaleSlope"),
                  find("PixelValueTransformationSequence", "RescaleIntercept"))


def _plane(path: Path, frame: int | None, position: Any, orientation: Any, spacing: Any,
           slope: Any, intercept: Any) -> _Slice:
    pos = _floats(position, 3, "ImagePositionPatient")
    ori = _floats(orientation, 6, "ImageOrientationPatient")
    px = _floats(spacing, 2, "PixelSpacing")
    if px[0] <= 0 or px[1] <= 0:
        raise NotAVolume("PixelSpacing is not positive")
    return _Slice(path, frame, pos, ori, (float(px[0]), float(px[1])),
                  _float(slope, 1.0), _float(intercept, 0.0))


def _geometry(slices: list[_Slice]) -> tuple[list[_Slice], float, np.ndarray, np.ndarray,
                                               np.ndarray]:
    """Slices in order along the normal, the slice step, and the three unit axes."""
    if len(slices) < 2:
        raise NotAVolume(f"{len(slices)} slice(s): a volume needs at least 2")
    first = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise NotAVolume("mixed orientations (a localizer or several planes?)")
        if max(abs(a - b) for a, b in zip(s.spacing, first.spacing, strict=True)) \
                > SPACING_TOLERANCE:
            raise NotAVolume("different pixel spacings")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if min(np.linalg.norm(row_dir), np.linalg.norm(col_dir)) < 0.5:
        raise NotAVolume("invalid ImageOrientationPatient")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    if abs(float(row_dir @ col_dir)) > ORIENTATION_TOLERANCE:
        raise NotAVolume("ImageOrientationPatient is not orthogonal")
    # Orthonormal to the last digit, so the qform (a rotation and zooms) equals the sform.
    col_dir = col_dir - (row_dir @ col_dir) * row_dir
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    along = np.array([float(s.position @ normal) for s in ordered])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    tolerance = max(GAP_TOLERANCE_MM, GAP_TOLERANCE_RELATIVE * median)
    if float(gaps.min()) <= tolerance:
        raise NotAVolume("several images at one position (echoes, phases or repeats?)")
    if float(np.max(np.abs(gaps - median))) > tolerance:
        raise NotAVolume(f"irregular slice gaps ({float(gaps.min()):.3f} to "
                         f"{float(gaps.max()):.3f} mm)")
    step = float(along[-1] - along[0]) / (len(ordered) - 1)
    # Where the affine puts each slice against where the scanner says it is: small gap
    # differences must not add up, and slices must not slide in plane (gantry tilt).
    origin = ordered[0].position
    in_plane = max(GAP_TOLERANCE_MM, POSITION_TOLERANCE_VOXELS * min(first.spacing))
    for k, s in enumerate(ordered):
        along_error = abs(float(along[k] - along[0]) - k * step)
        if along_error > max(GAP_TOLERANCE_MM, POSITION_TOLERANCE_VOXELS * step):
            raise NotAVolume("irregular slice gaps (they add up along the series)")
        offset = s.position - origin - float(along[k] - along[0]) * normal
        if float(np.linalg.norm(offset)) > in_plane:
            raise NotAVolume("slices are sheared (gantry tilt?)")
    return ordered, step, row_dir, col_dir, normal


def _voxels(ordered: list[_Slice], rows: int, columns: int) -> np.ndarray:
    """(slices, rows, columns) modality values, in the smallest exact type."""
    raw: np.ndarray | None = None
    for k, s in enumerate(ordered):
        plane = np.asarray(pixel_array(s.path, index=s.frame))
        if plane.shape != (rows, columns):
            raise NotAVolume(f"a decoded image is {plane.shape}, not {(rows, columns)}")
        if not plane.dtype.isnative:
            plane = plane.astype(plane.dtype.newbyteorder("="))
        if raw is None:
            raw = np.empty((len(ordered), rows, columns), dtype=plane.dtype)
        elif plane.dtype != raw.dtype:
            raise NotAVolume("pixel representation differs between images")
        raw[k] = plane
    assert raw is not None
    slopes = np.array([s.slope for s in ordered])
    intercepts = np.array([s.intercept for s in ordered])
    target = _target_dtype(raw, slopes, intercepts)
    if target == raw.dtype and bool(np.all(slopes == 1.0) and np.all(intercepts == 0.0)):
        return raw
    # Same width: convert slice by slice in place, so the volume is held only once.
    out = raw.view(target) if target.itemsize == raw.dtype.itemsize \
        else np.empty(raw.shape, dtype=target)
    exact = target.kind in "iu"
    for k in range(len(ordered)):
        if exact:
            values = raw[k].astype(np.int64) * int(slopes[k]) + int(intercepts[k])
        else:
            values = raw[k].astype(np.float64) * slopes[k] + intercepts[k]
        out[k] = values.astype(target)
    return out


def _target_dtype(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.dtype[Any]:
    """int16 when every value fits exactly, else uint16 or int32, else float32."""
    integral = raw.dtype.kind in "iu" and all(float(v).is_integer()
                                              for v in np.concatenate([slopes, intercepts]))
    if not integral:
        return np.dtype(np.float32)
    lows = raw.min(axis=(1, 2)).astype(np.int64)
    highs = raw.max(axis=(1, 2)).astype(np.int64)
    ends = np.concatenate([lows * slopes.astype(np.int64), highs * slopes.astype(np.int64)])
    ends = ends + np.concatenate([intercepts, intercepts]).astype(np.int64)
    low, high = int(ends.min()), int(ends.max())
    for candidate in (np.int16, np.uint16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _floats(value: Any, count: int, name: str) -> np.ndarray:
    items = _values(value)
    try:
        result = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise NotAVolume(f"invalid {name}") from None
    if result.shape != (count,) or not np.all(np.isfinite(result)):
        raise NotAVolume(f"missing or invalid {name}")
    return result


def _float(value: Any, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise NotAVolume("invalid rescale slope or intercept") from None
    if not np.isfinite(result) or (result == 0.0 and default == 1.0):
        raise NotAVolume("invalid rescale slope")
    return result
