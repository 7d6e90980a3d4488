"""Frames, transcoding and transfer syntax tables, checked against pydicom's own decoding
of the real files shipped with pydicom and pydicom-data."""

from __future__ import annotations

import io
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, pixel_array

from conftest import read_full as full
from conftest import testdata as data
from dicomshare.dicom import pixels, transfer
from dicomshare.dicom.pixels import NotAcceptable, PixelError

EVRLE = "1.2.840.10008.1.2.1"
IVRLE = "1.2.840.10008.1.2"
OCTET = "application/octet-stream"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def reference(path: str, index: int, *, raw: bool) -> np.ndarray:
    """pydicom's decoding of one frame, through the whole-dataset code path."""
    return pixel_array(full(path), index=index, raw=raw)


def as_array(frame: bytes, ds: Dataset, ref: np.ndarray, *, native: bool) -> np.ndarray:
    rows, cols = ds.Rows, ds.Columns
    if ds.BitsAllocated == 1:
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        return bits[: rows * cols].reshape(rows, cols)
    arr = np.frombuffer(frame, dtype=ref.dtype.newbyteorder("<"))
    spp = ds.get("SamplesPerPixel", 1)
    if native and spp > 1 and ds.get("PlanarConfiguration", 0) == 1:
        return arr.reshape(spp, rows, cols).transpose(1, 2, 0)
    return arr.reshape(ref.shape)


LOSSLESS = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
    "MR_small_expb.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm", "emri_small.dcm", "emri_small_RLE.dcm",
    "emri_small_big_endian.dcm", "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm", "SC_rgb_expb_2frame.dcm", "SC_rgb_expb_16bit_2frame.dcm",
    "SC_rgb_expb_32bit_2frame.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm",
    "color-pl.dcm", "color-px.dcm", "image_dfl.dcm", "liver.dcm", "liver_expb.dcm",
    "rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm", "OBXXXX1A_expb_2frame.dcm",
    "JPEG-LL.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "US1_J2KR.dcm",
    "gdcm-US-ALOKA-16_big.dcm", "SC_ybr_full_uncompressed.dcm", "ExplVR_BigEnd.dcm",
]
LOSSY = [
    "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "examples_ybr_color.dcm", "693_J2KI.dcm", "JPEGLSNearLossless_16.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
]


def _frame_numbers(n: int) -> list[int]:
    return list(range(1, n + 1)) if n <= 15 else [1, n // 2, n]


@pytest.mark.parametrize("name", LOSSLESS + LOSSY)
def test_octet_stream_frames_equal_pydicom(name: str) -> None:
    path = data(name)
    ds = full(path)
    native = transfer.is_native(ds.file_meta.TransferSyntaxUID)
    n = pixels.number_of_frames(path)
    assert n == int(ds.get("NumberOfFrames") or 1)
    wanted = _frame_numbers(n)
    media, ts, parts = pixels.frames(path, wanted, OCTET)
    assert (media, ts) == (OCTET, None)
    got = list(parts)
    assert len(got) == len(wanted)
    for number, frame in zip(wanted, got, strict=True):
        # Native frames keep their stored colour model; decoded ones follow decompress().
        ref = reference(path, number - 1, raw=native)
        np.testing.assert_array_equal(as_array(frame, ds, ref, native=native), ref)


def test_native_ybr_422_frame_is_the_stored_subsampled_bytes() -> None:
    path = data("SC_ybr_full_422_uncompressed.dcm")
    _, _, parts = pixels.frames(path, [1], OCTET)
    frame = next(parts)
    stored = full(path).PixelData
    assert len(frame) == 100 * 100 * 2
    assert frame == stored[: len(frame)]


def test_big_endian_frames_equal_little_endian_twin() -> None:
    for big, little in [("MR_small_bigendian.dcm", "MR_small.dcm"),
                        ("rtdose_expb.dcm", "rtdose.dcm"),
                        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
                        ("liver_expb.dcm", "liver.dcm")]:
        n = pixels.number_of_frames(data(little))
        be = list(pixels.frames(data(big), _frame_numbers(n), "*/*")[2])
        le = list(pixels.frames(data(little), _frame_numbers(n), "*/*")[2])
        assert be == le, big


ENCAPSULATED = {
    "MR_small_RLE.dcm": "image/dicom-rle",
    "MR_small_jpeg_ls_lossless.dcm": "image/jls",
    "MR_small_jp2klossless.dcm": "image/jp2",
    "JPEG-lossy.dcm": "image/jpeg",
    "JPEG-LL.dcm": "image/jpeg",
    "SC_rgb_jpeg_dcmtk.dcm": "image/jpeg",
    "SC_rgb_rle_2frame.dcm": "image/dicom-rle",
    "emri_small_jpeg_2k_lossless.dcm": "image/jp2",
    "examples_ybr_color.dcm": "image/jpeg",
    "rtdose_rle.dcm": "image/dicom-rle",
    "JPEGLSNearLossless_08.dcm": "image/jls",
}


@pytest.mark.parametrize("name", sorted(ENCAPSULATED))
def test_any_returns_stored_compressed_frames(name: str) -> None:
    path = data(name)
    ds = full(path)
    n = pixels.number_of_frames(path)
    expected = list(generate_frames(ds.PixelData, number_of_frames=n))
    wanted = _frame_numbers(n)
    media, ts, parts = pixels.frames(path, wanted, "*/*")
    assert media == ENCAPSULATED[name]
    assert ts == ds.file_meta.TransferSyntaxUID
    assert list(parts) == [expected[i - 1] for i in wanted]
    # Asking for the stored media type by name gives the same answer.
    assert pixels.frames(path, wanted, media)[:2] == (media, ts)
    if media == "image/jpeg":
        assert expected[0][:2] == b"\xff\xd8"


def test_native_any_is_octet_stream_without_transfer_syntax() -> None:
    path = data("emri_small_big_endian.dcm")
    media, ts, parts = pixels.frames(path, [3, 1, 3], "*/*")
    assert (media, ts) == (OCTET, None)
    got = list(parts)
    assert got[0] == got[2] != got[1]
    ref = reference(path, 2, raw=True)
    np.testing.assert_array_equal(np.frombuffer(got[0], "<i2").reshape(64, 64), ref)


def test_compressed_types_need_a_matching_stored_syntax() -> None:
    rle = data("MR_small_RLE.dcm")
    with pytest.raises(NotAcceptable):
        pixels.frames(rle, [1], "image/jpeg")
    with pytest.raises(NotAcceptable):
        pixels.frames(data("CT_small.dcm"), [1], "image/jls")
    baseline = data("SC_rgb_jpeg_dcmtk.dcm")
    with pytest.raises(NotAcceptable):
        pixels.frames(baseline, [1], "image/jpeg",
                      transfer_syntax="1.2.840.10008.1.2.4.70")
    assert pixels.frames(baseline, [1], "image/jpeg",
                         transfer_syntax="1.2.840.10008.1.2.4.50")[0] == "image/jpeg"
    assert pixels.frames(data("US1_J2KR.dcm"), [1], "image/*")[0] == "image/jp2"
    with pytest.raises(NotAcceptable):
        pixels.frames(rle, [1], OCTET, transfer_syntax="1.2.840.10008.1.2.5")


@pytest.mark.parametrize("numbers", [[0], [2], [1, 11], [], [-1]])
def test_frame_numbers_out_of_range(numbers: list[int]) -> None:
    path = data("emri_small.dcm") if 11 in numbers else data("CT_small.dcm")
    with pytest.raises(PixelError) as info:
        pixels.frames(path, numbers, OCTET)  # raised before any frame is read
    assert "frame" in info.value.reason


def test_out_of_range_message_names_the_count() -> None:
    with pytest.raises(PixelError, match="out of range.*10 frame"):
        pixels.frames(data("emri_small.dcm"), [11], "*/*")


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_non_image_objects(name: str) -> None:
    path = data(name)
    with pytest.raises(PixelError, match="no pixel data"):
        pixels.number_of_frames(path)
    with pytest.raises(PixelError, match="no pixel data"):
        pixels.frames(path, [1], "*/*")


def test_truncated_pixel_data() -> None:
    with pytest.raises(PixelError, match="truncated|shorter"):
        list(pixels.frames(data("MR_truncated.dcm"), [1], OCTET)[2])


def test_undecodable_data_is_a_pixel_error() -> None:
    # pydicom's plugins here cannot decode this 12-bit JPEG; the stored frame is still served.
    path = data("JPEG-lossy.dcm")
    assert pixels.frames(path, [1], "*/*")[0] == "image/jpeg"
    try:
        list(pixels.frames(path, [1], OCTET)[2])
    except PixelError as exc:
        assert "cannot decode frame 1" in exc.reason
    else:  # a later plugin may decode it: then it must match pydicom
        pytest.skip("this environment can decode JPEG-lossy.dcm")


def test_missing_file() -> None:
    with pytest.raises(PixelError, match="missing"):
        pixels.number_of_frames("/nonexistent/file.dcm")


@pytest.mark.parametrize("name,want", [("emri_small.dcm", OCTET), ("emri_small_RLE.dcm", "*/*"),
                                       ("emri_small_RLE.dcm", OCTET), ("liver.dcm", OCTET)])
def test_frames_stream_after_the_blob_is_deleted(tmp_path: Path, name: str, want: str) -> None:
    copy = tmp_path / name
    shutil.copyfile(data(name), copy)
    expected = list(pixels.frames(data(name), [2, 1], want)[2])
    _, _, parts = pixels.frames(copy, [2, 1], want)
    copy.unlink()  # e.g. a concurrent DELETE: the file was opened by frames() already
    assert list(parts) == expected


def test_one_frame_is_read_without_loading_the_rest() -> None:
    path = data("color3d_jpeg_baseline.dcm")  # 120 frames, 110 MB once decoded
    tracemalloc.start()
    try:
        stored = list(pixels.frames(path, [60], "*/*")[2])
        _, peak_stored = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decoded = list(pixels.frames(path, [60], OCTET)[2])
        _, peak_decoded = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(decoded[0]) == 480 * 640 * 3
    assert peak_stored < 2_000_000 + len(stored[0]) * 4
    assert peak_decoded < 12_000_000


# -- transcoding -------------------------------------------------------------------------

def meta_group_length_is_right(blob: bytes) -> bool:
    assert blob[128:132] == b"DICM"
    tag, vr = struct.unpack("<HH", blob[132:136]), blob[136:138]
    assert tag == (2, 0) and vr == b"UL"
    declared = struct.unpack("<L", blob[140:144])[0]
    pos = start = 144
    while struct.unpack("<H", blob[pos:pos + 2])[0] == 2:
        vr = blob[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            pos += 12 + struct.unpack("<L", blob[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", blob[pos + 6:pos + 8])[0]
    return pos - start == declared


TRANSCODE = [
    "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle_2frame.dcm", "emri_small_jpeg_2k_lossless.dcm", "rtdose_expb.dcm",
    "SC_rgb_small_odd_big_endian.dcm", "OBXXXX1A_expb_2frame.dcm", "liver_expb.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm", "JPGExtended.dcm", "US1_J2KI.dcm", "rtdose_rle.dcm",
    "ExplVR_BigEnd.dcm",
]


@pytest.mark.parametrize("name", TRANSCODE)
@pytest.mark.parametrize("target", [EVRLE, IVRLE])
def test_transcode_decodes_to_the_same_pixels(name: str, target: str) -> None:
    path = data(name)
    original = full(path)
    blob = pixels.transcode(path, target)
    assert meta_group_length_is_right(blob)
    out = dcmread(io.BytesIO(blob))
    assert out.file_meta.TransferSyntaxUID == target
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(out.pixel_array, original.pixel_array)
    if original.PhotometricInterpretation.startswith("YBR") and transfer.is_encapsulated(
        original.file_meta.TransferSyntaxUID
    ):
        assert out.PhotometricInterpretation == "RGB"


def test_transcode_big_endian_palette_keeps_the_lookup_tables() -> None:
    path = data("gdcm-US-ALOKA-16_big.dcm")
    out = dcmread(io.BytesIO(pixels.transcode(path, EVRLE)))
    original = full(path)
    np.testing.assert_array_equal(
        apply_color_lut(out.pixel_array, out),
        apply_color_lut(original.pixel_array, original),
    )
    little = full(data("gdcm-US-ALOKA-16.dcm"))
    np.testing.assert_array_equal(out.pixel_array, little.pixel_array)


@pytest.mark.parametrize("name,target", [("CT_small.dcm", EVRLE), ("rtdose.dcm", IVRLE),
                                         ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5")])
def test_transcode_to_the_stored_syntax_returns_the_stored_bytes(name: str, target: str) -> None:
    path = data(name)
    with open(path, "rb") as f:
        assert pixels.transcode(path, target) == f.read()


def test_transcode_to_binary_io() -> None:
    out = io.BytesIO()
    pixels.transcode_to(data("MR_small_RLE.dcm"), EVRLE, out)
    assert out.getvalue() == pixels.transcode(data("MR_small_RLE.dcm"), EVRLE)


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
                                    "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"])
def test_transcode_refuses_compression(target: str) -> None:
    with pytest.raises(NotAcceptable):
        pixels.transcode(data("CT_small.dcm"), target)


def test_transcode_non_image_object() -> None:
    path = data("rtplan.dcm")
    out = dcmread(io.BytesIO(pixels.transcode(path, EVRLE)))
    original = full(path)
    assert out.file_meta.TransferSyntaxUID == EVRLE
    assert out.BeamSequence[0].BeamName == original.BeamSequence[0].BeamName
    assert len(out.FractionGroupSequence) == len(original.FractionGroupSequence)


def test_transcode_refuses_truncated_pixel_data() -> None:
    with pytest.raises(PixelError):
        pixels.transcode(data("emri_small_jpeg_2k_lossless_too_short.dcm"), EVRLE)


# -- transfer syntax tables --------------------------------------------------------------

def test_frame_media_types() -> None:
    assert transfer.frame_media_type("1.2.840.10008.1.2.4.50") == "image/jpeg"
    assert transfer.frame_media_type("1.2.840.10008.1.2.4.57") == "image/jpeg"
    assert transfer.frame_media_type("1.2.840.10008.1.2.4.81") == "image/jls"
    assert transfer.frame_media_type("1.2.840.10008.1.2.4.91") == "image/jp2"
    assert transfer.frame_media_type("1.2.840.10008.1.2.4.203") == "image/jphc"
    assert transfer.frame_media_type("1.2.840.10008.1.2.5") == "image/dicom-rle"
    assert transfer.frame_media_type(EVRLE) == OCTET
    assert transfer.frame_media_type("1.2.840.10008.1.2.2") == OCTET
    with pytest.raises(ValueError):
        transfer.frame_media_type("1.2.3.4")


def test_ts_for_media_type() -> None:
    assert transfer.ts_for_media_type("image/jpeg", None) == "1.2.840.10008.1.2.4.70"
    assert transfer.ts_for_media_type("image/jpeg", "1.2.840.10008.1.2.4.50") == (
        "1.2.840.10008.1.2.4.50"
    )
    assert transfer.ts_for_media_type("image/jpeg", "1.2.840.10008.1.2.4.80") is None
    assert transfer.ts_for_media_type("image/jls", None) == "1.2.840.10008.1.2.4.80"
    assert transfer.ts_for_media_type("image/jp2", None) == "1.2.840.10008.1.2.4.90"
    assert transfer.ts_for_media_type("image/jphc", None) == "1.2.840.10008.1.2.4.201"
    assert transfer.ts_for_media_type("image/dicom-rle", None) == "1.2.840.10008.1.2.5"
    assert transfer.ts_for_media_type(OCTET, None) == EVRLE
    assert transfer.ts_for_media_type(OCTET, "1.2.840.10008.1.2.5") is None
    assert transfer.ts_for_media_type("application/dicom", "*") == EVRLE
    assert transfer.ts_for_media_type("application/dicom", "1.2.840.10008.1.2.5") == (
        "1.2.840.10008.1.2.5"
    )
    assert transfer.ts_for_media_type("application/dicom", IVRLE) is None  # PS3.18 8.7.3
    assert transfer.ts_for_media_type("image/png", None) is None


def test_can_decompress_reflects_installed_plugins() -> None:
    for uid in (EVRLE, IVRLE, "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
                "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201"):
        assert transfer.can_decompress(uid), uid
    assert not transfer.can_decompress("1.2.840.10008.1.2.4.100")  # MPEG2
    assert not transfer.can_decompress("1.2.840.10008.1.2.4.110")  # JPEG XL
    assert not transfer.can_decompress("1.2.3.4")
    assert transfer.is_lossy("1.2.840.10008.1.2.4.50")
    assert not transfer.is_lossy("1.2.840.10008.1.2.4.70")
