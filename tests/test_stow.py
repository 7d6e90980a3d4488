"""STOW-RS (PS3.18 10.5) against a running server: real files in, the same bytes out.

Every request is made with a real client (dicomweb-client or requests); the outcome is
checked the way a user would: the response body, QIDO counts, a WADO-RS retrieve of the
stored bytes, and ``dicomshare check`` on the data folder.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import Server, parseable_files, split_multipart

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DICOM_TYPE = 'multipart/related; type="application/dicom"'
ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BOUNDARY = "stow-test-boundary-7f3a"
REFERENCED = "00081199"
FAILED = "00081198"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"


# -- helpers ------------------------------------------------------------------------------
def multipart(parts: list[bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                 + part + b"\r\n")
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def stow(server: Server, parts: list[bytes], path: str = "/studies",
         content_type: str | None = None, session: requests.Session | None = None,
         body: Any = None) -> requests.Response:
    headers = {"Content-Type": content_type or f"{DICOM_TYPE}; boundary={BOUNDARY}",
               "Accept": "application/dicom+json"}
    return (session or server.session()).post(
        server.dicomweb + path, data=multipart(parts) if body is None else body,
        headers=headers, timeout=120)

def retrieve_bytes(server: Server, url: str) -> list[bytes]:
    r = server.session().get(url, headers={"Accept": ANY_TS}, timeout=120)
    assert r.status_code == 200, r.text
    return [body for _, body in split_multipart(r)]


@cache
def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def make_instance(study: str, series: str | None = None, sop: str | None = None,
                  modality: str = "CT", **attrs: Any) -> bytes:
    """CT_small.dcm with new identifying UIDs, as Part 10 bytes."""
    ds = copy.deepcopy(_ct())
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    for name, value in attrs.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def qido(server: Server, path: str, **params: str) -> list[dict[str, Any]]:
    r = server.session().get(server.dicomweb + path, params=params,
                             headers={"Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json() if r.content else []


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value", [])
    return values[0] if values else None


def study_summary(server: Server, study: str) -> tuple[int, int, set[str]] | None:
    """(NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances, ModalitiesInStudy)."""
    found = qido(server, "/studies", StudyInstanceUID=study)
    if not found:
        return None
    assert len(found) == 1
    item = found[0]
    return (value(item, "00201206"), value(item, "00201208"),
            set(item.get("00080061", {}).get("Value", [])))


def instance_count(server: Server) -> int:
    return len(qido(server, "/instances"))


def blob_files(server: Server) -> set[Path]:
    root = server.data_dir / "blobs"
    return {p for p in root.glob("??/*") if p.is_file()}


def partial_uploads(server: Server) -> list[Path]:
    return list((server.data_dir / "blobs" / "tmp").glob("*"))


def assert_archive_clean(server: Server) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert partial_uploads(server) == []
    assert "ok" in server.cli("check").stdout


def failures(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body.get(FAILED, {}).get("Value", [])


def references(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body.get(REFERENCED, {}).get("Value", [])


def header_uids(data: bytes) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
            str(ds.file_meta.TransferSyntaxUID))


# -- every test file, one request each ----------------------------------------------------
@dataclass
class Upload:
    path: Path
    data: bytes
    sop_uid: str
    status: int
    body: dict[str, Any]


@pytest.fixture(scope="module")
def uploads(server: Server) -> list[Upload]:
    session = server.session()
    out = []
    for path in parseable_files():
        data = path.read_bytes()
        r = stow(server, [data], session=session)
        out.append(Upload(path, data, header_uids(data)[2], r.status_code, r.json()))
    return out


def first_of_each_uid(uploads: list[Upload]) -> Iterator[Upload]:
    seen: set[str] = set()
    for up in uploads:
        if up.sop_uid not in seen:
            seen.add(up.sop_uid)
            yield up


def test_every_parseable_file_is_stored_and_retrieved_byte_exact(
        server: Server, uploads: list[Upload]) -> None:
    firsts = list(first_of_each_uid(uploads))
    assert len(firsts) > 40
    session = server.session()
    for up in firsts:
        assert up.status == 200, (up.path.name, up.body)
        (ref,) = references(up.body)
        assert value(ref, "00081155") == up.sop_uid
        url = value(ref, RETRIEVE_URL)
        r = session.get(url, headers={"Accept": ANY_TS}, timeout=120)
        assert r.status_code == 200, (up.path.name, r.text)
        ((headers, body),) = split_multipart(r)
        assert headers["content-type"].startswith("application/dicom"), headers
        assert f"transfer-syntax={header_uids(up.data)[3]}" in headers["content-type"]
        assert headers.get("content-location") == url
        assert int(headers.get("content-length", len(body))) == len(body)
        assert body == up.data, f"{up.path.name}: retrieved bytes differ from the file"


def test_files_sharing_a_sop_instance_uid_keep_the_first(uploads: list[Upload]) -> None:
    first: dict[str, Upload] = {}
    duplicates = 0
    for up in uploads:
        if up.sop_uid not in first:
            first[up.sop_uid] = up
            continue
        if up.data == first[up.sop_uid].data:  # the same file twice: a no-op success
            assert up.status == 200, up.body
            assert value(references(up.body)[0], "00081155") == up.sop_uid
            continue
        duplicates += 1
        assert up.status == 409, (up.path.name, up.body)
        assert REFERENCED not in up.body
        (failure,) = failures(up.body)
        assert value(failure, FAILURE_REASON) == 0x0111
        assert value(failure, "00081155") == up.sop_uid
        assert value(failure, ERROR_COMMENT)
    assert duplicates > 20


def test_client_retrieve_instance_as_stored(server: Server, uploads: list[Upload]) -> None:
    client = server.client()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG-LL.dcm", "image_dfl.dcm"):
        up = next(u for u in uploads if u.path.name == name)
        study, series, sop, ts = header_uids(up.data)
        ds = client.retrieve_instance(study, series, sop,
                                      media_types=(("application/dicom", "*"),))
        assert ds.file_meta.TransferSyntaxUID == ts
        assert ds == pydicom.dcmread(up.path)


# -- the response ---------------------------------------------------------------------------
def test_store_instances_response_references_each_instance(server: Server) -> None:
    study = generate_uid()
    datasets = [pydicom.dcmread(io.BytesIO(make_instance(study))) for _ in range(2)]
    result = server.client().store_instances(datasets)
    items = result.ReferencedSOPSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in items) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    assert "FailedSOPSequence" not in result
    assert result.RetrieveURL.endswith(f"/studies/{study}")
    assert f":{server.port}/" in result.RetrieveURL
    for item in items:
        assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert f"127.0.0.1:{server.port}/" in item.RetrieveURL
        assert item.RetrieveURL.endswith(f"/instances/{item.ReferencedSOPInstanceUID}")
        assert len(retrieve_bytes(server, item.RetrieveURL)) == 1
    assert study_summary(server, study) == (2, 2, {"CT"})


def test_status_200_202_400_and_409(server: Server) -> None:
    study = generate_uid()
    a, b, c = (make_instance(study) for _ in range(3))
    r = stow(server, [a, b])
    assert r.status_code == 200, r.text
    assert len(references(r.json())) == 2 and FAILED not in r.json()

    r = stow(server, [c, b"this is not DICOM at all" * 10])
    assert r.status_code == 202, r.text
    assert [value(i, "00081155") for i in references(r.json())] == [header_uids(c)[2]]
    (failure,) = failures(r.json())
    assert value(failure, FAILURE_REASON) == 0xC000
    assert "Warning" in r.headers
    assert study_summary(server, study) == (3, 3, {"CT"})

    r = stow(server, [b"garbage", b"more garbage"])
    assert r.status_code == 400, r.text
    assert [value(f, FAILURE_REASON) for f in failures(r.json())] == [0xC000, 0xC000]

    sop = header_uids(a)[2]
    changed = make_instance(study, header_uids(a)[1], sop, PatientName="Someone^Else")
    r = stow(server, [changed])
    assert r.status_code == 409, r.text
    (failure,) = failures(r.json())
    assert value(failure, FAILURE_REASON) == 0x0111
    url = f"{server.dicomweb}/studies/{study}/series/{header_uids(a)[1]}/instances/{sop}"
    assert retrieve_bytes(server, url) == [a]
    assert study_summary(server, study) == (3, 3, {"CT"})


def test_storing_identical_bytes_again_is_a_no_op(server: Server) -> None:
    study = generate_uid()
    data = make_instance(study)
    assert stow(server, [data]).status_code == 200
    before, blobs = instance_count(server), blob_files(server)
    for parts in ([data], [data, data]):
        r = stow(server, parts)
        assert r.status_code == 200, r.text
        assert len(references(r.json())) == len(parts)
    assert instance_count(server) == before
    assert blob_files(server) == blobs
    assert study_summary(server, study) == (1, 1, {"CT"})


def test_post_to_a_study_refuses_instances_of_another_study(server: Server) -> None:
    target, other = generate_uid(), generate_uid()
    assert stow(server, [make_instance(target)]).status_code == 200
    stranger = make_instance(other)
    r = stow(server, [stranger], path=f"/studies/{target}")
    assert r.status_code == 409, r.text
    (failure,) = failures(r.json())
    assert value(failure, FAILURE_REASON) == 0xA900
    assert value(failure, "00081155") == header_uids(stranger)[2]
    assert study_summary(server, other) is None
    assert study_summary(server, target) == (1, 1, {"CT"})

    own = make_instance(target)
    r = stow(server, [own, stranger], path=f"/studies/{target}")
    assert r.status_code == 202, r.text
    assert r.json()[RETRIEVE_URL]["Value"][0].endswith(f"/studies/{target}")
    assert study_summary(server, other) is None
    assert study_summary(server, target) == (2, 2, {"CT"})
    assert_archive_clean(server)


def test_series_of_another_study_leaves_no_trace(server: Server) -> None:
    first, second, series = generate_uid(), generate_uid(), generate_uid()
    assert stow(server, [make_instance(first, series)]).status_code == 200
    r = stow(server, [make_instance(second, series)])
    assert r.status_code == 409, r.text
    assert value(failures(r.json())[0], FAILURE_REASON) == 0x0111
    assert study_summary(server, second) is None, "a refused instance left an empty study"
    assert study_summary(server, first) == (1, 1, {"CT"})


# -- bad input ------------------------------------------------------------------------------
def _bad_instances() -> dict[str, tuple[bytes, int]]:
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    study = generate_uid()
    return {
        "garbage": (b"\x00\x01garbage, not DICOM" * 50, 0xC000),
        "truncated": (ct[: len(ct) // 2], 0xC000),
        "no-study-uid": (make_instance(study, StudyInstanceUID=None), 0xA900),
        "invalid-uid": (make_instance("1.2.abc"), 0xA900),
        "invalid-sop-uid": (make_instance(study, sop="1.2.03.4"), 0xA900),
    }


@pytest.mark.parametrize("case", ["garbage", "truncated", "no-study-uid", "invalid-uid",
                                  "invalid-sop-uid"])
def test_invalid_instance_is_refused_with_a_reason(server: Server, case: str) -> None:
    data, reason = _bad_instances()[case]
    before, blobs = instance_count(server), blob_files(server)
    r = stow(server, [data])
    assert r.status_code == 400, r.text
    (failure,) = failures(r.json())
    assert value(failure, FAILURE_REASON) == reason
    assert value(failure, ERROR_COMMENT)
    assert r.headers["Warning"].startswith("299 ")
    assert instance_count(server) == before
    assert blob_files(server) == blobs
    assert_archive_clean(server)


def _bad_requests() -> dict[str, tuple[str, bytes, int]]:
    good = make_instance(generate_uid())
    with_b = f"{DICOM_TYPE}; boundary={BOUNDARY}"
    return {
        "json": ("application/json", b'{"00100010": {}}', 415),
        "dicom-json-parts": (f'multipart/related; type="application/dicom+json"; '
                             f"boundary={BOUNDARY}", multipart([good]), 415),
        "form-data": (f"multipart/form-data; boundary={BOUNDARY}", multipart([good]), 415),
        "no-content-type": ("", multipart([good]), 415),
        "no-boundary": (DICOM_TYPE, multipart([good]), 400),
        "wrong-boundary": (f"{DICOM_TYPE}; boundary=another", multipart([good]), 400),
        "no-closing-delimiter": (with_b, multipart([good], close=False), 400),
        "cut-inside-second-part": (with_b, multipart([good, good])[:-2000], 400),
        "empty-body": (with_b, b"", 400),
        "only-closing-delimiter": (with_b, f"--{BOUNDARY}--\r\n".encode(), 400),
    }


@pytest.mark.parametrize("case", [
    "json", "dicom-json-parts", "form-data", "no-content-type", "no-boundary", "wrong-boundary",
    "no-closing-delimiter", "cut-inside-second-part", "empty-body", "only-closing-delimiter"])
def test_malformed_request_is_refused_and_nothing_is_stored(server: Server, case: str) -> None:
    content_type, body, status = _bad_requests()[case]
    before, blobs = instance_count(server), blob_files(server)
    r = server.session().post(f"{server.dicomweb}/studies", data=body,
                              headers={"Content-Type": content_type}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert instance_count(server) == before
    assert blob_files(server) == blobs
    assert_archive_clean(server)


def test_path_traversal_in_the_study_uid_is_refused(server: Server) -> None:
    before, blobs = instance_count(server), blob_files(server)
    for path in ("/studies/..%2F..%2Fetc", "/studies/1.2.3%2F..%2Fx", "/studies/..",
                 "/studies/1.2.3%00", "/studies/%2e%2e", "/studies/1.2.3%2F..%2F..%2Fblobs"):
        r = stow(server, [make_instance(generate_uid())], path=path)
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
        assert r.json()["error"]
        r = server.session().get(server.dicomweb + path, headers={"Accept": ANY_TS},
                                 timeout=30)
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
    assert instance_count(server) == before
    assert blob_files(server) == blobs
    assert_archive_clean(server)


# -- transport variants ---------------------------------------------------------------------
def test_chunked_upload(server: Server) -> None:
    study = generate_uid()
    parts = [make_instance(study) for _ in range(3)]
    body = multipart(parts)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 997):  # odd size: delimiters straddle chunks
            yield body[start:start + 997]

    r = stow(server, [], body=chunks())
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 200, r.text
    got = retrieve_bytes(server, f"{server.dicomweb}/studies/{study}")
    assert sorted(got) == sorted(parts)


@pytest.mark.parametrize("content_type", [
    'multipart/related; type="application/dicom"; boundary="{b}"',
    "multipart/related; type=application/dicom; boundary={b}",
    'multipart/related; boundary={b}; type="application/dicom"',
    "multipart/related;type=application/dicom;boundary={b}",
    'Multipart/Related; Type="Application/DICOM"; Boundary="{b}"',
    "multipart/related; boundary={b}",
])
def test_boundary_and_type_parameters_quoted_or_not(server: Server, content_type: str) -> None:
    study = generate_uid()
    data = make_instance(study)
    r = stow(server, [data], content_type=content_type.format(b=BOUNDARY))
    assert r.status_code == 200, r.text
    assert study_summary(server, study) == (1, 1, {"CT"})


def test_boundary_that_needs_quoting(server: Server) -> None:
    boundary = "----=_Part_0:1 2.3"
    study = generate_uid()
    data = make_instance(study)
    r = stow(server, [], content_type=f'{DICOM_TYPE}; boundary="{boundary}"',
             body=multipart([data], boundary))
    assert r.status_code == 200, r.text
    assert study_summary(server, study) == (1, 1, {"CT"})


# -- concurrency ----------------------------------------------------------------------------
def test_concurrent_stores_into_one_study(server: Server) -> None:
    study = generate_uid()
    series = [(generate_uid(), modality) for modality in ("CT", "MR", "CT", "PT")]
    threads, per_thread = 8, 5
    start = threading.Barrier(threads)

    def worker(n: int) -> list[int]:
        session = server.session()
        uid, modality = series[n % len(series)]
        instances = [make_instance(study, uid, modality=modality) for _ in range(per_thread)]
        start.wait()
        return [stow(server, [data], session=session).status_code for data in instances]

    with ThreadPoolExecutor(threads) as pool:
        statuses = [s for result in pool.map(worker, range(threads)) for s in result]
    assert statuses == [200] * threads * per_thread
    assert study_summary(server, study) == (4, threads * per_thread, {"CT", "MR", "PT"})
    for uid, _ in series:
        (found,) = qido(server, f"/studies/{study}/series", SeriesInstanceUID=uid)
        assert value(found, "00201209") == threads * per_thread // len(series)
    assert len(qido(server, f"/studies/{study}/instances")) == threads * per_thread


def test_large_request_stores_in_batches_and_reports_a_broken_tail(server: Server) -> None:
    """A long upload that breaks late keeps (and reports) the complete batches before it."""
    from dicomshare.web.dicomweb import STORE_BATCH

    study, series = generate_uid(), generate_uid()
    parts = [make_instance(study, series) for _ in range(STORE_BATCH + 5)]
    whole = multipart(parts)
    cut = whole[: len(whole) - len(parts[-1]) // 2]  # ends inside the last part
    response = stow(server, [], body=cut)
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(references(body)) == STORE_BATCH
    assert "malformed multipart" in failures(body)[-1]["00000902"]["Value"][0]
    assert study_summary(server, study) == (1, STORE_BATCH, {"CT"})
    complete = stow(server, parts)  # sending it again completes the study
    assert complete.status_code == 200, complete.text
    assert study_summary(server, study) == (1, STORE_BATCH + 5, {"CT"})
    assert_archive_clean(server)


def test_request_above_the_size_limit_is_refused(tmp_path: Path) -> None:
    from conftest import make_server

    limited = make_server(tmp_path, env={"DICOMSHARE_MAX_STOW_BYTES": "100000"})
    try:
        study = generate_uid()
        small = stow(limited, [make_instance(study)])
        assert small.status_code == 200, small.text
        parts = [make_instance(study) for _ in range(4)]  # about 160 kB
        declared = stow(limited, parts)
        assert declared.status_code == 413 and "limit" in declared.json()["error"]
        body = multipart(parts)
        chunked = limited.session().post(
            limited.dicomweb + "/studies", data=(body[i:i + 8192] for i in range(0, len(body),
                                                                                 8192)),
            headers={"Content-Type": f"{DICOM_TYPE}; boundary={BOUNDARY}"}, timeout=60)
        assert chunked.status_code == 413, chunked.text
        assert study_summary(limited, study) == (1, 1, {"CT"})
        assert_archive_clean(limited)
    finally:
        limited.stop()
