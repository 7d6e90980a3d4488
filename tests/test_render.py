"""Rendered and thumbnail images, checked against the PS3.3 C.11.2.1 formulas computed
here with numpy and against pydicom's decoding of real files."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

from conftest import read_full as full
from conftest import testdata as data
from dicomshare.dicom.pixels import NotAcceptable, PixelError
from dicomshare.dicom.render import render, thumbnail

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def decode(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


def png(
    path: str, frame: int | None = None, *, window: tuple[float, float, str] | None = None
) -> np.ndarray:
    return np.asarray(decode(render(path, frame, media_type="image/png", window=window)))


def linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 with ymin = 0, ymax = 255."""
    out = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    out = np.where(x <= c - 0.5 - (w - 1) / 2, 0, out)
    out = np.where(x > c - 0.5 + (w - 1) / 2, 255, out)
    return np.rint(out).astype(np.uint8)


def linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2."""
    out = ((x - c) / w + 0.5) * 255
    out = np.where(x <= c - w / 2, 0, out)
    out = np.where(x > c + w / 2, 255, out)
    return np.rint(out).astype(np.uint8)


def sigmoid(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1."""
    return np.rint(255 / (1 + np.exp(-4 * (x - c) / w))).astype(np.uint8)


def ct_small_hu() -> np.ndarray:
    ds = full(data("CT_small.dcm"))
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


RENDERABLE = [
    ("CT_small.dcm", None, "L"), ("MR_small_RLE.dcm", None, "L"),
    ("MR_small_jpeg_ls_lossless.dcm", None, "L"), ("MR_small_jp2klossless.dcm", None, "L"),
    ("MR_small_bigendian.dcm", None, "L"), ("SC_rgb_jpeg_dcmtk.dcm", None, "RGB"),
    ("SC_rgb_rle_2frame.dcm", 2, "RGB"), ("emri_small.dcm", 5, "L"), ("image_dfl.dcm", None, "L"),
    ("liver.dcm", 2, "L"), ("rtdose.dcm", 15, "L"), ("OBXXXX1A.dcm", None, "RGB"),
    ("US1_J2KR.dcm", None, "RGB"), ("SC_ybr_full_422_uncompressed.dcm", None, "RGB"),
    ("color-pl.dcm", None, "RGB"), ("JPGExtended.dcm", None, "L"), ("vlut_04.dcm", None, "L"),
    ("mlut_18.dcm", None, "L"), ("SC_rgb_16bit.dcm", None, "RGB"), ("693_J2KI.dcm", None, "L"),
    ("gdcm-US-ALOKA-16_big.dcm", None, "RGB"), ("examples_ybr_color.dcm", 30, "RGB"),
    ("eCT_Supplemental.dcm", 2, "L"), ("SC_rgb_small_odd_big_endian.dcm", None, "RGB"),
]


@pytest.mark.parametrize("name,frame,mode", RENDERABLE)
@pytest.mark.parametrize("media_type,fmt", [("image/jpeg", "JPEG"), ("image/png", "PNG")])
def test_render_decodes_to_the_image_size(
    name: str, frame: int | None, mode: str, media_type: str, fmt: str
) -> None:
    path = data(name)
    ds = full(path)
    image = decode(render(path, frame, media_type=media_type))
    assert image.format == fmt
    assert image.size == (ds.Columns, ds.Rows)
    assert image.mode == mode


def test_explicit_linear_window_matches_the_formula() -> None:
    got = png(data("CT_small.dcm"), window=(40.0, 400.0, "linear"))
    np.testing.assert_array_equal(got, linear(ct_small_hu(), 40.0, 400.0))


def test_explicit_linear_exact_and_sigmoid_windows() -> None:
    path, hu = data("CT_small.dcm"), ct_small_hu()
    got = png(path, window=(35.5, 250.5, "linear-exact"))
    np.testing.assert_array_equal(got, linear_exact(hu, 35.5, 250.5))
    got = png(path, window=(100.0, 300.0, "sigmoid"))
    assert np.abs(got.astype(int) - sigmoid(hu, 100.0, 300.0)).max() <= 1


def test_window_from_the_file() -> None:
    path = data("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600, no rescale
    ds = full(path)
    expected = linear(ds.pixel_array.astype(np.float64), 600.0, 1600.0)
    np.testing.assert_array_equal(png(path), expected)


def test_first_of_several_file_windows() -> None:
    path = data("examples_overlay.dcm")  # WindowCenter [450, 200], WindowWidth [790, 443]
    ds = full(path)
    expected = linear(ds.pixel_array.astype(np.float64), 450.0, 790.0)
    np.testing.assert_array_equal(png(path), expected)


def test_window_from_shared_functional_groups() -> None:
    path = data("eCT_Supplemental.dcm")
    ds = full(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    voi = shared.FrameVOILUTSequence[0]
    pvt = shared.PixelValueTransformationSequence[0]
    center = float(voi.WindowCenter[0] if voi["WindowCenter"].VM > 1 else voi.WindowCenter)
    width = float(voi.WindowWidth[0] if voi["WindowWidth"].VM > 1 else voi.WindowWidth)
    values = pixel_array(path, index=1).astype(np.float64) * float(pvt.RescaleSlope) + float(
        pvt.RescaleIntercept
    )
    np.testing.assert_array_equal(png(path, 2), linear(values, center, width))


def test_min_max_when_the_file_has_no_voi() -> None:
    got = png(data("CT_small.dcm"))  # no WindowCenter, no VOI LUT
    hu = ct_small_hu()
    expected = np.rint((hu - hu.min()) * (255 / (hu.max() - hu.min()))).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_voi_lut_sequence_is_used() -> None:
    got = png(data("vlut_04.dcm"))
    assert got.min() == 0 and got.max() >= 250


def test_monochrome1_is_inverted() -> None:
    path = data("RG1_UNCI.dcm")
    ds = full(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    got = png(path, window=(15000.0, 30000.0, "linear"))
    np.testing.assert_array_equal(got, 255 - linear(ds.pixel_array.astype(float), 15000, 30000))


def test_rgb_and_ybr_become_the_decoded_rgb() -> None:
    for name in ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_uncompressed.dcm"):
        path = data(name)
        np.testing.assert_array_equal(png(path), full(path).pixel_array)


def test_palette_colour_is_applied() -> None:
    path = data("OBXXXX1A.dcm")
    ds = full(path)
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)  # 16-bit entries
    np.testing.assert_array_equal(png(path), expected)


def test_rgb_16_bit_is_scaled_to_8_bits() -> None:
    path = data("SC_rgb_16bit.dcm")
    ds = full(path)
    np.testing.assert_array_equal(png(path), (ds.pixel_array >> 8).astype(np.uint8))


@pytest.mark.parametrize("name,viewport,size", [
    ("CT_small.dcm", (64, 32), (32, 32)),
    ("JPEG2000.dcm", (100, 100), (25, 100)),  # 256 columns x 1024 rows
    ("MR_small.dcm", (200, 100), (100, 100)),  # scaled up
    ("SC_rgb_jpeg_dcmtk.dcm", (50, 400), (50, 50)),
])
def test_viewport_fits_and_keeps_aspect_ratio(
    name: str, viewport: tuple[int, int], size: tuple[int, int]
) -> None:
    image = decode(render(data(name), viewport=viewport))
    assert image.size == size


def test_quality_changes_the_jpeg() -> None:
    path = data("SC_rgb_jpeg_dcmtk.dcm")
    low, high = render(path, quality=10), render(path, quality=95)
    assert len(low) < len(high)
    assert render(path) != low
    with pytest.raises(PixelError):
        render(path, quality=0)


def test_gif_output() -> None:
    assert decode(render(data("SC_rgb.dcm"), media_type="image/gif")).format == "GIF"
    assert decode(render(data("CT_small.dcm"), media_type="image/gif")).format == "GIF"


def test_thumbnail_is_the_middle_frame_fitted() -> None:
    path = data("emri_small.dcm")  # 10 frames of 64 x 64
    thumb = decode(thumbnail(path, media_type="image/png", size=32))
    assert thumb.size == (32, 32)
    middle = decode(render(path, 6, media_type="image/png", viewport=(32, 32)))
    np.testing.assert_array_equal(np.asarray(thumb), np.asarray(middle))
    image = decode(thumbnail(data("JPEG2000.dcm")))
    assert image.format == "JPEG" and image.size == (32, 128)


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_non_image_objects_are_refused(name: str) -> None:
    with pytest.raises(PixelError, match="no pixel data"):
        render(data(name))
    with pytest.raises(PixelError, match="no pixel data"):
        thumbnail(data(name))


@pytest.mark.parametrize("frame", [0, 11, -1])
def test_out_of_range_frame(frame: int) -> None:
    with pytest.raises(PixelError, match="frame"):
        render(data("emri_small.dcm"), frame)


def test_bad_requests() -> None:
    path = data("CT_small.dcm")
    with pytest.raises(NotAcceptable):
        render(path, media_type="image/tiff")
    with pytest.raises(PixelError, match="window function"):
        render(path, window=(40, 400, "cubic"))
    with pytest.raises(PixelError, match="width"):
        render(path, window=(40, 0.5, "linear"))
    with pytest.raises(PixelError, match="viewport"):
        render(path, viewport=(0, 10))
    with pytest.raises(PixelError, match="viewport"):
        render(path, viewport=(10, 1_000_000))


def test_rendering_decodes_only_one_frame() -> None:
    path = data("color3d_jpeg_baseline.dcm")  # 120 frames, 110 MB once decoded
    tracemalloc.start()
    try:
        image = decode(render(path, 60, viewport=(64, 64)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size == (64, 48)
    assert peak < 20_000_000
