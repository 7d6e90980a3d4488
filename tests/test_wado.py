"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data, frames and rendered images.

Files from pydicom and pydicom-data are stored in a real server, then fetched back with
dicomweb-client and requests; every answer is compared with pydicom's own reading of the
original file.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from conftest import Server, split_multipart

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
BOUNDARY = "wado-test-boundary"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTET = 'multipart/related; type="application/octet-stream"'
BINARY = ("InlineBinary", "BulkDataURI")
# Codestream magic numbers: J2K SOC+SIZ, JPEG SOI+SOF3 (lossless), JPEG-LS SOI+SOF55.
MAGIC = {"image/jp2": b"\xff\x4f\xff\x51", "image/jls": b"\xff\xd8\xff\xf7",
         "image/jpeg": b"\xff\xd8\xff"}

NATIVE = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "examples_overlay.dcm"]
COMPRESSED = {  # file: (frame media type, transfer syntax)
    "MR_small_jp2klossless.dcm": ("image/jp2", "1.2.840.10008.1.2.4.90"),
    "MR_small_jpeg_ls_lossless.dcm": ("image/jls", "1.2.840.10008.1.2.4.80"),
    "MR_small_RLE.dcm": ("image/dicom-rle", "1.2.840.10008.1.2.5"),
    "emri_small_jpeg_2k_lossless.dcm": ("image/jp2", "1.2.840.10008.1.2.4.90"),
    "JPEG-LL.dcm": ("image/jpeg", "1.2.840.10008.1.2.4.70"),
}
NO_PIXELS = ["reportsi.dcm", "rtplan.dcm"]
# These share their SOP Instance UID with a native file: stored under a new one.
NEW_UID = {"MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
           "emri_small_jpeg_2k_lossless.dcm"}


@dataclass
class Stored:
    name: str
    data: bytes
    study: str
    series: str
    sop: str
    url: str

    @property
    def uids(self) -> tuple[str, str, str]:
        return self.study, self.series, self.sop


@cache
def original(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def reference_frames(name: str) -> np.ndarray:
    """pydicom's decoding of the original file, one entry per frame."""
    arr = original(name).pixel_array
    frames = int(original(name).get("NumberOfFrames", 1) or 1)
    return arr if frames > 1 else arr[np.newaxis]


def as_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()

def get(server: Server, url: str, accept: str | None = None, **params: str) -> requests.Response:
    headers = {"Accept": accept} if accept else {}
    if not url.startswith("http"):
        url = server.dicomweb + url
    return server.session().get(url, headers=headers, params=params, timeout=120)


def store(server: Server, data: bytes) -> str:
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    r = server.session().post(
        f"{server.dicomweb}/studies", data=body, timeout=120,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                 f"boundary={BOUNDARY}"})
    assert r.status_code == 200, r.text
    return r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]


@pytest.fixture(scope="module")
def stored(server: Server) -> dict[str, Stored]:
    out = {}
    for name in NATIVE + list(COMPRESSED) + NO_PIXELS:
        if name in NEW_UID:
            ds = copy.deepcopy(original(name))
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            data = part10(ds)
        else:
            data = Path(get_testdata_file(name)).read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        out[name] = Stored(name, data, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                           ds.SOPInstanceUID, store(server, data))
    return out


# -- instances ------------------------------------------------------------------------------
def test_instance_series_and_study_as_stored(server: Server, stored: dict[str, Stored]) -> None:
    mr = [s for s in stored.values() if s.study == stored["MR_small.dcm"].study]
    assert len(mr) == 4
    levels = {
        stored["CT_small.dcm"].url: [stored["CT_small.dcm"].data],
        f"/studies/{mr[0].study}/series/{mr[0].series}": [s.data for s in mr],
        f"/studies/{mr[0].study}": [s.data for s in mr],
    }
    for url, expected in levels.items():
        r = get(server, url, DICOM_ANY)
        assert r.status_code == 200, r.text
        parts = split_multipart(r)
        assert sorted(body for _, body in parts) == sorted(expected)
        for headers, body in parts:
            ts = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).file_meta
            assert headers["content-type"] == ("application/dicom; transfer-syntax="
                                               f"{ts.TransferSyntaxUID}")
    client = server.client()
    got = client.retrieve_series(mr[0].study, mr[0].series,
                                 media_types=(("application/dicom", "*"),))
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(s.sop for s in mr)


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_default_transfer_syntax_is_explicit_vr_little_endian(
        server: Server, stored: dict[str, Stored], name: str) -> None:
    # dicomweb-client sends no transfer-syntax parameter for a bare media type.
    ds = server.client().retrieve_instance(*stored[name].uids,
                                           media_types=("application/dicom",))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert ds.SOPInstanceUID == stored[name].sop
    assert np.array_equal(ds.pixel_array, original(name).pixel_array)

    for accept in ('multipart/related; type="application/dicom"', None):
        r = get(server, stored[name].url, accept)
        ((headers, body),) = split_multipart(r)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert np.array_equal(ds.pixel_array, original(name).pixel_array)


def test_asking_for_the_stored_transfer_syntax(server: Server, stored: dict[str, Stored]) -> None:
    s = stored["MR_small_jpeg_ls_lossless.dcm"]
    ts = COMPRESSED[s.name][1]
    r = get(server, s.url, f'multipart/related; type="application/dicom"; transfer-syntax={ts}')
    assert [body for _, body in split_multipart(r)] == [s.data]
    # Re-compression into another syntax is not offered: 406 with a reason, not a 500.
    r = get(server, s.url, 'multipart/related; type="application/dicom"; '
                           "transfer-syntax=1.2.840.10008.1.2.4.90")
    assert r.status_code == 406, r.text
    assert r.json()["error"]


# -- metadata -------------------------------------------------------------------------------
def normalised(attrs: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON with binary values reduced to their presence, recursively."""
    out: dict[str, Any] = {}
    for tag, elem in attrs.items():
        if any(key in elem for key in BINARY):
            out[tag] = "binary"
        elif elem.get("vr") == "SQ":
            out[tag] = {"vr": "SQ", "Value": [normalised(i) for i in elem.get("Value", [])]}
        else:
            out[tag] = elem
    return out


def assert_metadata_matches(server: Server, meta: dict[str, Any], s: Stored) -> None:
    expected = normalised(pydicom.dcmread(io.BytesIO(s.data)).to_json_dict())
    assert normalised(meta) == expected, s.name
    if "7FE00010" in meta:
        uri = meta["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"http://127.0.0.1:{server.port}/"), uri
        assert s.sop in uri


@pytest.mark.parametrize("name", NATIVE + list(COMPRESSED) + NO_PIXELS)
def test_instance_metadata_equals_pydicom(server: Server, stored: dict[str, Stored],
                                          name: str) -> None:
    meta = server.client().retrieve_instance_metadata(*stored[name].uids)
    assert_metadata_matches(server, meta, stored[name])


def test_series_and_study_metadata(server: Server, stored: dict[str, Stored]) -> None:
    client = server.client()
    mr = {s.sop: s for s in stored.values() if s.study == stored["MR_small.dcm"].study}
    one = next(iter(mr.values()))
    for metas in (client.retrieve_series_metadata(one.study, one.series),
                  client.retrieve_study_metadata(one.study)):
        assert sorted(m["00080018"]["Value"][0] for m in metas) == sorted(mr)
        for meta in metas:
            assert_metadata_matches(server, meta, mr[meta["00080018"]["Value"][0]])


@pytest.mark.parametrize("name", ["CT_small.dcm", "emri_small.dcm", "MR_small.dcm"])
def test_pixel_data_bulk_of_a_native_instance(server: Server, stored: dict[str, Stored],
                                              name: str) -> None:
    client = server.client()
    meta = client.retrieve_instance_metadata(*stored[name].uids)
    parts = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert parts == [original(name).PixelData]


def test_other_bulk_data_and_compressed_pixel_data(server: Server,
                                                   stored: dict[str, Stored]) -> None:
    client = server.client()
    overlay = stored["examples_overlay.dcm"]
    meta = client.retrieve_instance_metadata(*overlay.uids)
    others = {t: e["BulkDataURI"] for t, e in meta.items()
              if "BulkDataURI" in e and t != "7FE00010"}
    assert sorted(others) == ["00291110", "60003000"]  # a private element and OverlayData
    for tag, uri in others.items():
        assert uri.startswith(f"http://127.0.0.1:{server.port}/")
        assert client.retrieve_bulkdata(uri) == [original(overlay.name)[int(tag, 16)].value]

    s = stored["emri_small_jpeg_2k_lossless.dcm"]
    meta = client.retrieve_instance_metadata(*s.uids)
    ds = original(s.name)
    assert client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"]) == list(
        generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))


# -- frames ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,numbers", [("CT_small.dcm", [1]), ("MR_small.dcm", [1]),
                                          ("emri_small.dcm", [1, 5, 10, 2])])
def test_native_frames(server: Server, stored: dict[str, Stored], name: str,
                       numbers: list[int]) -> None:
    frames = server.client().retrieve_instance_frames(*stored[name].uids, numbers)
    ref = reference_frames(name)
    assert frames == [as_bytes(ref[n - 1]) for n in numbers]


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_compressed_frames_decompressed(server: Server, stored: dict[str, Stored],
                                        name: str) -> None:
    ref = reference_frames(name)
    numbers = [len(ref), 1]
    frames = server.client().retrieve_instance_frames(
        *stored[name].uids, numbers, media_types=("application/octet-stream",))
    assert frames == [as_bytes(ref[n - 1]) for n in numbers]


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_compressed_frames_as_stored(server: Server, stored: dict[str, Stored],
                                     name: str) -> None:
    media, ts = COMPRESSED[name]
    ds = original(name)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    url = f"{stored[name].url}/frames/1"
    for accept in ('multipart/related; type="*/*"', f'multipart/related; type="{media}"',
                   f'multipart/related; type="{media}"; transfer-syntax={ts}'):
        r = get(server, url, accept)
        assert r.status_code == 200, (accept, r.text)
        ((headers, body),) = split_multipart(r)
        assert headers["content-type"].startswith(media)
        assert body == expected[0]
        if media in MAGIC:
            assert body.startswith(MAGIC[media])
        else:  # RLE: a 64-byte header; segment count, then the first offset (64)
            assert 1 <= int.from_bytes(body[:4], "little") <= 15
            assert int.from_bytes(body[4:8], "little") == 64
    other = "image/jls" if media != "image/jls" else "image/jp2"
    r = get(server, url, f'multipart/related; type="{other}"')
    assert r.status_code == 406, r.text
    assert r.json()["error"]


@pytest.mark.parametrize("frames", ["11", "0", "1,11", "abc", "1,,2", "-1"])
def test_frame_numbers_out_of_range_or_malformed(server: Server, stored: dict[str, Stored],
                                                 frames: str) -> None:
    r = get(server, f"{stored['emri_small.dcm'].url}/frames/{frames}", OCTET)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]


@pytest.mark.parametrize("name", NO_PIXELS)
@pytest.mark.parametrize("resource", ["frames/1", "rendered", "thumbnail", "frames/1/rendered",
                                      "bulk/7FE00010"])
def test_pixel_resources_of_objects_without_pixels(server: Server, stored: dict[str, Stored],
                                                   name: str, resource: str) -> None:
    r = get(server, f"{stored[name].url}/{resource}")
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]


# -- rendered -------------------------------------------------------------------------------
def image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, output range 0..255."""
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    mid = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(values <= lo, 0, np.where(values > hi, 255, mid))


def test_rendered_instance_with_window(server: Server, stored: dict[str, Stored]) -> None:
    client = server.client()
    ct = stored["CT_small.dcm"]
    ds = original(ct.name)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rendered = {}
    for window in ((40, 400), (40, 4000)):
        png = client.retrieve_instance_rendered(
            *ct.uids, media_types=("image/png",),
            params={"window": f"{window[0]},{window[1]}"})
        img = image(png)
        assert img.format == "PNG" and img.size == (ds.Columns, ds.Rows)
        got = np.asarray(img.convert("L"), dtype=np.int16)
        expected = np.rint(linear_window(hu, *window))
        assert np.abs(got - expected).max() <= 1, window
        rendered[window] = got
    assert not np.array_equal(rendered[(40, 400)], rendered[(40, 4000)])

    jpeg = image(client.retrieve_instance_rendered(*ct.uids, media_types=("image/jpeg",)))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)


@pytest.mark.parametrize("name,size", [("CT_small.dcm", (64, 64)), ("JPEG-LL.dcm", (16, 64)),
                                       ("emri_small_jpeg_2k_lossless.dcm", (64, 64))])
def test_rendered_viewport(server: Server, stored: dict[str, Stored], name: str,
                           size: tuple[int, int]) -> None:
    r = get(server, f"{stored[name].url}/rendered", "image/png", viewport="64,64")
    assert r.status_code == 200, r.text
    assert image(r.content).size == size


def test_rendered_frames(server: Server, stored: dict[str, Stored]) -> None:
    s = stored["emri_small.dcm"]
    ref = reference_frames(s.name)
    for n in (1, 7):
        png = server.client().retrieve_instance_frames_rendered(
            *s.uids, [n], media_types=("image/png",), params={"window": "500,1000"})
        got = np.asarray(image(png).convert("L"), dtype=np.int16)
        assert np.abs(got - np.rint(linear_window(ref[n - 1].astype(float), 500, 1000))
                      ).max() <= 1
    r = get(server, f"{s.url}/frames/11/rendered", "image/png")
    assert r.status_code == 400, r.text


def test_rendered_series_and_study(server: Server, stored: dict[str, Stored]) -> None:
    mr = stored["MR_small.dcm"]
    for url in (f"/studies/{mr.study}/series/{mr.series}/rendered",
                f"/studies/{mr.study}/rendered"):
        r = get(server, url, "image/jpeg")
        assert r.status_code == 200, r.text
        parts = split_multipart(r)
        assert len(parts) == 4
        for headers, body in parts:
            assert headers["content-type"] == "image/jpeg"
            assert image(body).size == (64, 64)


@pytest.mark.parametrize("level", ["instance", "series", "study", "frames"])
def test_thumbnail_at_every_level(server: Server, stored: dict[str, Stored], level: str) -> None:
    s = stored["emri_small.dcm"]
    url = {"instance": s.url, "series": f"/studies/{s.study}/series/{s.series}",
           "study": f"/studies/{s.study}", "frames": f"{s.url}/frames/3"}[level]
    for accept, fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG")):
        r = get(server, f"{url}/thumbnail", accept)
        assert r.status_code == 200, r.text
        img = image(r.content)
        assert img.format == fmt and max(img.size) <= 128


def copy_into(server: Server, name: str, study: str, series: str) -> None:
    ds = copy.deepcopy(original(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    store(server, part10(ds))


def test_thumbnail_of_a_study_with_a_report(server: Server) -> None:
    """A CT image, then a text SR: the SR is the middle object but has nothing to show."""
    study = generate_uid()
    for name in ("CT_small.dcm", "reportsi.dcm"):
        copy_into(server, name, study, generate_uid())
    r = get(server, f"/studies/{study}/thumbnail", "image/jpeg")
    assert r.status_code == 200, r.text
    assert image(r.content).format == "JPEG"
    r = get(server, f"/studies/{study}/rendered", "image/png")
    assert r.status_code == 200, r.text
    bodies = [b for _, b in split_multipart(r)] if "multipart" in r.headers[
        "content-type"] else [r.content]
    assert [image(b).size for b in bodies] == [(128, 128)]


def test_rendered_series_without_images(server: Server) -> None:
    study, series = generate_uid(), generate_uid()
    for _ in range(2):
        copy_into(server, "reportsi.dcm", study, series)
    for kind in ("rendered", "thumbnail"):
        r = get(server, f"/studies/{study}/series/{series}/{kind}", "image/jpeg")
        assert 400 <= r.status_code < 500, (kind, r.status_code)
        assert r.json()["error"]


@pytest.mark.parametrize("params", [{"window": "40"}, {"window": "40,0"}, {"window": "a,b"},
                                    {"viewport": "0,64"}, {"viewport": "x"},
                                    {"quality": "101"}])
def test_rendered_bad_parameters(server: Server, stored: dict[str, Stored],
                                 params: dict[str, str]) -> None:
    r = get(server, f"{stored['CT_small.dcm'].url}/rendered", "image/jpeg", **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


# -- errors ---------------------------------------------------------------------------------
UNKNOWN = "1.2.3.4.5.6.7.8.9"
RESOURCES = ["", "/metadata", "/rendered", "/thumbnail"]
INSTANCE_ONLY = ["/frames/1", "/frames/1/rendered", "/frames/1/thumbnail", "/bulk/7FE00010"]


def _targets(s: Stored) -> list[str]:
    """Unknown study, unknown series in a known study, unknown instance in a known series."""
    return [f"/studies/{UNKNOWN}", f"/studies/{s.study}/series/{UNKNOWN}",
            f"/studies/{s.study}/series/{s.series}/instances/{UNKNOWN}"]


def test_unknown_uids_are_404(server: Server, stored: dict[str, Stored]) -> None:
    s = stored["CT_small.dcm"]
    urls = [t + r for t in _targets(s) for r in RESOURCES]
    urls += [f"/studies/{s.study}/series/{s.series}/instances/{UNKNOWN}{r}"
             for r in INSTANCE_ONLY]
    urls += [f"/studies/{UNKNOWN}/series/{s.series}/instances/{s.sop}{r}"
             for r in RESOURCES + INSTANCE_ONLY]
    for url in urls:
        r = get(server, url)
        assert r.status_code == 404, (url, r.status_code, r.text)
        assert r.json()["error"]


@pytest.mark.parametrize("bad", ["1.2.abc", "01.2.3", "1..2", "1.2.3.", "x" * 70])
def test_invalid_uids_are_400(server: Server, stored: dict[str, Stored], bad: str) -> None:
    s = stored["CT_small.dcm"]
    targets = [f"/studies/{bad}", f"/studies/{s.study}/series/{bad}",
               f"/studies/{s.study}/series/{s.series}/instances/{bad}"]
    for url in [t + r for t in targets for r in RESOURCES] + [
            targets[2] + r for r in INSTANCE_ONLY] + [f"/studies/{bad}/series"]:
        r = get(server, url)
        assert r.status_code == 400, (url, r.status_code, r.text)
        assert r.json()["error"]


def test_unacceptable_media_types_are_406(server: Server, stored: dict[str, Stored]) -> None:
    s = stored["CT_small.dcm"]
    checks = [(s.url, "application/pdf"),
              (f"/studies/{s.study}/series/{s.series}", "application/pdf"),
              (f"/studies/{s.study}", 'multipart/related; type="application/pdf"'),
              (f"{s.url}/metadata", "text/html"),
              (f"{s.url}/rendered", "application/pdf"),
              (f"{s.url}/frames/1", "text/html"),
              ("/studies", "text/html"), ("/series", "text/html"),
              (f"/studies/{s.study}/instances", "text/html")]
    for url, accept in checks:
        r = get(server, url, accept)
        assert r.status_code == 406, (url, accept, r.status_code, r.text)
        assert r.json()["error"]
