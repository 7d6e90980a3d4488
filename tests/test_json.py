"""The fast DICOM JSON converter must give exactly pydicom's output, on every test file."""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from conftest import test_files as dicom_files
from dicomshare.dicom.json import dataset_to_json


def _json_elements(ds: Dataset, threshold: int) -> dict[str, Any]:
    """The reference: pydicom's own encoder, element by element (what ingest used before
    dataset_to_json); elements whose value does not convert are left out.

    Not ``Dataset.to_json_dict(suppress_invalid_tags=True)``: that switches pydicom to strict
    reading process-wide while it runs, which races with other threads (and can leave the
    process strict), and it drops values that are merely non-conformant (LO > 64 chars).
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():
        try:
            out[f"{int(tag):08X}"] = ds[tag].to_json_dict(None, threshold)
        except Exception:  # noqa: BLE001 - an unconvertible value is left out, as before
            continue
    return out

FILES = dicom_files()
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


@pytest.fixture(autouse=True)
def warn_mode() -> Iterator[None]:
    """pydicom's default validation; other libraries in the process may have left it strict."""
    saved = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = saved


def _read(source: Path | bytes) -> Dataset | None:
    try:
        if isinstance(source, bytes):
            return pydicom.dcmread(io.BytesIO(source), defer_size=1024)
        return pydicom.dcmread(source, defer_size=1024)
    except Exception:  # noqa: BLE001 - some test files are broken on purpose
        return None


def _text(doc: dict[str, Any], sort_keys: bool) -> str:
    return json.dumps(doc, sort_keys=sort_keys, default=str)


def _assert_same(source: Path | bytes) -> dict[str, Any]:
    ds, ds2 = _read(source), _read(source)
    if ds is None or ds2 is None:
        pytest.skip("pydicom cannot read this file")
    fast, slow = dataset_to_json(ds, 1024), _json_elements(ds2, 1024)
    assert _text(fast, True) == _text(slow, True)
    assert _text(fast, False) == _text(slow, False)  # same key order: same metadata text
    return fast


def test_there_are_files_to_compare() -> None:
    assert len(FILES) > 100


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_same_json_as_pydicom(path: Path) -> None:
    _assert_same(path)


# Hand-made elements for the shapes the test files may lack: (tag, VR, raw value).
Element = tuple[int, str, Any]


def _item(*elements: Element) -> list[Element]:
    return list(elements)


ELEMENTS: list[Element] = [
    (0x00080005, "CS", b"ISO_IR 100"),
    (0x00080008, "CS", b"ORIGINAL\\\\AXIAL "),  # an empty value in the middle
    (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"),
    (0x00080020, "DA", b"20240131"),
    (0x00080030, "TM", b""),
    (0x00080050, "SH", b""),
    (0x00081140, "SQ", []),  # empty sequence
    (0x00082112, "SQ", [_item(), _item((0x00081150, "UI", b"1.2.3\x00"))]),
    (0x00089215, "SQ", [_item((0x00080100, "SH", b"X"), (0x00201041, "DS", b"abc "))]),
    (0x00091010, "UN", b"\x01\x02\x03"),
    (0x00100010, "PN", b"Doe^John=D^J=d^j "),
    (0x00100020, "LO", b"ID\xe9 "),
    (0x00101001, "PN", b"A^B\\C^D=E\\\\"),
    (0x00101005, "PN", b""),
    (0x00101010, "AS", b"045Y"),
    (0x00180050, "DS", b"2.50"),
    (0x00181100, "DS", b"1.5\\\\2 "),  # an empty value among numbers
    (0x00181150, "IS", b" 12 "),
    (0x00181160, "IS", b"1\\2\\-3 "),
    (0x00189219, "FL", struct.pack("<2f", 0.1, -2.5)),
    (0x00189218, "FD", struct.pack("<d", 1 / 3)),
    (0x00200013, "IS", b"7 "),
    (0x00200032, "DS", b"-125.000\\-125.5\\1e3 "),
    (0x00201041, "DS", b"nan "),
    (0x00209165, "AT", struct.pack("<4H", 0x0020, 0x0013, 0x7FE0, 0x0010)),
    (0x00209167, "AT", struct.pack("<2H", 0x0010, 0x0010)),
    (0x00280002, "US", struct.pack("<H", 1)),
    (0x00280010, "US", struct.pack("<H", 512)),
    (0x00280103, "US", struct.pack("<H", 1)),
    (0x00280106, "SS", struct.pack("<h", -1024)),
    (0x00281052, "DS", b"-1024 "),
    (0x00283002, "SS", struct.pack("<3h", 4096, -1024, 16)),
    (0x00283010, "SQ", [_item((0x00283002, "US", struct.pack("<3H", 4096, 0, 16)),
                              (0x00283006, "OW", struct.pack("<4H", 1, 2, 3, 4)))]),
    (0x00400275, "SQ", [_item((0x00400008, "SQ", [_item((0x00080104, "LO", b"deep"))]))]),
    (0x0040A30A, "DS", b"1\\2\\3.25e-2 "),
    (0x00540081, "US", b""),
    (0x7FE00010, "OB", b"\x00" * 20),
]


def _encode(elements: list[Element], explicit: bool) -> bytes:
    """Little endian elements with defined lengths, as a scanner would write them."""
    out = b""
    for tag, vr, value in elements:
        if vr == "SQ":
            items = [_encode(item, explicit) for item in value]
            value = b"".join(struct.pack("<2HI", 0xFFFE, 0xE000, len(i)) + i for i in items)
        if len(value) % 2:
            value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
        head = struct.pack("<2H", tag >> 16, tag & 0xFFFF)
        if not explicit:
            head += struct.pack("<I", len(value))
        elif vr in LONG_VRS:
            head += vr.encode() + b"\x00\x00" + struct.pack("<I", len(value))
        else:
            head += vr.encode() + struct.pack("<H", len(value))
        out += head + value
    return out


def _part10(elements: list[Element], explicit: bool) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + _encode(elements, explicit)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
def test_same_json_as_pydicom_for_every_value_shape(explicit: bool) -> None:
    fast = _assert_same(_part10(ELEMENTS, explicit))
    assert fast["00100010"]["Value"] == [
        {"Alphabetic": "Doe^John", "Ideographic": "D^J", "Phonetic": "d^j"}]
    assert fast["00200032"]["Value"] == [-125.0, -125.5, 1000.0]
    assert fast["00209165"]["Value"] == ["00200013", "7FE00010"]
    assert fast["00081140"] == {"vr": "SQ", "Value": []}
    assert fast["00080050"] == {"vr": "SH"}
    assert "00089215" not in fast  # a bad value anywhere in a sequence drops the sequence
    assert "00181100" not in fast  # pydicom cannot make a number of the empty value
    assert fast["7FE00010"]["InlineBinary"] == "AAAAAAAAAAAAAAAAAAAAAAAAAAA="


def test_in_memory_values_and_settings_untouched() -> None:
    """Values set in code (not read) take the same paths; pydicom's settings stay as they were."""
    ds = Dataset()
    ds.PatientName = ["A^B", "C^D"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = 512
    ds.PixelSpacing = [0.5, 0.5]
    ds.InstanceNumber = 3
    ds.ReferencedSOPSequence = [Dataset()]
    ds.add_new(0x00291010, "OB", b"\x01")
    ds.add_new(0x00081160, "IS", None)
    before = (pydicom.config.settings.reading_validation_mode,
              pydicom.config.settings.writing_validation_mode)
    assert _text(dataset_to_json(ds, 1024), False) == _text(_json_elements(ds, 1024), False)
    assert before == (pydicom.config.settings.reading_validation_mode,
                      pydicom.config.settings.writing_validation_mode)


@pytest.mark.filterwarnings("ignore")
def test_threads_get_the_same_json() -> None:
    paths = [p for p in FILES if p.stat().st_size < 1_000_000][:40]
    expected = {p: _text(dataset_to_json(ds, 1024), True)
                for p in paths if (ds := _read(p)) is not None}

    def convert(path: Path) -> tuple[Path, str]:
        ds = _read(path)
        assert ds is not None
        return path, _text(dataset_to_json(ds, 1024), True)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(convert, list(expected) * 4))
    assert all(expected[path] == text for path, text in results)


def _time(convert: Callable[[Dataset, int], Any], datasets: list[Dataset]) -> float:
    start = time.perf_counter()
    for ds in datasets:
        convert(ds, 1024)
    return (time.perf_counter() - start) / len(datasets)


def _ct_headers(count: int) -> list[Dataset]:
    """CT_small.dcm as ingest sees it: read with deferral, the pixel data taken out."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    datasets: list[Dataset] = []
    for _ in range(count):
        ds = pydicom.dcmread(path, defer_size=1024)
        del ds[0x7FE00010]
        datasets.append(ds)
    return datasets


def test_speed() -> None:
    """Printed with ``-s``, not asserted.

    "fresh" includes pydicom's conversion of the raw elements on ``ds[tag]``, which both
    converters pay (it dominates); "converted" times the JSON alone, on a converted header.
    """
    rounds = 500
    slow = _time(_json_elements, _ct_headers(rounds))
    fast = _time(dataset_to_json, _ct_headers(rounds))
    print(f"\nCT_small fresh: pydicom {slow * 1e3:.3f} ms, fast {fast * 1e3:.3f} ms, "
          f"{slow / fast:.1f}x")
    converted = _ct_headers(1) * rounds
    _json_elements(converted[0], 1024)
    slow, fast = _time(_json_elements, converted), _time(dataset_to_json, converted)
    print(f"CT_small converted: pydicom {slow * 1e3:.3f} ms, fast {fast * 1e3:.3f} ms, "
          f"{slow / fast:.1f}x")
