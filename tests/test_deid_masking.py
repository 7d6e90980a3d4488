"""Burned-in annotation masking: text drawn into real pixels must be gone, the rest untouched.

Each test draws a string ("PHI-4F2A DOE^JOHN") into the pixels of an instance built from
pydicom's sample files with Pillow, runs :class:`MaskingHook`, and checks pixel values: the
rule's rectangles are 0 in every frame, nothing of the rendering survives there, and every
other pixel (and, for native pixel data, every other byte) is what it was. No OCR.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from conftest import testdata as data
from dicomshare.deid.masking import (
    DEFAULT_RULES,
    MaskingHook,
    MaskRule,
    RulesError,
    default_rules,
    load_rules,
    parse_rules,
)
from dicomshare.deid.pixels import HoldBack

TEXT = "PHI-4F2A DOE^JOHN"
KEY = b"masking-test-project-key-0123456789"


def render(width: int, height: int, text: str = TEXT) -> np.ndarray:
    """Where the text's pixels are (bool, height x width): crisp, no anti-aliasing."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"
    draw.text((2, 2), text, fill=255, font=ImageFont.load_default(size=16))
    mask = np.asarray(image) > 0
    assert mask.sum() > 100, "the text did not render"
    return mask


def draw(pixels: np.ndarray, box: tuple[int, int, int, int], value: int,
         text: str = TEXT) -> np.ndarray:
    """Burn ``text`` into ``pixels`` (rows, cols[, samples]) at box x, y, w, h; the mask."""
    x, y, w, h = box
    mask = render(w, h, text)
    pixels[y:y + h, x:x + w][mask] = value
    return mask


def rule(name: str, rows: int, cols: int, rects: list[object], **match: object) -> MaskRule:
    return parse_rules({"rules": [{"name": name, "Rows": rows, "Columns": cols,
                                   "rectangles": rects, **match}]}, "test")[0]


def hook_for(*rules: MaskRule) -> MaskingHook:
    return MaskingHook(rules, defaults=False)


def native(ds: Dataset) -> np.ndarray:
    """The raw bytes of native 8-bit pixel data as an array (frames, rows, cols, samples)."""
    frames = int(ds.get("NumberOfFrames") or 1)
    return np.frombuffer(ds.PixelData, np.uint8).reshape(
        frames, ds.Rows, ds.Columns, ds.SamplesPerPixel)


def reread(ds: Dataset) -> Dataset:
    """Write as a Part 10 file and read it back: the result must be valid and decodable."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def assert_masked(after: np.ndarray, before: np.ndarray, box: tuple[int, int, int, int],
                  text: np.ndarray, value: int) -> None:
    """Box all 0 in every frame, the text gone, everything else identical (frames first)."""
    x, y, w, h = box
    region = after[:, y:y + h, x:x + w]
    assert not region.any(), "masked region is not all 0"
    assert not (region[:, text] == value).any(), "the drawn text survives"
    assert not np.array_equal(region, before[:, y:y + h, x:x + w])
    restored = after.copy()
    restored[:, y:y + h, x:x + w] = before[:, y:y + h, x:x + w]
    assert np.array_equal(restored, before), "pixels outside the rectangles changed"


@pytest.fixture
def us() -> Dataset:
    """GE LOGIQ 700 ultrasound, 480x640 RGB, native, with our text burned in."""
    ds = pydicom.dcmread(data("US1_UNCR.dcm"))
    pixels = ds.pixel_array.copy()
    draw(pixels, (300, 120, 320, 40), 255)
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "YES"
    return ds


US_BOX = (300, 120, 320, 40)
US_RULE = rule("site-logiq", 480, 640, [list(US_BOX)], Manufacturer="G.E. Medical Systems",
               ManufacturerModelName={"regex": "LOGIQ.*"}, Modality="US")


def test_region_blacked_out_and_rest_byte_identical(us: Dataset) -> None:
    before = native(us).copy()
    text = render(*US_BOX[2:])
    hook = hook_for(US_RULE)
    assert hook(us, "modality US") is us
    assert_masked(native(us), before, US_BOX, text, 255)
    assert us.BurnedInAnnotation == "NO"
    assert us.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert hook.last is not None
    assert (hook.last.rule, hook.last.rectangles, hook.last.frames) == ("site-logiq",
                                                                        [US_BOX], 1)
    assert hook.last.decompressed_from is None
    assert "site-logiq" in hook.last.note() and "[300,120,320,40]" in hook.last.note()
    out = reread(us)
    assert not out.pixel_array[120:160, 300:620].any()
    assert np.array_equal(out.pixel_array[:120], before[0, :120])


def test_default_rules_cover_the_logiq_header() -> None:
    """The packaged GE LOGIQ 700 rule removes the sample's real header (institution, IDs)."""
    ds = pydicom.dcmread(data("US1_UNCR.dcm"))
    before = ds.pixel_array.copy()
    assert before[:106].max() > 200  # "BAPTIST MED CTR" and the identifiers
    hook = MaskingHook()
    hook(ds, "")
    assert hook.last is not None and hook.last.rule == "ge-logiq-700-us-640x480"
    assert hook.last.source == "masks.json"
    after = ds.pixel_array
    assert not after[:106].any()
    assert np.array_equal(after[106:], before[106:])


def test_no_matching_rule_holds_back_untouched(us: Dataset) -> None:
    us.ManufacturerModelName = "LOGIQ E9"
    us.Rows, us.Columns = 480, 640
    before = bytes(us.PixelData)
    with pytest.raises(HoldBack) as info:
        hook_for(rule("other", 480, 640, [[0, 0, 640, 10]], ManufacturerModelName="LOGIQ 700"))(
            us, "modality US")
    assert info.value.reason == ("burned-in text risk (Modality US) and no masking rule for "
                                 "G.E. Medical Systems/LOGIQ E9 480x640")
    assert us.BurnedInAnnotation == "YES" and us.PixelData == before


def test_no_rule_for_unknown_device_with_defaults() -> None:
    ds = pydicom.dcmread(data("examples_palette.dcm"))
    with pytest.raises(HoldBack, match=r"no masking rule for Philips Medical Systems/CX50 "
                                       r"350x800$"):
        MaskingHook()(ds, "")


def test_rows_and_columns_must_match(us: Dataset) -> None:
    small = rule("small", 240, 320, [[0, 0, 10, 10]])
    assert hook_for(small).find(us) is None
    assert hook_for(US_RULE, small).find(us) is US_RULE


def test_every_frame_of_a_multiframe_is_masked(us: Dataset) -> None:
    frame = pydicom.dcmread(data("US1_UNCR.dcm")).pixel_array
    frames = np.stack([frame.copy() for _ in range(4)])
    texts = [draw(frames[i], US_BOX, 250 - i, f"{TEXT} {i}") for i in range(4)]
    us.SOPClassUID = UltrasoundMultiFrameImageStorage
    us.NumberOfFrames = 4
    us.PixelData = frames.tobytes()
    hook = hook_for(US_RULE)
    hook(us, "")
    after = native(us)
    assert hook.last is not None and hook.last.frames == 4
    for i in range(4):
        assert_masked(after[i:i + 1], frames[i:i + 1], US_BOX, texts[i], 250 - i)


def test_planar_configuration_1_kept_and_masked(us: Dataset) -> None:
    pixels = us.pixel_array.copy()
    us.PixelData = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    us.PlanarConfiguration = 1
    raw_before = np.frombuffer(us.PixelData, np.uint8).reshape(3, 480, 640).copy()
    hook_for(US_RULE)(us, "")
    assert us.PlanarConfiguration == 1
    raw_after = np.frombuffer(us.PixelData, np.uint8).reshape(3, 480, 640)
    x, y, w, h = US_BOX
    assert not raw_after[:, y:y + h, x:x + w].any()
    raw_after = raw_after.copy()
    raw_after[:, y:y + h, x:x + w] = raw_before[:, y:y + h, x:x + w]
    assert np.array_equal(raw_after, raw_before)
    assert_masked(reread(us).pixel_array[None], pixels[None], US_BOX, render(w, h), 255)


def test_jpeg2000_lossless_input_masked_and_written_uncompressed() -> None:
    ds = pydicom.dcmread(data("US1_J2KR.dcm"))
    pixels = ds.pixel_array.copy()
    text = draw(pixels, US_BOX, 255)
    ds.PhotometricInterpretation = "RGB"
    ds.compress(JPEG2000Lossless, pixels, generate_instance_uid=False)
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    sop = ds.SOPInstanceUID
    hook = hook_for(US_RULE)
    hook(ds, "")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and ds.PlanarConfiguration == 0
    assert not ds["PixelData"].is_undefined_length
    assert ds.SOPInstanceUID == sop  # pseudonymous UIDs are the engine's business
    assert ds.LossyImageCompression == "00"  # history kept as it was
    assert hook.last is not None
    assert hook.last.decompressed_from == "JPEG 2000 Image Compression (Lossless Only)"
    assert "decompressed from" in hook.last.note()
    out = reread(ds)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert_masked(native(ds), pixels[None], US_BOX, text, 255)
    assert_masked(out.pixel_array[None], pixels[None], US_BOX, text, 255)


def test_lossy_multiframe_jpeg_masked_with_history_set() -> None:
    """30-frame JPEG Baseline YBR_FULL_422 ultrasound: decoded to RGB, every frame masked."""
    ds = pydicom.dcmread(data("examples_ybr_color.dcm"))
    before = ds.pixel_array.copy()  # RGB, as the hook decodes it
    box = (0, 0, 320, 30)
    hook = hook_for(rule("sonosite", 240, 320, [list(box)], Manufacturer="SonoSite, Inc.",
                         ManufacturerModelName="Turbo"))
    hook(ds, "")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and ds.NumberOfFrames == 30
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    after = native(ds)
    assert not after[:, :30].any()
    assert np.array_equal(after[:, 30:], before[:, 30:])
    assert hook.last is not None and hook.last.frames == 30


def test_negative_coordinates_count_from_the_right_and_bottom(us: Dataset) -> None:
    pixels = us.pixel_array.copy()
    box = (440, 430, 200, 50)
    text = draw(pixels, box, 254)
    us.PixelData = pixels.tobytes()
    hook = hook_for(rule("corner", 480, 640, [{"x": -200, "y": -50, "width": 200,
                                               "height": 50}]))
    hook(us, "")
    assert hook.last is not None and hook.last.rectangles == [box]
    assert_masked(native(us), pixels[None], box, text, 254)


def test_secondary_capture_signed_monochrome() -> None:
    """A CT slice re-labelled Secondary Capture (16-bit signed) with text at 3000."""
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    pixels = ds.pixel_array.copy()
    box = (4, 100, 120, 24)  # the rule's [4, -28, 120, 24] in a 128x128 image
    text = draw(pixels, box, 3000)
    ds.PixelData = pixels.tobytes()
    before = pixels.copy()
    hook = hook_for(rule("sc-ge", 128, 128, [[4, -28, 120, 24]],
                         Manufacturer={"regex": "GE MEDICAL.*"},
                         SOPClassUID=[SecondaryCaptureImageStorage]))
    hook(ds, "SOP class Secondary Capture")
    assert ds.BurnedInAnnotation == "NO"
    after = ds.pixel_array
    assert after.dtype == np.int16
    assert_masked(after[None], before[None], box, text, 3000)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT: the rule names SC only
    assert hook.find(ds) is None


def test_native_ybr_full_gets_black_not_green() -> None:
    ds = pydicom.dcmread(data("SC_ybr_full_uncompressed.dcm"))
    hook = hook_for(rule("ybr", 100, 100, [[10, 10, 30, 20]]))
    hook(ds, "")
    raw = native(ds)[0]
    assert ds.PhotometricInterpretation == "YBR_FULL"
    assert (raw[10:30, 10:40] == [0, 128, 128]).all()


def test_overlay_planes_masked_too(us: Dataset) -> None:
    ones = np.ones((480, 640), np.uint8)
    us.add_new(0x60000010, "US", 480)
    us.add_new(0x60000011, "US", 640)
    us.add_new(0x60000040, "CS", "G")
    us.add_new(0x60000050, "SS", [1, 1])
    us.add_new(0x60000100, "US", 1)
    us.add_new(0x60000102, "US", 0)
    us.add_new(0x60003000, "OW", np.packbits(ones, bitorder="little").tobytes())
    hook = hook_for(US_RULE)
    hook(us, "overlay data (Clean Graphics Option)")
    assert hook.last is not None and hook.last.overlays == ["6000"]
    bits = np.unpackbits(np.frombuffer(us[0x60003000].value, np.uint8),
                         bitorder="little")[:480 * 640].reshape(480, 640)
    x, y, w, h = US_BOX
    assert not bits[y:y + h, x:x + w].any()
    assert bits.sum() == 480 * 640 - w * h


def test_undecodable_pixels_hold_back() -> None:
    ds = pydicom.dcmread(data("US1_J2KR.dcm"))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 8]])
    with pytest.raises(HoldBack, match="cannot decode JPEG 2000"):
        hook_for(US_RULE)(ds, "")


def test_rules_file_checked_when_loaded(tmp_path: Path) -> None:
    def bad(item: dict[str, object], message: str) -> None:
        base = {"name": "r", "Rows": 10, "Columns": 20, "rectangles": [[0, 0, 5, 5]]}
        with pytest.raises(RulesError, match=message):
            parse_rules({"rules": [{**base, **item}]}, "site.json")

    bad({"Manufacturor": "GE"}, "unknown key")
    bad({"rectangles": [[16, 0, 5, 5]]}, "not inside 20x10")
    bad({"rectangles": [[-21, 0, 5, 5]]}, "not inside")
    bad({"rectangles": [[0, 0, 0, 5]]}, "not inside")
    bad({"rectangles": [[0, 0, 5]]}, r"\[x, y, width, height\]")
    bad({"rectangles": []}, "non-empty")
    bad({"Rows": 0}, "positive")
    bad({"Manufacturer": {"regex": "("}}, "bad regex")
    bad({"Modality": 3}, "expected a string")
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.json")
    assert [r.name for r in default_rules()][0] == "ge-logiq-700-us-640x480"
    assert DEFAULT_RULES.name == "masks.json"


def test_site_rules_come_before_the_defaults(tmp_path: Path, us: Dataset) -> None:
    site = tmp_path / "site-masks.json"
    site.write_text(json.dumps({"rules": [{
        "name": "site-logiq", "Manufacturer": ["G.E. Medical Systems", "GE Healthcare"],
        "ManufacturerModelName": "LOGIQ 700", "Rows": 480, "Columns": 640,
        "rectangles": [[0, 0, 640, 110], [0, -30, 640, 30]]}]}))
    hook = MaskingHook.from_files([site])
    found = hook.find(us)
    assert found is not None and found.name == "site-logiq" and found.source == str(site)
    assert MaskingHook.from_files([site], defaults=False).rules == [found]
    assert MaskingHook().find(us) is not None  # the packaged rule without the site file


def test_hook_pickles_for_worker_processes(us: Dataset) -> None:
    hook = pickle.loads(pickle.dumps(MaskingHook([US_RULE])))
    hook(us, "")
    assert hook.last is not None and hook.last.rule == "site-logiq"


def test_through_the_engine(us: Dataset) -> None:
    """The engine sends the ultrasound to the hook; no rule means held back, not written."""
    from dicomshare.deid.engine import Deidentifier

    before = native(us).copy()
    out, report = Deidentifier((), KEY, pixel_hook=hook_for(US_RULE)).deidentify(
        copy.deepcopy(us))
    assert report.held_back is None and report.pixels_cleaned
    assert out.BurnedInAnnotation == "NO"
    assert_masked(native(out), before, US_BOX, render(*US_BOX[2:]), 255)
    assert "113101" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]

    us.Manufacturer = "Acme"
    _, report = Deidentifier((), KEY, pixel_hook=hook_for(US_RULE)).deidentify(us)
    assert report.held_back == ("burned-in text risk (Modality US) and no masking rule for "
                                "Acme/LOGIQ 700 480x640")


def test_engine_writes_masked_compressed_input_uncompressed(tmp_path: Path) -> None:
    """Read from a file (pixel data deferred), masked, written by the engine's writer."""
    from dicomshare.deid.engine import Deidentifier

    src = tmp_path / "in.dcm"
    ds = pydicom.dcmread(data("US1_J2KR.dcm"))
    pixels = ds.pixel_array.copy()
    text = draw(pixels, US_BOX, 255)
    ds.PhotometricInterpretation = "RGB"
    ds.compress(JPEG2000Lossless, pixels, generate_instance_uid=False)
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "out.dcm"
    report = Deidentifier((), KEY, pixel_hook=hook_for(US_RULE)).deidentify_file(src, dst)
    assert report.held_back is None and report.pixels_cleaned and report.output_path
    out = pydicom.dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PhotometricInterpretation == "RGB" and out.BurnedInAnnotation == "NO"
    assert_masked(out.pixel_array[None], pixels[None], US_BOX, text, 255)


def test_cli_masks_with_rules_and_holds_back_without(tmp_path: Path) -> None:
    """`dicomshare deidentify`: the US sample is held back by default, masked and written
    with the shipped rules, and masked by a site rule file."""
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    (src / "us.dcm").write_bytes(Path(data("US1_UNCR.dcm")).read_bytes())
    site_rules = tmp_path / "site.json"
    site_rules.write_text(json.dumps({"rules": [{
        "name": "site LOGIQ", "Manufacturer": "G.E. Medical Systems", "Rows": 480,
        "Columns": 640, "rectangles": [[0, 0, 640, 40]]}]}))

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomshare.cli", "--data-dir", str(tmp_path / "data"),
             "deidentify", str(src), str(tmp_path / f"out{len(extra)}"),
             "--project-key-file", str(tmp_path / "key"), "--quiet", *extra],
            capture_output=True, text=True, timeout=300)

    held = run()
    assert held.returncode == 0 and "held back: 1" in held.stdout, held.stdout + held.stderr
    masked = run("--default-masks")
    assert "de-identified: 1  held back: 0" in masked.stdout, masked.stdout + masked.stderr
    (out,) = (tmp_path / "out1").rglob("*.dcm")
    assert pydicom.dcmread(out).BurnedInAnnotation == "NO"
    by_site = run("--mask-rules", str(site_rules))
    assert "de-identified: 1  held back: 0" in by_site.stdout, by_site.stdout + by_site.stderr
